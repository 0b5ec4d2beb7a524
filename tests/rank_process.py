"""The entry point of a rank process that a test spawns (``torch.multiprocessing.spawn``).

CI twice saw a gloo rank die by SIGABRT ("terminate called without an active exception")
while its peer was still alive, on a loaded machine, in tests whose every other run passes;
it never reproduced here (80 spawns under 3-4 busy processes, one core). The message is
libstdc++'s for a ``std::thread`` destroyed while joinable, which is what C++ objects of
torch's process-group machinery left to the interpreter's exit can do. So a rank spawned
by a test, once its body has returned (it wrote its results and destroyed its process
group), leaves with ``os._exit(0)``: nothing runs after the test's own code. A rank whose
body raises exits as before, through torch's error file. And should a rank still die by a
signal, torch's fatal-signal handler prints the C++ stack of every thread first, so the
next report says where.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch


def rank_process(body: Callable[..., None]) -> Callable[..., None]:
    """Wrap a spawned rank's ``body(rank, *args)``: C++ stack traces on a fatal signal,
    and on return a flush of stdout/stderr and ``os._exit(0)`` (no interpreter teardown)."""

    @functools.wraps(body)
    def run(rank: int, *args: Any) -> None:
        torch._C._set_print_stack_traces_on_fatal_signal(True)
        body(rank, *args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    return run


def spawn_with_deadline(worker: Callable[..., None], args: tuple[Any, ...], world: int, timeout_s: float) -> None:
    """``world`` ranks of ``worker(rank, *args)``, joined with a deadline: a rank stuck in a collective
    fails the calling test (its processes terminated) instead of hanging it."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the {world}-rank runs did not finish in {timeout_s} s (a rank hung?)")
