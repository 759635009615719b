"""Process pools for generation and rendering that fail loudly instead of hanging.

``multiprocessing.Pool`` replaces a worker that dies while starting (a failing initializer, a main module that
``spawn`` cannot re-import) with a new one, forever. ``ProcessPoolExecutor`` marks the pool broken instead, so the
parent gets an exception. Workers are started with ``spawn`` (each builds its own MuJoCo / OpenGL state; nothing is
inherited through ``fork``), and are terminated when the consumer stops early (Ctrl-C, an error).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterable, Iterator


def _terminate(executor: ProcessPoolExecutor) -> None:
    terminate = getattr(executor, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    processes = list((getattr(executor, "_processes", None) or {}).values())  # shutdown() forgets them
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)


def process_map(fn: Callable, items: Iterable, workers: int, initializer: Callable | None = None,
                initargs: tuple = (), ordered: bool = True, window: int | None = None) -> Iterator:
    """Yield ``fn(item)`` computed in ``workers`` spawned processes, at most ``window`` items in flight (default
    2 per worker, which bounds memory when results are large); in input order if ``ordered``, else as they finish."""
    window = window or 2 * workers
    executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=initializer,
                                   initargs=initargs)
    items = iter(items)
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            if ordered:
                future = pending.popleft()
                result = future.result()
            else:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                future = next(iter(done))
                pending.remove(future)
                result = future.result()
            for item in items:  # refill the window by one
                pending.append(executor.submit(fn, item))
                break
            yield result
    except BaseException:
        _terminate(executor)
        raise
    executor.shutdown(wait=True)
