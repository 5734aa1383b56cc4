"""Command line: explain, audit (Ray), rank-features, redecide, report, schema, toyworld train|check."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
import typer.core
from rich.console import Console
from typer._click import core as click_core  # Typer's own copy of click: its errors and contexts
from typer._click import exceptions as click_errors

from dxray.errors import DxrayError, visible
from dxray.quiet import quiet_libraries

EXIT_CODES = ("Exit codes: 0 success; 1 the run finished but some tasks failed (error rows in the tasks table); "
              "2 bad input, configuration or storage error (one line on stderr; a run stopped by it keeps every "
              "task committed so far); 3 an internal error (a bug: one line, DXRAY_TRACEBACK=1 shows the "
              "traceback); 130 interrupted by Ctrl-C, 143 stopped by SIGTERM (kill, Kubernetes, ray job stop), "
              "each with one line of what was committed; re-running the same command resumes.")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, Kubernetes, KubeRay, ``ray job stop``): an interrupt like Ctrl-C, exit 143."""


def _terminate(signum, frame) -> None:
    raise Terminated


@contextmanager
def _sigterm_interrupts():
    """SIGTERM raises :class:`Terminated` while a command runs (only the main thread can take a handler)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _usage_error(e: click_errors.UsageError) -> None:
    """A click usage error (a bad, missing or repeated option value, an unknown option) as one line, exit 2."""
    path = e.ctx.command_path.split()[1:] if e.ctx is not None else []  # the command, not the program's name
    where = f"{' '.join(path)}: " if path else ""
    _fail(f"{where}{e.format_message()}")


class _Group(typer.core.TyperGroup):
    """The app's command groups: every usage error is one line ``error: ...`` and exit 2 (not click's usage
    box), and an option given twice is refused (it would silently take the last value)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click_errors.NoArgsIsHelpError:
            raise
        except click_errors.UsageError as e:
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click_errors.NoArgsIsHelpError:
            raise
        except click_errors.UsageError as e:
            _usage_error(e)

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and not isinstance(cmd, typer.core.TyperGroup):
            _refuse_repeated(cmd, ctx, name, rest)
        return name, cmd, rest


def _refuse_repeated(cmd, ctx, name: str | None, args: list[str]) -> None:
    """A non-repeatable option given twice (``--delta 0.1 --delta 0.2``) is a usage error naming it."""
    sub = click_core.Context(cmd, info_name=name, parent=ctx, resilient_parsing=True)
    try:
        _, _, order = cmd.make_parser(sub).parse_args(args=list(args))
    except click_errors.UsageError:
        return  # the real parse says what is wrong
    seen = Counter(p for p in order if p.param_type_name == "option" and not p.multiple
                   and not getattr(p, "count", False) and not p.is_eager)
    for param, n in seen.items():
        if n > 1:
            raise click_errors.UsageError(f"option {'/'.join(param.opts)} given {n} times; give it once", sub)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=f"Audit what an image classifier has learned (DiffExplainer on Ray).\n\n{EXIT_CODES}")
err = Console(stderr=True)
_progress = {"committed": 0, "skipped": None}  # fed by _task_bar: what an interrupt line reports


class _Redacting(logging.Filter):
    """Masks URI credentials and secret values in every log record before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from dxray.storage import redact_text

        record.msg, record.args = redact_text(record.getMessage()), None
        return True


def _os_error_line(e: OSError) -> str:
    """A storage error of the OS (disk full, name too long, read-only, ...) in one line."""
    import errno

    hints = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.ENAMETOOLONG: "a file name is too long for the filesystem", errno.EROFS: "the filesystem is read-only",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
    what = hints.get(e.errno) or (e.strerror or " ".join(str(e).split()) or type(e).__name__)
    where = f" ({e.filename})" if e.filename else ""
    return f"storage error: {what}{where}"


def _guarded(command: Callable) -> Callable:
    """Every command's errors as one line: a DxrayError or an OS storage error exits 2, Ctrl-C 130,
    anything else (a bug) 3; never a traceback unless DXRAY_TRACEBACK=1."""
    import functools
    import os

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            with _sigterm_interrupts():
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click_errors.ClickException):
            raise
        except DxrayError as e:
            _fail(str(e))
        except KeyboardInterrupt as e:
            done, before = _progress["committed"], _progress["skipped"]
            by = " by SIGTERM" if isinstance(e, Terminated) else ""
            if before is None:
                _say(f"interrupted{by} before any task ran; nothing was written beyond what was there")
            else:
                _say(f"interrupted{by}: {done} task(s) committed in this session ({before} were done before); "
                     f"re-running the same command resumes from there")
            raise typer.Exit(143 if by else 130) from None
        except OSError as e:
            if os.environ.get("DXRAY_TRACEBACK"):
                raise
            _fail(_os_error_line(e))
        except Exception as e:
            if os.environ.get("DXRAY_TRACEBACK"):
                raise
            _say(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (a bug in dxray; "
                 f"DXRAY_TRACEBACK=1 shows the traceback)")
            raise typer.Exit(3) from None

    return run


def _say(line: str) -> None:
    from dxray.storage import redact_text

    err.print(visible(redact_text(line)), highlight=False, soft_wrap=True, markup=False)


def _text(value):
    """A table cell of text that came from data (a class name): control characters shown, no rich markup."""
    from rich.text import Text

    return Text(visible("" if value is None else str(value)))


def _info(event) -> str | None:
    """The bar's info text for a progress event (None: the event leaves it as it is)."""
    from dxray import progress as ev

    match event:
        case ev.Planned(skipped=skipped, explainers=explainers):
            return f"{skipped} already done" + ("; starting actors" if explainers is not None else "")
        case ev.Step(step=step, steps=steps, tasks=tasks, loss=loss):
            return f"step {step}/{steps} loss {loss:.3f} [{tasks}]"
        case ev.ActorsStarted(explainers=explainers, segmenters=segmenters):
            return f"{explainers} explainer(s), {segmenters} segmenter(s)"
    return None


@contextmanager
def _task_bar(quiet: bool, first: str):
    """A rich bar over the run's tasks, fed by the runner's :mod:`dxray.progress` events: ``Planned`` sets the
    total, ``TaskCommitted`` / ``TaskFailed`` advance it (counting failures), others set its info text."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from dxray import progress as ev

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    # Started by the runner's first event (after its preflight): a config error leaves its one line and no bar.
    bar = Progress(*columns, console=err, disable=quiet, transient=False)
    tasks_bar = bar.add_task("tasks", total=None, info=first)
    failed = 0

    # Off a terminal rich draws the bar once, when it stops: it starts only then, at a normal end (a stopped
    # transient bar would leave a blank line above the error's one line).
    live = err.is_terminal
    seen = False

    def progress(event: ev.Event) -> None:
        nonlocal failed, seen
        seen = True
        if live and not bar.live.is_started:
            bar.start()
        if isinstance(event, ev.Planned):
            bar.update(tasks_bar, total=event.todo)
            _progress["skipped"] = event.skipped
        if isinstance(event, ev.TaskCommitted | ev.TaskFailed):
            failed += isinstance(event, ev.TaskFailed)
            _progress["committed"] += isinstance(event, ev.TaskCommitted)
            bar.update(tasks_bar, advance=1, info=f"{failed} failed" if failed else "")
        elif (info := _info(event)) is not None:
            bar.update(tasks_bar, info=info)

    try:
        yield progress
    except BaseException:  # the error's one line is what is left on stderr, not a half bar above it
        bar.live.transient = True
        raise
    else:
        if seen and not bar.live.is_started:
            bar.start()
    finally:
        if bar.live.is_started:
            bar.stop()


def _fail(message: str) -> None:
    from rich.markup import escape

    from dxray.storage import redact_text

    message = visible(" ".join(redact_text(message).split()))  # one line, whatever the message held
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
@_guarded
def explain(
    config: Annotated[Path, typer.Argument(help="YAML config (see jobs/configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. output=DIR optimize.steps=50")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> None:
    """Optimise soft prompts for the configured classes and features and write the run tables (one process, no Ray).

    Example: dxray explain jobs/configs/tiny.yaml output=dxray-out optimize.steps=50

    Naming what spurious features show: dxray explain jobs/configs/imagenet.yaml segment.concepts=default
    """
    from dxray.config import load_config
    from dxray.pipeline.local import run

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    with _task_bar(quiet, "loading models") as progress:
        summary = run(cfg, progress=progress)
    _report(summary)


@app.command()
@_guarded
def audit(
    config: Annotated[Path, typer.Argument(help="YAML config (see jobs/configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. output=s3://bucket/audits cluster.explainers=8")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: RAY_ADDRESS, else start a local Ray)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar (summary lines still go to the log)")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan (tasks, steps, images, GPU-hours) and exit: loads no model, starts no Ray; a missing checkpoint or image folder is listed (exit 0), a config it cannot describe at all exits 2")] = False,
) -> None:
    """Run the audit on Ray: explainer actors per GPU, segmenter actors, resumable.

    Example: dxray audit jobs/configs/tiny.yaml output=s3://bucket/audits --address auto

    Then, against a baseline audit: dxray compare BASELINE_RUN NEW_RUN --fail-on new-spurious
    """

    from dxray.config import load_config

    cfg = load_config(config, overrides or [])
    quiet_libraries()
    from rich.logging import RichHandler

    # Summary lines and warnings go to stderr beside the bar; stdout carries only the run folder.
    handler = RichHandler(console=err, show_time=True, show_path=False, show_level=False, markup=False)
    handler.addFilter(_Redacting())
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    if dry_run:  # preflight's checks (it runs them) and the plan; builds, loads and starts nothing
        from dxray.plan_estimate import dry_run as dry_plan
        from dxray.plan_estimate import render

        Console().print(render(dry_plan(cfg)))
        return
    from dxray.distributed.audit import run_distributed

    with _task_bar(quiet, "starting Ray") as progress:
        summary = run_distributed(cfg, address=address, progress=progress)
    _report(summary)


def _report(summary) -> None:
    err.print(f"run {summary.run_id}: {summary.ok} ok, {summary.failed} failed, {summary.skipped} skipped "
              f"(already done), {summary.samples} samples, {summary.spurious} of {summary.verdicts} features "
              f"spurious → {summary.root}", highlight=False, soft_wrap=True)
    if summary.low_confidence or summary.unreliable:
        err.print(f"  {summary.low_confidence} verdict(s) low confidence; {summary.unreliable} class(es) unreliable "
                  f"(the segmenter did not find the object in the generator's plain pictures of it)",
                  highlight=False, soft_wrap=True)
    for line in summary.errors[:10]:
        err.print(_text(f"  failed {line}"), highlight=False, soft_wrap=True)
    print(summary.root)
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@_guarded
def redecide(
    run: Annotated[str, typer.Argument(help="run folder: {output}/{run_id}, local or s3://")],
    delta: Annotated[float, typer.Option(help="core when the mean object fraction r >= delta")],
) -> None:
    """Re-decide core/spurious for another delta from the stored object fractions (loads no model).

    Example: dxray redecide dxray-out/run-0123456789ab --delta 0.4
    """
    from rich.table import Table

    from dxray.runs import redecide as run_redecide
    from dxray.verdict import LOW_CONFIDENCE, RESAMPLES

    if not 0.0 <= delta <= 1.0:  # checked here so the message names the option the user typed
        _fail(f"--delta must be between 0 and 1, got {delta}")
    verdicts, classes = run_redecide(run, delta)
    table = Table("class", "name", "spurious", "features", "low confidence", "class r", title=f"delta = {delta}")
    for c in classes:
        r = c["class_object_fraction"]
        table.add_row(str(c["class_index"]), _text(c["class_name"]), str(c["n_spurious"]), str(c["n_features"]),
                      str(c["n_low_confidence"]), "-" if r is None else f"{r:.3f}")
    Console().print(table)
    unsure = sum(v["low_confidence"] for v in verdicts)
    err.print(f"{unsure} of {len(verdicts)} verdicts are low confidence (fewer than {LOW_CONFIDENCE:.0%} of "
              f"{RESAMPLES} bootstrap resamples of r agree, or one image)", highlight=False, soft_wrap=True)


@app.command("compare")
@_guarded
def compare_cmd(
    run_a: Annotated[str, typer.Argument(help="the baseline run folder ({output}/{run_id}, local or s3://)")],
    run_b: Annotated[str, typer.Argument(help="the run to check against it (a new checkpoint's audit); the comparison is written into its folder")],
    fail_on: Annotated[list[str] | None, typer.Option("--fail-on", help="exit 1 when RUN_B has it, naming the classes: new-spurious (a feature core in RUN_A is spurious in RUN_B; with different classifiers, more spurious features in a class) or class-bias (a class newly called biased: class r < delta). Repeatable")] = None,
) -> None:
    """Compare two audits: per class the change in class r and in spurious features, per feature (same classifier
    only) the verdicts that flipped; writes the comparison table and an HTML page into RUN_B. With --fail-on, a
    release gate: exit 1 when the condition holds, 0 when it does not.

    Example: dxray compare s3://audits/run-0123456789ab dxray-out/run-ba9876543210 --fail-on new-spurious --fail-on class-bias
    """
    from rich.table import Table

    from dxray.compare import describe_classifier, run_compare

    result = run_compare(run_a, run_b, fail_on or [])
    c = result.comparison
    classes = c.class_rows()
    changed = [r for r in classes if r["change"] != "same" or r["n_new_spurious"] or r["n_new_core"]]
    num = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
    table = Table("class", "name", "r A", "r B", "change in r", "bias", "spurious A→B", "new spurious", "new core",
                  title=f"{len(changed)} of {len(classes)} classes changed" + (" (first 30)" if len(changed) > 30 else ""))
    for r in changed[:30]:
        table.add_row(str(r["class_index"]), _text(r["class_name"]), num(r["r_a"]), num(r["r_b"]),
                      num(r["r_change"], "{:+.3f}"), "" if r["change"] == "same" else r["change"],
                      f"{num(r['n_spurious_a'], '{}')}→{num(r['n_spurious_b'], '{}')}",
                      num(r["n_new_spurious"], "{}"), num(r["n_new_core"], "{}"))
    Console().print(table)
    say = lambda line: err.print(_text(line), highlight=False, soft_wrap=True)  # noqa: E731
    if c.features_comparable:
        flips = Counter(f["change"] for f in c.feature_rows())
        say(f"same classifier: {len(c.feature_rows())} features compared, {flips['new spurious']} core → spurious, "
            f"{flips['new core']} spurious → core")
    else:
        say(f"different classifiers ({describe_classifier(c.classifier_a)} vs {describe_classifier(c.classifier_b)}): "
            f"features are not comparable, compared at the class level only")
    if c.only_a or c.only_b:
        say(f"compared the {len({r['class_index'] for r in classes})} classes both audited: RUN_B lacks {len(c.only_a)} "
            f"of RUN_A's classes, RUN_A lacks {len(c.only_b)} of RUN_B's")
    say(f"comparison → {result.table}, {result.page}")
    failed = False
    for condition in fail_on or []:
        bad = c.offenders(condition)
        if bad:
            failed = True
            names = ", ".join(f"{r['class_index']} ({r['class_name']})" if r["class_name"] else str(r["class_index"])
                              for r in bad[:20])
            say(f"fail: {condition} in {len(bad)} classes: {names}{' …' if len(bad) > 20 else ''}")
        else:
            say(f"pass: no {condition}")
    if failed:
        raise typer.Exit(1)


@app.command("rank-features")
@_guarded
def rank_features_cmd(
    config: Annotated[Path, typer.Argument(help="YAML config (see jobs/configs/)")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. targets.feature_images.path=DIR")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: cluster.address, RAY_ADDRESS, else a local Ray)")] = None,
    actors: Annotated[int | None, typer.Option(min=1, help="classifier actors (default: cluster.explainers, else one per GPU share, else 1)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
    from_annotations: Annotated[str | None, typer.Option("--from-annotations", help="take the annotated top-5 from Salient ImageNet's discover_spurious_features.csv instead (no images, no Ray)")] = None,
) -> None:
    """Rank each class's top-k features by W[c,f] x mean activation over an image folder, on Ray Data
    (or take them from Salient ImageNet's annotations with --from-annotations);
    writes the feature_ranking table (read it back with targets.feature_source=table).

    Example: dxray rank-features jobs/configs/imagenet.yaml targets.feature_images.path=s3://bucket/imagenet/train
    """
    if from_annotations is not None:
        from dxray.agreement import write_annotation_ranking
        from dxray.config import load_config

        cfg = load_config(config, overrides or [])
        table, n = write_annotation_ranking(cfg, from_annotations)
        err.print(f"took the annotated top-{cfg.targets.top_k} of {n} classes from {from_annotations} → {table}",
                  highlight=False, soft_wrap=True)
        print(table)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

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
    sources = sorted({r.source for r in result.ranked})
    err.print(f"ranked {len({r.class_index for r in result.ranked})} classes from {result.images} images with "
              f"{result.actors} actor(s) in {result.seconds:.1f} s ({', '.join(sources)}) → {result.table}",
              highlight=False, soft_wrap=True)
    print(result.table)


@app.command("report")
@_guarded
def report_cmd(
    run: Annotated[str, typer.Argument(help="run folder: {output}/{run_id}, local or s3://")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the index page to write; the class pages go into the sibling NAME_files/ folder")] = Path("report.html"),
) -> None:
    """Write an HTML report of a run (no network resource): an index page with a sortable summary of the
    classes and, on one page per class, the explanation images, the top features with their core/spurious
    verdict, and failed tasks.

    Example: dxray report dxray-out/run-4253965a89ba -o dxray-out/report.html
    """
    from dxray.report import build_report

    path = build_report(run, out, warn=lambda line: _say(f"warning: {line}"))
    print(path)


@app.command()
@_guarded
def schema(
    out: Annotated[Path, typer.Option(help="folder for the generated contract files")] = Path("schemas"),
) -> None:
    """Write the data contract into OUT: config.schema.json and tables/{table}.arrow.json.

    Example: dxray schema --out schemas
    """
    from dxray.contract import write_contract

    for path in write_contract(out):
        print(path)


@app.command("convert-checkpoint")
@_guarded
def convert_checkpoint_cmd(
    src: Annotated[Path, typer.Argument(help="robustness-library checkpoint, e.g. imagenet_l2_3_0.pt")],
    dst: Annotated[Path, typer.Argument(help="safetensors file to write (DST.safetensors)")],
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="unpickle SRC even where it holds objects beyond tensors (runs code from the file: only for a file you trust)")] = False,
) -> None:
    """Convert a MadryLab robustness checkpoint (the robust ResNet-50 of Salient ImageNet) into a safetensors file
    that classifier.spec=robust-resnet50:DST loads without unpickling: the network weights (module.model. prefix
    stripped, attacker copy dropped) plus the input normaliser's mean/std.

    Example: dxray convert-checkpoint imagenet_l2_3_0.pt imagenet_l2_3_0.safetensors
    """
    from dxray.classifiers import convert_checkpoint

    info = convert_checkpoint(src, dst, allow_pickle=allow_pickle)
    err.print(f"wrote {info['tensors']} tensors, normaliser {info['normalizer']} → {info['path']}", highlight=False,
              soft_wrap=True)
    print(info["path"])


@app.command("agreement")
@_guarded
def agreement_cmd(
    run: Annotated[str | None, typer.Argument(help="run folder ({output}/{run_id}, local or s3://) or a bare verdicts Parquet/CSV file; required except with --print-classes")] = None,
    annotations: Annotated[str, typer.Option(help="Salient ImageNet's discover_spurious_features.csv (MTurk results; not redistributable, get it from github.com/singlasahil14/salient_imagenet)")] = ...,
    class_metadata: Annotated[str | None, typer.Option(help="Salient ImageNet's class_metadata.csv (supercategory) or a CSV with class_index, animate; default: classes 0-397 are animate")] = None,
    subset: Annotated[str | None, typer.Option(help="salient90: 15 classes for each number 0..5 of human-spurious top-5 features (seeded hash order, seed 0)")] = None,
    deltas: Annotated[str | None, typer.Option(help="comma-separated deltas for the sweep over the stored r (default 0,0.1,...,1)")] = None,
    print_classes: Annotated[bool, typer.Option("--print-classes", help="print the --subset classes as a list for targets.classes=[...] and exit")] = False,
    exclude_unreliable: Annotated[bool, typer.Option("--exclude-unreliable", help="leave out the features of classes whose segmenter control failed (verdicts.reliable false: the segmenter did not find the object in the generator's plain pictures of it)")] = False,
) -> None:
    """Agreement of the run's core/spurious verdicts with the Salient ImageNet human labels, overall and per
    animate/inanimate x unbiased/medium/biased group, plus a delta sweep; writes the agreement table and a PNG chart.

    Example: dxray agreement dxray-out/run-0123456789ab --annotations discover_spurious_features.csv --subset salient90
    """
    from rich.table import Table

    from dxray import agreement as ag

    if not annotations:
        raise DxrayError("--annotations is empty: give Salient ImageNet's discover_spurious_features.csv")
    if print_classes:
        if subset is None:
            raise DxrayError("--print-classes needs --subset salient90")
        if subset not in ag.SUBSETS:
            raise DxrayError(f"--subset must be one of {', '.join(ag.SUBSETS)}, got {subset!r}")
        labels, dropped = ag.annotation_labels(annotations)
        if dropped:
            _say(ag.dropped_line(dropped))
        groups = ag.class_groups(labels)
        classes, short = ag.salient90(groups)
        for k, n in short.items():
            err.print(f"warning: only {n} classes with {k} spurious top-5 features (wanted {ag.SALIENT90_PER_COUNT})")
        print("[" + ", ".join(map(str, classes)) + "]")
        return
    if run is None:
        raise DxrayError("RUN is required: a run folder or a verdicts file")
    result = ag.run_agreement(run, annotations, class_metadata, subset,
                              ag.parse_deltas(deltas) if deltas is not None else None, exclude_unreliable)
    for k, n in result.shortfall.items():
        err.print(f"warning: salient90 has only {n} classes with {k} spurious top-5 features (wanted {ag.SALIENT90_PER_COUNT})")
    if result.missing:
        err.print(f"warning: {len(result.missing)} subset classes have no verdicts in the run, e.g. {result.missing[:5]}")
    if result.dropped:
        _say(ag.dropped_line(result.dropped))
    if result.other_answers:
        err.print(f"note: {result.other_answers} annotator answers other than main_object/separate_object/background "
                  f"counted as not spurious")
    if result.unlabelled:
        err.print(f"note: {result.unlabelled} verdict pairs have no human label (not the annotated top-5)")
    template = ag.chart_template(result.rows)
    stored = [r for r in result.rows if r["stored"] and r["template"] == template]
    pct = lambda r: "-" if r["agreement"] is None else f"{100 * r['agreement']:.1f}%"  # noqa: E731
    auc = lambda r: "n/a" if r is None or r["roc_auc"] is None else f"{r['roc_auc']:.3f}"  # noqa: E731
    table = Table("animacy", "bias", "classes", "pairs", "agreement", "human spurious", "dxray spurious", "ROC AUC",
                  title=f"{result.subset}: stored verdicts, delta {'-' if stored[0]['delta'] is None else stored[0]['delta']}" if stored else result.subset)
    for r in stored:
        table.add_row(r["animacy"], r["bias"], str(r["n_classes"]), str(r["n_pairs"]), pct(r),
                      str(r["n_human_spurious"]), str(r["n_dxray_spurious"]), auc(r))
    out = Console()
    out.print(table)
    sweep = [r for r in result.rows if not r["stored"] and r["template"] == template and r["bias"] == "all"]
    if sweep:
        by_delta: dict[float, dict[str, str]] = {}
        for r in sweep:
            by_delta.setdefault(r["delta"], {})[r["animacy"]] = pct(r)
        st = Table("delta", "all", "animate", "inanimate", title="delta sweep over the stored r")
        for d, cells in by_delta.items():
            st.add_row(f"{d:g}", *(cells.get(a, "-") for a in ("all", "animate", "inanimate")))
        out.print(st)
    overall = {r["animacy"]: r for r in stored if r["bias"] == "all"}
    if (n := (overall.get("all") or {}).get("n_unreliable")):
        err.print(f"note: {n} compared pairs belong to classes whose segmenter control failed (verdicts.reliable "
                  f"false){': left out' if exclude_unreliable else '; --exclude-unreliable leaves them out'}",
                  highlight=False, soft_wrap=True)
    out.print(f"ROC AUC of mean r for human core vs spurious (threshold-free; 1.0 = every human-core feature has a "
              f"higher mean r than every human-spurious one, 0.5 = chance): {auc(overall.get('all'))} "
              f"(animate {auc(overall.get('animate'))}, inanimate {auc(overall.get('inanimate'))})",
              highlight=False, soft_wrap=True)
    err.print(f"agreement over {len(result.classes)} classes → {result.table}, {result.chart}", highlight=False,
              soft_wrap=True)


toyworld = typer.Typer(cls=_Group, no_args_is_help=True, help="The planted-bias toy world: a known-answer benchmark.")
app.add_typer(toyworld, name="toyworld")


@toyworld.command("train")
@_guarded
def toyworld_train(
    cache_dir: Annotated[str | None, typer.Option(help="model cache (default $DXRAY_CACHE or ~/.cache/dxray)")] = None,
    force: Annotated[bool, typer.Option(help="retrain even if a trained world is cached")] = False,
    world_seed: Annotated[int | None, typer.Option(help="seeds the classifier's and generator's training; one "
                                                        "world per cache dir (default 0: the world make demo builds)")] = None,
    unbiased_classifier: Annotated[bool, typer.Option("--unbiased-classifier", help="also train the world's classifier without the planted bias (every class on every background) and print its classifier.spec, for dxray compare")] = False,
) -> None:
    """Train the toy world's generator, biased classifier and biased ViT classifier (a few minutes on a CPU).

    Example: dxray toyworld train --cache-dir ~/.cache/dxray
    """
    quiet_libraries()
    from dxray.toyworld.train import (
        ensure_toyworld,
        ensure_unbiased_classifier,
        ensure_vit_classifier,
    )

    log = lambda m: err.print(m, highlight=False)  # noqa: E731
    print(ensure_toyworld(cache_dir, log=log, force=force, seed=world_seed))
    log(f"the world's ViT classifier: classifier.spec=hf:{ensure_vit_classifier(cache_dir, log=log)}")
    if unbiased_classifier:
        print(f"hf:{ensure_unbiased_classifier(cache_dir, log=log)}")


@toyworld.command("check")
@_guarded
def toyworld_check(
    run: Annotated[str, typer.Argument(help="run folder of an audit of the toy world")],
) -> None:
    """Compare an audit of the toy world with its planted truth; writes toyworld_check.json into the run.

    Example: dxray toyworld check dxray-out/run-0123456789ab
    """
    from rich.table import Table

    from dxray.toyworld.check import check, score_lines, summary_line

    report = check(run)
    table = Table("class", "name", "r", "called", "planted", "p before", "p after")
    for r in report["classes"]:
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        table.add_row(str(r["class_index"]), _text(r["class_name"]), f(r["object_fraction"]),
                      "biased" if r["called_biased"] else "unbiased", "biased" if r["planted_biased"] else "unbiased",
                      f(r["prob_before"]), f(r["prob_after"]))
    Console(stderr=True).print(table)
    if report.get("features"):
        ft = Table("class", "name", "rank", "feature", "r", "dxray", "truth", "object resp.", "background resp.",
                   title="feature verdicts vs the feature truth (exact renders through the classifier)")
        for p in report["features"]["pairs"]:
            ft.add_row(str(p["class_index"]), _text(p["class_name"]), str(p["feature_rank"]), str(p["feature_index"]),
                       f(p["mean_object_fraction"]), _text(p["verdict"]),
                       _text(p["truth"] + ("" if p["correct"] in (None, True) else "  ✗")),
                       f(p["object_response"]), f(p["background_response"]))
        Console(stderr=True).print(ft)
    print(visible(summary_line(report)))
    for line in score_lines(report):  # precision / recall / F1 / FPR with intervals, beside the baselines
        print(line)


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except DxrayError as e:
        err.print(_text(f"error: {' '.join(str(e).split())}"))
        sys.exit(2)
