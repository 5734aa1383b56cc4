"""The runners' progress events (dxray.progress, issue 32): typed, in order, one per committed or failed task."""

from dxray import progress as ev
from dxray.pipeline.local import run


def test_the_in_process_runner_reports_preflight_plan_steps_and_each_task_in_order(tiny_config):
    events = []
    summary = run(tiny_config, progress=events.append)
    kinds = [type(e) for e in events]
    assert kinds[:2] == [ev.Preflighted, ev.Planned]
    planned = events[1]
    assert (planned.planned, planned.skipped, planned.todo) == (summary.planned, 0, summary.planned)
    assert planned.root == summary.root and planned.explainers is None
    tasks = [e for e in events if isinstance(e, ev.TaskCommitted | ev.TaskFailed)]
    assert len(tasks) == summary.planned and sum(isinstance(e, ev.TaskCommitted) for e in tasks) == summary.ok
    assert len({e.task_id for e in tasks}) == len(tasks)
    steps = [e for e in events if isinstance(e, ev.Step)]
    assert steps and {s.steps for s in steps} == {tiny_config.optimize.steps}
    assert [s.step for s in steps[:tiny_config.optimize.steps]] == list(range(1, tiny_config.optimize.steps + 1))
    assert kinds.index(ev.Step) < kinds.index(next(type(e) for e in tasks))  # a batch's steps come before its tasks

    again = []  # a resumed run: everything was committed, nothing runs
    run(tiny_config, progress=again.append)
    assert [type(e) for e in again] == [ev.Preflighted, ev.Planned]
    assert (again[1].skipped, again[1].todo) == (summary.planned, 0)
