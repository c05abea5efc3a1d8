"""The package's one process pool (dagman.workers.run_tasks), as the nodule builder drives it."""

from __future__ import annotations

import os

import pytest


def _render(task):
    """Worker function (imported by name in the spawned workers): a dying worker on 'die', a raising one on
    'fail'."""
    if task == "die":
        os._exit(3)
    if task == "fail":
        raise KeyError("boom")
    return task * 10


def test_nodule_runner_keeps_order_and_pins_a_dying_worker():
    from dagman.data.nodules import _run

    tasks = [1, 2, "die", 4, 5]
    out = _run(_render, tasks, 2, None, (), False, "t", crash=lambda t: ("crashed", t))
    assert out == [10, 20, ("crashed", "die"), 40, 50]
    assert _run(_render, [1, 2, 3], 1, None, (), False, "t", crash=lambda t: None) == [10, 20, 30]  # in-process


def test_errors_of_the_task_function_stop_or_become_a_result():
    from dagman.workers import run_tasks

    seen = {}
    run_tasks(_render, [1, "fail", 3], 2, seen.__setitem__, crash=lambda t: "crash",
              unexpected=lambda t, msg: msg)
    assert seen[1] == 10 and seen[3] == 30 and "KeyError" in seen["fail"]
    with pytest.raises(KeyError):
        run_tasks(_render, [1, "fail", 3], 2, lambda t, r: None, crash=lambda t: "crash", stop_on=(KeyError,))
