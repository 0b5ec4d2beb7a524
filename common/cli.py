"""What every command line of the project shares: one-line errors with exit code 2, quiet pipes.

    parser = OneLineParser(prog="python -m experiments.train", ...)
    sys.exit(guarded(main))      # `... | head` ends quietly instead of in BrokenPipeError
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NoReturn

USAGE_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (what is wrong, where the usage is), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def fail(message: object) -> int:
    """Print ``error: <message>`` as one line on stderr; returns the exit code 2 for ``return fail(...)``."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return USAGE_ERROR


def guarded(main: Callable[[], int]) -> int:
    """``main()``, but a closed stdout (``| head``) ends it quietly, as it does for other Unix tools."""
    try:
        code = main()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit
        return 141  # 128 + SIGPIPE, as a shell reports a process killed by the pipe
