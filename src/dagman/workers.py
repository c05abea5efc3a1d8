"""Worker processes for the data builders (``data prepare``, ``data nodules``): the one process pool of the package.

:func:`run_tasks` runs ``fn(task)`` for every task, in this process (one worker) or in a spawn-context pool, and
calls ``on_done(task, result)`` as each finishes. It survives its workers dying: when a worker process dies
(a crash, an out-of-memory kill), the tasks that were in flight are re-run one at a time in a fresh pool, which
pins the culprit; that task gets ``crash(task)`` as its result and the others complete. Workers ignore Ctrl-C
(the parent stops handing out work and lets running tasks finish, so no file is left half-written), run with
``threads`` BLAS / OpenMP / ITK / torch threads each, and exit when their parent dies (a SIGKILLed parent would
otherwise leave them blocked on the task queue, holding the terminal's pipes).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from typing import Any, Callable, Sequence

from dagman.errors import DataError

__all__ = ["THREAD_ENV_VARS", "run_tasks"]

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


@contextlib.contextmanager
def _thread_env_for_children(threads: int):
    """Set the thread-count variables while worker processes are spawned (a spawned child reads them before
    its libraries load); the parent's own, already loaded libraries are unaffected. Restored afterwards."""
    saved = {var: os.environ.get(var) for var in THREAD_ENV_VARS}
    os.environ.update({var: str(threads) for var in THREAD_ENV_VARS})
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _init_worker(threads: int, initializer: Callable | None, initargs: tuple) -> None:
    """Worker start: leave Ctrl-C to the parent, cap SimpleITK's (and torch's, if loaded) thread pools at
    ``threads``, watch the parent, then the caller's ``initializer(*initargs)``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    except Exception:  # pragma: no cover - SimpleITK is a dependency; keep workers alive regardless
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    _exit_with_parent()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(poll_s: float = 0.5) -> None:
    """End this worker when its parent dies: a daemon thread polls the parent pid (a task being written is
    abandoned as a temporary file the next run removes)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="dagman-parent-watch", daemon=True).start()


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence, workers: int, on_done: Callable[[Any, Any], None], *,
              crash: Callable[[Any], Any], initializer: Callable | None = None, initargs: tuple = (),
              stop_on: tuple[type[BaseException], ...] = (),
              unexpected: Callable[[Any, str], Any] | None = None,
              give_up: str = "worker processes keep dying before finishing any task; try --workers 1") -> None:
    """``fn(task)`` for every task; ``on_done(task, result)`` as each finishes (module docstring).

    ``workers <= 1`` (or a single task): in this process, in order, ``initializer`` not called. Otherwise a
    spawn pool of ``workers`` processes (``fn``, the tasks and ``initializer`` must be picklable) with at most
    ``2 * workers`` tasks in flight. ``crash(task)``: the result of a task whose worker died. An exception of a
    type in ``stop_on`` raised by ``fn`` stops everything (re-raised); any other exception of ``fn`` becomes
    ``unexpected(task, message)`` (default: re-raised). Three pools in a row that break before finishing any
    task raise :class:`DataError` ``give_up``."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            on_done(task, fn(task))
        return
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // workers)
    queue = deque(tasks)
    suspects: deque = deque()  # tasks in flight when a worker died: retried alone
    context = multiprocessing.get_context("spawn")
    with _thread_env_for_children(threads):
        _run_in_pools(queue, suspects, workers, context, (threads, initializer, initargs), fn, on_done, crash,
                      stop_on, unexpected, give_up)


def _run_in_pools(queue: deque, suspects: deque, workers: int, context, init: tuple, fn, on_done, crash, stop_on,
                  unexpected, give_up: str) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    finished = [0]

    def done_one(task, result) -> None:
        finished[0] += 1
        on_done(task, result)

    barren_pools = 0  # consecutive pools that broke before finishing any task
    while queue or suspects:
        if barren_pools >= 3:
            raise DataError(give_up)
        finished_before = finished[0]
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker, initargs=init)
        inflight: dict = {}
        broken = False

        def submit(task, alone: bool) -> bool:
            try:
                inflight[pool.submit(fn, task)] = (task, alone)
                return True
            except BrokenProcessPool:  # a worker died since the last check: put the task back
                (suspects if alone else queue).appendleft(task)
                return False

        try:
            while (queue or suspects or inflight) and not broken:
                if suspects:
                    if not inflight:
                        broken = not submit(suspects.popleft(), True)
                elif not any(alone for _, alone in inflight.values()):
                    while queue and len(inflight) < 2 * workers and not broken:
                        broken = not submit(queue.popleft(), False)
                if not inflight:
                    continue
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    task, alone = inflight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        if alone:
                            done_one(task, crash(task))
                        else:
                            suspects.append(task)
                        continue
                    except stop_on:
                        raise
                    except Exception as err:  # e.g. a result that could not be sent back
                        if unexpected is None:
                            raise
                        result = unexpected(task, f"unexpected error in the worker ({type(err).__name__}: {err})"[:200])
                    done_one(task, result)
            if broken:  # the other tasks in flight died with the pool: retry them one at a time
                suspects.extend(task for task, _ in inflight.values())
                inflight.clear()
        except BaseException:
            # Ctrl-C or an error in on_done: hand out nothing new; running tasks finish and are recorded.
            pool.shutdown(wait=True, cancel_futures=True)
            for fut, (task, _) in list(inflight.items()):
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    done_one(task, fut.result())
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        barren_pools = barren_pools + 1 if finished[0] == finished_before else 0
