"""The scheduler: fans batches of tasks out to explainer actors, streams their images to segmenter
actors, and commits each finished task from the driver.

- Work in flight is bounded (``in_flight_per_actor`` batches per explainer).
- A batch whose actor died (or whose node vanished) is re-submitted, up to ``task_retries`` times;
  the actor itself is restarted by Ray. An exception inside a task is the task's error row.
- Commits (samples part, then the task row) run on a small thread pool so storage latency overlaps
  the next results; a task row on storage means the task is complete.
- Progress goes to a callback (done / failed / left / ETA) and, every ``log_every_s``, one summary
  line to the log, which is what ``ray job logs`` shows.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, ObjectLostError, OwnerDiedError, RayError, RayTaskError

from dxray.audit import Finished, TaskSpec, _one_line, _task_row

log = logging.getLogger("dxray")

Commit = Callable[[Finished, list[dict] | None, str | None], dict]
Progress = Callable[[str, dict], None]


@dataclass
class Batch:
    specs: list[TaskSpec]
    attempt: int = 0


@dataclass
class _Pending:
    kind: str  # explain | score
    batch: Batch
    actor: int
    images: object = None  # ObjectRef of the explainer's images (explain) / finished rows (score)
    finished: list[Finished] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)


@dataclass
class Tally:
    total: int
    done: int = 0
    failed: int = 0
    retried: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        finished = self.done + self.failed
        left = self.total - finished
        elapsed = time.monotonic() - self.started
        rate = finished / elapsed if elapsed > 0 else 0.0
        eta = f"{left / rate / 60:.1f} min" if rate > 0 and left else ("0 min" if not left else "unknown")
        return (f"dxray: {finished}/{self.total} tasks finished ({self.failed} failed, {self.retried} re-submitted), "
                f"{left} left, {rate * 60:.1f} tasks/min, ETA {eta}")


class _Pool:
    """Actors of one kind with their load and health. An actor that failed gets no work until a
    ``ready()`` probe answers (Ray restarts it meanwhile); one whose probe says it died for good
    (its constructor fails) stays out."""

    def __init__(self, actors: Sequence, limit: int):
        self.actors = list(actors)
        self.load = [0] * len(self.actors)
        self.limit = limit
        self.down: dict[int, float] = {}  # actor -> earliest time of its next probe (inf: dead for good)
        self.probes: dict[object, int] = {}
        self.last_error = ""

    def pick(self) -> int | None:
        free = [i for i in range(len(self.actors)) if i not in self.down and self.load[i] < self.limit]
        return min(free, key=self.load.__getitem__) if free else None

    def failed(self, i: int, err: BaseException) -> None:
        self.last_error = _one_line(err)
        self.down.setdefault(i, 0.0)

    def dead(self) -> bool:
        return bool(self.actors) and all(self.down.get(i) == float("inf") for i in range(len(self.actors)))

    def probe(self) -> None:
        now = time.monotonic()
        probing = set(self.probes.values())
        for i, when in self.down.items():
            if when <= now and i not in probing:
                self.probes[self.actors[i].ready.remote()] = i

    def on_probe(self, ref) -> None:
        i = self.probes.pop(ref)
        try:
            ray.get(ref)
        except ActorDiedError as err:  # not restarting: its constructor failed again
            self.last_error = _one_line(err)
            self.down[i] = float("inf")
        except Exception:  # still restarting
            self.down[i] = time.monotonic() + 1.0
        else:
            self.down.pop(i, None)


def _system_failure(err: BaseException) -> bool:
    """An actor or node died (retry), rather than the task's own code raising (an error row)."""
    return isinstance(err, RayError) and not isinstance(err, RayTaskError)


class Scheduler:
    def __init__(self, explainers: Sequence, segmenters: Sequence, commit: Commit,
                 error_row: Callable[[TaskSpec, str], dict], *, in_flight_per_actor: int = 2, task_retries: int = 3,
                 log_every_s: float = 30.0, progress: Progress | None = None, commit_threads: int = 8):
        if not explainers:
            raise ValueError("the scheduler needs at least one explainer actor")
        self.explainers = list(explainers)
        self.segmenters = list(segmenters)
        self.commit = commit
        self.in_flight = in_flight_per_actor
        self.retries = task_retries
        self.log_every = log_every_s
        self.progress = progress or (lambda event, data: None)
        self.commit_threads = commit_threads
        self.error_row = error_row

    # -- submission --------------------------------------------------------------------------------
    def _explain(self, batch: Batch, i: int) -> tuple[object, _Pending]:
        self.explain_pool.load[i] += 1
        rows, images = self.explainers[i].run.options(num_returns=2).remote(batch.specs)
        return rows, _Pending("explain", batch, i, images)

    def _score(self, p: _Pending, j: int) -> tuple[object, _Pending]:
        self.score_pool.load[j] += 1
        prompts = [f.prompt for f in p.finished]
        ref = self.segmenters[j].score.remote(p.images, prompts)
        return ref, _Pending("score", p.batch, j, p.images, p.finished, [k for k, q in enumerate(prompts) if q])

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, todo: list[TaskSpec], batch_size: int) -> list[dict]:
        """Run every task; returns the committed task rows (in completion order)."""
        self.explain_pool = _Pool(self.explainers, self.in_flight)
        self.score_pool = _Pool(self.segmenters, 1 << 30)  # a segmenter queues its calls itself
        queue = deque(Batch(todo[i:i + batch_size]) for i in range(0, len(todo), batch_size))
        to_score: deque[_Pending] = deque()  # explained batches waiting for a healthy segmenter
        tally = Tally(len(todo))
        pending: dict[object, _Pending] = {}
        futures: deque[Future] = deque()
        rows: list[dict] = []
        last_log = time.monotonic()
        self.progress("start", {"tasks": len(todo), "batches": len(queue), "explainers": len(self.explainers)})

        def finish(row: dict) -> None:
            rows.append(row)
            if row["status"] == "ok":
                tally.done += 1
            else:
                tally.failed += 1
            self.progress("task", row)

        def submit_commit(done: Finished, scores, error) -> None:
            futures.append(pool.submit(self.commit, done, scores, error))

        def fail(specs: list[TaskSpec], why: str) -> None:
            for spec in specs:
                submit_commit(Finished(self.error_row(spec, why), [], None), None, None)

        def retry_or_fail(batch: Batch, why: str) -> None:
            if batch.attempt < self.retries:
                tally.retried += len(batch.specs)
                log.warning("dxray: re-submitting %d task(s) after %s (attempt %d of %d)", len(batch.specs), why,
                            batch.attempt + 2, self.retries + 1)
                queue.appendleft(Batch(batch.specs, batch.attempt + 1))
                self.progress("retry", {"tasks": len(batch.specs), "why": why, "attempt": batch.attempt + 2})
            else:
                fail(batch.specs, f"gave up after {self.retries + 1} attempts: {why}")

        def drain(block: bool) -> None:
            while futures and (block or futures[0].done()):
                finish(futures.popleft().result())  # a storage failure past its retries ends the run here

        with ThreadPoolExecutor(self.commit_threads, thread_name_prefix="dxray-commit") as pool:
            try:
                while queue or pending or to_score:
                    if self.explain_pool.dead() and queue:  # gone for good: the rest cannot run
                        fail([s for b in queue for s in b.specs], f"every explainer actor died: {self.explain_pool.last_error}")
                        queue.clear()
                    if self.score_pool.dead() and to_score:
                        fail([q.batch.specs[k] for q in to_score for k, f in enumerate(q.finished) if f.prompt],
                             f"every segmenter actor died: {self.score_pool.last_error}")
                        to_score.clear()
                    self.explain_pool.probe()
                    self.score_pool.probe()
                    while queue and (i := self.explain_pool.pick()) is not None:
                        ref, p = self._explain(queue.popleft(), i)
                        pending[ref] = p
                    while to_score and (j := self.score_pool.pick()) is not None:
                        ref, p = self._score(to_score.popleft(), j)
                        pending[ref] = p
                    probes = list(self.explain_pool.probes) + list(self.score_pool.probes)
                    waiting_on = list(pending) + probes
                    if not waiting_on:
                        time.sleep(0.2)  # every actor is restarting: wait for the next probe
                        continue
                    ready, _ = ray.wait(waiting_on, num_returns=1, timeout=min(self.log_every, 1.0))
                    for ref in ready:
                        if ref in self.explain_pool.probes:
                            self.explain_pool.on_probe(ref)
                        elif ref in self.score_pool.probes:
                            self.score_pool.on_probe(ref)
                        else:
                            p = pending.pop(ref)
                            if p.kind == "explain":
                                self.explain_pool.load[p.actor] -= 1
                                self._on_explained(ref, p, to_score, submit_commit, retry_or_fail)
                            else:
                                self.score_pool.load[p.actor] -= 1
                                self._on_scored(ref, p, to_score, submit_commit, retry_or_fail)
                    drain(block=False)
                    if time.monotonic() - last_log >= self.log_every:
                        last_log = time.monotonic()
                        log.info(tally.line())
                        self.progress("log", {"line": tally.line()})
                drain(block=True)
            finally:
                for f in futures:  # started commits finish (the pool waits); queued ones are dropped
                    f.cancel()
        log.info(tally.line())
        self.progress("done", {"line": tally.line()})
        return rows

    def _on_explained(self, ref, p: _Pending, to_score, submit_commit, retry_or_fail) -> None:
        try:
            p.finished = ray.get(ref)
        except Exception as err:
            if _system_failure(err):
                self.explain_pool.failed(p.actor, err)
                retry_or_fail(p.batch, f"explainer {p.actor} failed ({type(err).__name__})")
            else:  # the task code raised: every task of the batch gets the error row
                message = _one_line(getattr(err, "cause", None) or err)
                for spec in p.batch.specs:
                    submit_commit(Finished(self.error_row(spec, message), [], None), None, None)
            return
        scored = any(f.prompt for f in p.finished) and self.segmenters
        for f in p.finished:
            if not (scored and f.prompt):
                submit_commit(f, None, None)
        if scored:
            to_score.append(p)

    def _on_scored(self, ref, p: _Pending, to_score, submit_commit, retry_or_fail) -> None:
        try:
            scores = ray.get(ref)
        except Exception as err:
            specs = [p.batch.specs[k] for k in p.scored]
            if isinstance(err, ObjectLostError | OwnerDiedError):  # the images are gone: optimise again
                retry_or_fail(Batch(specs, p.batch.attempt), f"images lost ({type(err).__name__})")
            elif _system_failure(err):  # the segmenter died: score the same images on a healthy one
                self.score_pool.failed(p.actor, err)
                if p.batch.attempt < self.retries:
                    p.batch = Batch(p.batch.specs, p.batch.attempt + 1)
                    to_score.append(_Pending("explain", p.batch, -1, p.images, p.finished))
                else:
                    retry_or_fail(Batch(specs, p.batch.attempt), f"segmenter {p.actor} failed ({type(err).__name__})")
            else:
                message = f"segmentation failed: {_one_line(getattr(err, 'cause', None) or err)}"
                for k in p.scored:
                    submit_commit(p.finished[k], None, message)
            return
        for k in p.scored:
            submit_commit(p.finished[k], scores[k], None)


def error_row_for(run_id: str, cfg) -> Callable[[TaskSpec, str], dict]:
    return lambda spec, error: _task_row(run_id, spec, cfg, None, error)
