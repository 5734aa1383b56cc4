"""The scheduler: fans batches of opaque items out to explainer actors, hands each explained batch's
images to a segmenter actor, and commits every item's result from the driver.

It owns the fan-out, the bound on work in flight, the retries, and the turning of every failure
into a ``(stage, message)`` pair; it knows nothing of what a task, a row or an image is. The caller
gives it callables (as Ray's ``ActorPool`` takes a function of an actor and a value):

- ``explain(actor, items) -> (results_ref, images_ref)``; ``results_ref`` resolves to one result
  per item, in order, and ``images_ref`` travels to a segmenter through the object store, never
  through the driver;
- ``score(actor, images_ref, results) -> ref`` resolving to one score per result (None: not scored);
- ``needs_scoring(result)``; ``commit(result, scores or None) -> row``;
  ``fail(item, result or None, stage, message) -> row``, ``stage`` being one of:

  ``EXPLAIN``  the explainer's code raised for the batch (message: one line of the cause);
  ``SEGMENT``  the segmenter's code raised for the batch;
  ``SCHEDULE`` the scheduler gave up: retries spent, or every actor of a kind died for good.

Behaviour:

- Work in flight is bounded: ``in_flight_per_actor`` batches per explainer; segmenters queue their
  calls themselves.
- A batch whose actor died (or whose node vanished) is re-submitted to a healthy actor, up to
  ``task_retries`` times; Ray restarts the actor, and a ``ready()`` probe says when it is back (a
  probe that raises ``ActorDiedError`` means it is dead for good). Lost images re-run the
  explanation; a dead segmenter has the same images scored on a healthy one (nothing is
  re-optimised). An exception inside a task fails every item of that batch.
- ``commit`` and ``fail`` run on a small thread pool so storage latency overlaps the next results.
- Progress goes to a callback (:mod:`dxray.progress`: ``Queued``, ``TaskCommitted`` / ``TaskFailed``, ``Retried``,
  ``Tallied``, ``Done``) and, every
  ``log_every_s``, one summary line to the log, which is what ``ray job logs`` shows.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import ray
from ray import ObjectRef
from ray.exceptions import ActorDiedError, ObjectLostError, OwnerDiedError, RayError, RayTaskError

from dxray import progress as events
from dxray.errors import one_line

log = logging.getLogger("dxray")

EXPLAIN = "explain"  # the explainer's task code raised
SEGMENT = "segment"  # the segmenter's task code raised
SCHEDULE = "schedule"  # gave up: retries spent, or every actor of a kind died for good



@dataclass
class Batch:
    items: list
    attempt: int = 0


@dataclass
class _Explaining:
    """A batch in flight on explainer ``actor``."""

    batch: Batch
    actor: int
    images: ObjectRef


@dataclass
class _Explained:
    """An explained batch waiting for a segmenter: its results, the images to score, and which
    results need scoring (indices into ``batch.items`` and ``results``)."""

    batch: Batch
    results: list
    images: ObjectRef
    scored: list[int]


@dataclass
class _Scoring:
    """An explained batch in flight on segmenter ``actor``."""

    explained: _Explained
    actor: int


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
        self.probes: dict[ObjectRef, int] = {}
        self.last_error = ""

    def pick(self) -> int | None:
        free = [i for i in range(len(self.actors)) if i not in self.down and self.load[i] < self.limit]
        return min(free, key=self.load.__getitem__) if free else None

    def failed(self, i: int, err: BaseException) -> None:
        self.last_error = one_line(err)
        self.down.setdefault(i, 0.0)

    def dead(self) -> bool:
        return bool(self.actors) and all(self.down.get(i) == float("inf") for i in range(len(self.actors)))

    def probe(self) -> None:
        now = time.monotonic()
        probing = set(self.probes.values())
        for i, when in self.down.items():
            if when <= now and i not in probing:
                self.probes[self.actors[i].ready.remote()] = i

    def on_probe(self, ref: ObjectRef) -> None:
        i = self.probes.pop(ref)
        try:
            ray.get(ref)
        except ActorDiedError as err:  # not restarting: its constructor failed again
            self.last_error = one_line(err)
            self.down[i] = float("inf")
        except Exception:  # still restarting
            self.down[i] = time.monotonic() + 1.0
        else:
            self.down.pop(i, None)


@dataclass
class _Run:
    """The state of one ``Scheduler.run``."""

    queue: deque[Batch]  # batches waiting for an explainer (retries go first)
    tally: Tally
    explainers: _Pool
    segmenters: _Pool
    commits: ThreadPoolExecutor
    to_score: deque[_Explained] = field(default_factory=deque)  # waiting for a healthy segmenter
    pending: dict[ObjectRef, _Explaining | _Scoring] = field(default_factory=dict)
    futures: deque[Future] = field(default_factory=deque)  # commits and failures, in submission order
    rows: list[dict] = field(default_factory=list)  # committed rows, in completion order
    last_log: float = field(default_factory=time.monotonic)


def _system_failure(err: BaseException) -> bool:
    """An actor or node died (retry), rather than the task's own code raising (an error row)."""
    return isinstance(err, RayError) and not isinstance(err, RayTaskError)


def _cause(err: BaseException) -> BaseException:
    """What a task's code raised (a ``RayTaskError`` wraps it)."""
    return getattr(err, "cause", None) or err


class Scheduler:
    def __init__(self, explainers: Sequence, segmenters: Sequence, *,
                 explain: Callable[[object, list], tuple[ObjectRef, ObjectRef]],
                 score: Callable[[object, ObjectRef, list], ObjectRef],
                 needs_scoring: Callable[[object], bool],
                 commit: Callable[[object, object | None], dict],
                 fail: Callable[[object, object | None, str, str], dict],
                 in_flight_per_actor: int = 2, task_retries: int = 3, log_every_s: float = 30.0,
                 progress: events.Hook | None = None, commit_threads: int = 8):
        if not explainers:
            raise ValueError("the scheduler needs at least one explainer actor")
        self.explainers = list(explainers)
        self.segmenters = list(segmenters)
        self.explain = explain
        self.score = score
        self.needs_scoring = needs_scoring
        self.commit = commit
        self.fail = fail
        self.in_flight = in_flight_per_actor
        self.retries = task_retries
        self.log_every = log_every_s
        self.progress = progress or events.silent
        self.commit_threads = commit_threads

    def run(self, items: list, batch_size: int) -> list[dict]:
        """Explain, score and commit every item; returns the committed rows (in completion order)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        queue = deque(Batch(items[i:i + batch_size]) for i in range(0, len(items), batch_size))
        self.progress(events.Queued(len(items), len(queue), len(self.explainers)))
        with ThreadPoolExecutor(self.commit_threads, thread_name_prefix="dxray-commit") as commits:
            r = _Run(queue, Tally(len(items)), _Pool(self.explainers, self.in_flight),
                     _Pool(self.segmenters, 1 << 30), commits)  # a segmenter queues its calls itself
            try:
                while r.queue or r.pending or r.to_score:
                    self._step(r)
                self._drain(r, block=True)
            finally:
                for f in r.futures:  # started commits finish (the pool waits); queued ones are dropped
                    f.cancel()
        log.info(r.tally.line())
        self.progress(events.Done(r.tally.line()))
        return r.rows

    # -- the loop ----------------------------------------------------------------------------------
    def _step(self, r: _Run) -> None:
        self._give_up_on_dead_pools(r)
        r.explainers.probe()
        r.segmenters.probe()
        while r.queue and (i := r.explainers.pick()) is not None:
            self._submit_explain(r, r.queue.popleft(), i)
        while r.to_score and (j := r.segmenters.pick()) is not None:
            self._submit_score(r, r.to_score.popleft(), j)
        waiting_on = [*r.pending, *r.explainers.probes, *r.segmenters.probes]
        if not waiting_on:
            time.sleep(0.2)  # every actor is restarting: wait for the next probe
            return
        ready, _ = ray.wait(waiting_on, num_returns=1, timeout=min(self.log_every, 1.0))
        for ref in ready:
            if ref in r.explainers.probes:
                r.explainers.on_probe(ref)
            elif ref in r.segmenters.probes:
                r.segmenters.on_probe(ref)
            elif isinstance(p := r.pending.pop(ref), _Explaining):
                self._on_explained(r, ref, p)
            else:
                self._on_scored(r, ref, p)
        self._drain(r, block=False)
        if time.monotonic() - r.last_log >= self.log_every:
            r.last_log = time.monotonic()
            log.info(r.tally.line())
            self.progress(events.Tallied(r.tally.line()))

    def _give_up_on_dead_pools(self, r: _Run) -> None:
        """Every actor of a kind gone for good: what waits for that kind cannot run."""
        if r.explainers.dead() and r.queue:
            message = f"every explainer actor died: {r.explainers.last_error}"
            for batch in r.queue:
                for item in batch.items:
                    self._fail(r, item, None, SCHEDULE, message)
            r.queue.clear()
        if r.segmenters.dead() and r.to_score:
            message = f"every segmenter actor died: {r.segmenters.last_error}"
            for e in r.to_score:
                for k in e.scored:
                    self._fail(r, e.batch.items[k], e.results[k], SCHEDULE, message)
            r.to_score.clear()

    # -- submission --------------------------------------------------------------------------------
    def _submit_explain(self, r: _Run, batch: Batch, i: int) -> None:
        r.explainers.load[i] += 1
        results, images = self.explain(self.explainers[i], batch.items)
        r.pending[results] = _Explaining(batch, i, images)

    def _submit_score(self, r: _Run, e: _Explained, j: int) -> None:
        r.segmenters.load[j] += 1
        r.pending[self.score(self.segmenters[j], e.images, e.results)] = _Scoring(e, j)

    def _commit(self, r: _Run, result, scores) -> None:
        r.futures.append(r.commits.submit(self.commit, result, scores))

    def _fail(self, r: _Run, item, result, stage: str, message: str) -> None:
        r.futures.append(r.commits.submit(self.fail, item, result, stage, message))

    def _retry_or_fail(self, r: _Run, batch: Batch, why: str, results: list | None = None) -> None:
        """Explain ``batch`` again, or (retries spent) fail its items, with their ``results`` if known."""
        if batch.attempt < self.retries:
            r.tally.retried += len(batch.items)
            log.warning("dxray: re-submitting %d task(s) after %s (attempt %d of %d)", len(batch.items), why,
                        batch.attempt + 2, self.retries + 1)
            r.queue.appendleft(Batch(batch.items, batch.attempt + 1))
            self.progress(events.Retried(len(batch.items), why, batch.attempt + 2))
        else:
            message = f"gave up after {self.retries + 1} attempts: {why}"
            for k, item in enumerate(batch.items):
                self._fail(r, item, results[k] if results else None, SCHEDULE, message)

    def _drain(self, r: _Run, block: bool) -> None:
        while r.futures and (block or r.futures[0].done()):
            row = r.futures.popleft().result()  # a storage failure past its retries ends the run here
            r.rows.append(row)
            if row["status"] == "ok":
                r.tally.done += 1
            else:
                r.tally.failed += 1
            self.progress(events.task_event(row))

    # -- results -----------------------------------------------------------------------------------
    def _on_explained(self, r: _Run, ref: ObjectRef, p: _Explaining) -> None:
        r.explainers.load[p.actor] -= 1
        try:
            results = ray.get(ref)
        except Exception as err:
            if _system_failure(err):
                r.explainers.failed(p.actor, err)
                self._retry_or_fail(r, p.batch, f"explainer {p.actor} failed ({type(err).__name__})")
            else:  # the task code raised: every item of the batch fails with it
                message = one_line(_cause(err))
                for item in p.batch.items:
                    self._fail(r, item, None, EXPLAIN, message)
            return
        scored = [k for k, res in enumerate(results) if self.needs_scoring(res)] if self.segmenters else []
        for k, res in enumerate(results):
            if k not in scored:
                self._commit(r, res, None)
        if scored:
            r.to_score.append(_Explained(p.batch, results, p.images, scored))

    def _on_scored(self, r: _Run, ref: ObjectRef, p: _Scoring) -> None:
        r.segmenters.load[p.actor] -= 1
        e = p.explained
        try:
            scores = ray.get(ref)
        except Exception as err:
            items = [e.batch.items[k] for k in e.scored]
            results = [e.results[k] for k in e.scored]
            if isinstance(err, ObjectLostError | OwnerDiedError):  # the images are gone: explain again
                self._retry_or_fail(r, Batch(items, e.batch.attempt), f"images lost ({type(err).__name__})", results)
            elif _system_failure(err):  # the segmenter died: score the same images on a healthy one
                r.segmenters.failed(p.actor, err)
                if e.batch.attempt < self.retries:
                    r.to_score.append(replace(e, batch=Batch(e.batch.items, e.batch.attempt + 1)))
                else:
                    self._retry_or_fail(r, Batch(items, e.batch.attempt),
                                        f"segmenter {p.actor} failed ({type(err).__name__})", results)
            else:  # the segmenter's code raised for this batch
                message = one_line(_cause(err))
                for item, res in zip(items, results, strict=True):
                    self._fail(r, item, res, SEGMENT, message)
            return
        for k in e.scored:
            self._commit(r, e.results[k], scores[k])
