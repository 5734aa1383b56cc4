"""What a runner tells its caller while an audit runs: one small frozen dataclass per event (typed hooks, as
Lightning's ``Callback``, instead of an event name and a dict).

Both runners (``pipeline/local.py``, ``distributed/audit.py``) and the Ray scheduler call a :data:`Hook` with
these, in this order: :class:`Preflighted`, :class:`Planned`, then (Ray) :class:`ActorsStarted` and
:class:`Queued`; while batches run :class:`Step` (in-process), :class:`TaskCommitted` / :class:`TaskFailed` once
per task, :class:`Retried` and, every ``cluster.log_every_s``, :class:`Tallied` (Ray); :class:`Done` (Ray) at the
end. The CLI's bar, ``benchmarks/`` and any Python caller consume them; a hook that raises stops the run as any
error there would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preflighted:
    """Every check that needs no model passed: models load (in process) or Ray starts next."""


@dataclass(frozen=True)
class Planned:
    """The plan: ``planned`` tasks, ``skipped`` of them committed before (a resumed run), ``todo`` to run, written
    under ``root``; on Ray also the explainer actors to start and where (``local`` or the cluster's address)."""

    planned: int
    skipped: int
    todo: int
    root: str
    explainers: int | None = None
    cluster: str | None = None


@dataclass(frozen=True)
class ActorsStarted:
    """Ray: the actors that will run this session's tasks."""

    explainers: int
    gpus_per_explainer: float
    segmenters: int


@dataclass(frozen=True)
class Queued:
    """Ray: the scheduler has ``tasks`` in ``batches`` for ``explainers`` actors."""

    tasks: int
    batches: int
    explainers: int


@dataclass(frozen=True)
class Step:
    """In process: optimisation step ``step`` of ``steps`` of the batch ``tasks`` (``kind:class`` names), with
    the batch's mean last loss."""

    step: int
    steps: int
    tasks: str
    loss: float


@dataclass(frozen=True)
class _TaskRow:
    row: dict = field(repr=False)  # the task row as written

    @property
    def task_id(self) -> str:
        return self.row["task_id"]


@dataclass(frozen=True)
class TaskCommitted(_TaskRow):
    """A task's samples and its row (status ok) are on storage: ``row`` as written."""


@dataclass(frozen=True)
class TaskFailed(_TaskRow):
    """A task failed; its row (with the error, labelled by stage) is on storage, the other tasks go on."""

    @property
    def error(self) -> str | None:
        return self.row.get("error")


@dataclass(frozen=True)
class Retried:
    """Ray: ``tasks`` of a batch are explained again (attempt ``attempt``) after ``why``."""

    tasks: int
    why: str
    attempt: int


@dataclass(frozen=True)
class Tallied:
    """Ray: the periodic one-line tally (``cluster.log_every_s``), as the log writes it."""

    line: str


@dataclass(frozen=True)
class Done:
    """Ray: the scheduler has committed or failed every task; ``line`` is the final tally."""

    line: str


Event = Preflighted | Planned | ActorsStarted | Queued | Step | TaskCommitted | TaskFailed | Retried | Tallied | Done
Hook = Callable[[Event], None]


def task_event(row: dict) -> TaskCommitted | TaskFailed:
    """The event of a task row just written."""
    return TaskCommitted(row) if row.get("status") == "ok" else TaskFailed(row)


def silent(event: Event) -> None:
    """The hook of a caller that wants none."""
