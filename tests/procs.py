"""Helpers for tests that start real processes."""
from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable, Sequence


def run_together(target: Callable[..., Any], args_per_process: Sequence[tuple], timeout_s: float) -> None:
    """Start one spawned process per args tuple, released together by a barrier passed as the
    last argument; all must exit 0 within ``timeout_s`` (stragglers are killed)."""
    ctx = mp.get_context("spawn")  # no fork: nothing of the test process is shared but the files
    barrier = ctx.Barrier(len(args_per_process))
    procs = [ctx.Process(target=target, args=(*args, barrier)) for args in args_per_process]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * len(procs)
