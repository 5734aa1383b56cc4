"""Command line: explain, audit (Ray), rank-features, redecide, report, schema, toyworld train|check."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dxray.errors import DxrayError
from dxray.quiet import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit what an image classifier has learned (DiffExplainer on Ray).\n\n"
                       "Exit codes: 0 success; 1 the run finished but some tasks failed (error rows in the "
                       "tasks table); 2 bad input, configuration or storage error (nothing was run).")
err = Console(stderr=True)


@contextmanager
def _task_bar(quiet: bool, first: str, infos: dict[str, Callable[[dict], str]]):
    """A rich bar over the run's tasks, fed by the runner's progress events: 'plan' sets the total,
    'task' advances it (counting failures); ``infos`` maps other events to the bar's info text."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err, disable=quiet, transient=False) as bar:
        tasks_bar = bar.add_task("tasks", total=None, info=first)
        failed = 0

        def progress(event: str, data: dict) -> None:
            nonlocal failed
            if event == "plan":
                bar.update(tasks_bar, total=data["todo"])
            if event == "task":
                failed += data["status"] != "ok"
                bar.update(tasks_bar, advance=1, info=f"{failed} failed" if failed else "")
            elif event in infos:
                bar.update(tasks_bar, info=infos[event](data))

        yield progress


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def explain(
    config: Annotated[Path, typer.Argument(help="YAML config (see jobs/configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. output=DIR optimize.steps=50")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> None:
    """Optimise soft prompts for the configured classes and features and write the run tables (one process, no Ray).

    Example: dxray explain jobs/configs/tiny.yaml output=dxray-out optimize.steps=50
    """
    try:
        from dxray.audit import preflight, run
        from dxray.config import load_config

        cfg = load_config(config, overrides or [])
        quiet_libraries()
        preflight(cfg)  # fail fast, before any model is loaded
        infos = {"plan": lambda d: f"{d['skipped']} already done",
                 "step": lambda d: f"step {d['step']}/{d['steps']} loss {d['loss']:.3f} [{d['tasks']}]"}
        with _task_bar(quiet, "loading models", infos) as progress:
            summary = run(cfg, progress=progress)
    except DxrayError as e:
        _fail(str(e))
    _report(summary)


@app.command()
def audit(
    config: Annotated[Path, typer.Argument(help="YAML config (see jobs/configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. output=s3://bucket/audits cluster.explainers=8")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS, else start a local Ray)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar (summary lines still go to the log)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (tasks, steps, images, GPU-hours) and exit: loads no model, starts no Ray")] = False,
) -> None:
    """Run the audit on Ray: explainer actors per GPU, segmenter actors, resumable.

    Example: dxray audit jobs/configs/tiny.yaml output=s3://bucket/audits --address auto
    """

    try:
        from dxray.audit import preflight
        from dxray.config import load_config

        cfg = load_config(config, overrides or [])
        quiet_libraries()
        from rich.logging import RichHandler

        # Summary lines and warnings go to stderr beside the bar; stdout carries only the run folder.
        logging.basicConfig(level=logging.INFO, format="%(message)s",
                            handlers=[RichHandler(console=err, show_time=True, show_path=False, show_level=False)])
        if dry_run:  # preflight's checks (it runs them) and the plan; builds, loads and starts nothing
            from dxray.plan_estimate import dry_run as dry_plan
            from dxray.plan_estimate import render

            Console().print(render(dry_plan(cfg)))
            return
        preflight(cfg)  # fail fast, before Ray starts or any model is loaded
        from dxray.distributed.audit import run_distributed

        infos = {"plan": lambda d: f"{d['skipped']} already done; starting actors",
                 "actors": lambda d: f"{d['explainers']} explainer(s), {d['segmenters']} segmenter(s)"}
        with _task_bar(quiet, "starting Ray", infos) as progress:
            summary = run_distributed(cfg, address=address, progress=progress)
    except DxrayError as e:
        _fail(str(e))
    _report(summary)


def _report(summary) -> None:
    err.print(f"run {summary.run_id}: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped "
              f"(already done), {summary.samples} samples, {summary.spurious} of {summary.verdicts} features "
              f"spurious → {summary.root}", highlight=False, soft_wrap=True)
    for line in summary.errors[:10]:
        err.print(f"  failed {line}", highlight=False, soft_wrap=True)
    print(summary.root)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def redecide(
    run: Annotated[str, typer.Argument(help="run folder: {output}/{run_id}, local or s3://")],
    delta: Annotated[float, typer.Option(help="core when the mean object fraction r >= delta")],
) -> None:
    """Re-decide core/spurious for another delta from the stored object fractions (loads no model).

    Example: dxray redecide dxray-out/run-0123456789ab --delta 0.4
    """
    from rich.table import Table

    from dxray.audit import redecide as run_redecide

    try:
        verdicts, classes = run_redecide(run, delta)
    except DxrayError as e:
        _fail(str(e))
    table = Table("class", "name", "spurious", "features", "class r", title=f"delta = {delta}")
    for c in classes:
        r = c["class_object_fraction"]
        table.add_row(str(c["class_index"]), c["class_name"] or "", str(c["n_spurious"]), str(c["n_features"]),
                      "-" if r is None else f"{r:.3f}")
    Console().print(table)


@app.command("rank-features")
def rank_features_cmd(
    config: Annotated[Path, typer.Argument(help="YAML config (see jobs/configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. targets.feature_images.path=DIR")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: cluster.address, RAY_ADDRESS, else a local Ray)")] = None,
    actors: Annotated[int | None, typer.Option(min=1, help="classifier actors (default: cluster.explainers, else one per GPU share, else 1)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> None:
    """Rank each class's top-k features by W[c,f] x mean activation over an image folder, on Ray Data;
    writes the feature_ranking table (read it back with targets.feature_source=table).

    Example: dxray rank-features jobs/configs/imagenet.yaml targets.feature_images.path=s3://bucket/imagenet/train
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    try:
        from dxray.config import load_config
        from dxray.distributed.rank import check, quiet_logs, rank_features_distributed

        cfg = load_config(config, overrides or [])
        check(cfg)  # fail fast, before Ray starts or a model loads
        quiet_logs()
        columns = [TextColumn("images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=err, disable=quiet) as bar:
            images = bar.add_task("images", total=None)
            result = rank_features_distributed(cfg, address=address, actors=actors,
                                               progress=lambda done, total: bar.update(images, completed=done, total=total))
    except DxrayError as e:
        _fail(str(e))
    sources = sorted({r.source for r in result.ranked})
    err.print(f"ranked {len({r.class_index for r in result.ranked})} classes from {result.images} images with "
              f"{result.actors} actor(s) in {result.seconds:.1f} s ({', '.join(sources)}) → {result.table}",
              highlight=False, soft_wrap=True)
    print(result.table)


@app.command("report")
def report_cmd(
    run: Annotated[str, typer.Argument(help="run folder: {output}/{run_id}, local or s3://")],
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write")] = Path("report.html"),
) -> None:
    """Write a self-contained HTML report of a run: a sortable summary of the classes and, per class,
    the explanation images, the top features with their core/spurious verdict, and failed tasks.

    Example: dxray report dxray-out/run-4253965a89ba -o dxray-out/report.html
    """
    from dxray.report import build_report

    try:
        path = build_report(run, out)
    except DxrayError as e:
        _fail(str(e))
    print(path)


@app.command()
def schema(
    out: Annotated[Path, typer.Option(help="folder for the generated contract files")] = Path("schemas"),
) -> None:
    """Write the data contract into OUT: config.schema.json and tables/{table}.arrow.json.

    Example: dxray schema --out schemas
    """
    from dxray.contract import write_contract

    for path in write_contract(out):
        print(path)


toyworld = typer.Typer(no_args_is_help=True, help="The planted-bias toy world: a known-answer benchmark.")
app.add_typer(toyworld, name="toyworld")


@toyworld.command("train")
def toyworld_train(
    cache_dir: Annotated[str | None, typer.Option(help="model cache (default $DXRAY_CACHE or ~/.cache/dxray)")] = None,
    force: Annotated[bool, typer.Option(help="retrain even if a trained world is cached")] = False,
) -> None:
    """Train the toy world's generator and biased classifier (a few minutes on a CPU).

    Example: dxray toyworld train --cache-dir ~/.cache/dxray
    """
    quiet_libraries()
    from dxray.toyworld.train import ensure_toyworld

    print(ensure_toyworld(cache_dir, log=lambda m: err.print(m, highlight=False), force=force))


@toyworld.command("check")
def toyworld_check(
    run: Annotated[str, typer.Argument(help="run folder of an audit of the toy world")],
) -> None:
    """Compare an audit of the toy world with its planted truth; writes toyworld_check.json into the run.

    Example: dxray toyworld check dxray-out/run-0123456789ab
    """
    from rich.table import Table

    from dxray.toyworld.check import check, summary_line

    try:
        report = check(run)
    except DxrayError as e:
        _fail(str(e))
    table = Table("class", "name", "r", "called", "planted", "p before", "p after")
    for r in report["classes"]:
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        table.add_row(str(r["class_index"]), r["class_name"], f(r["object_fraction"]),
                      "biased" if r["called_biased"] else "unbiased", "biased" if r["planted_biased"] else "unbiased",
                      f(r["prob_before"]), f(r["prob_after"]))
    Console(stderr=True).print(table)
    print(summary_line(report))


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except DxrayError as e:
        err.print(f"error: {e}")
        sys.exit(2)
