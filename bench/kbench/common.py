"""What every part of the bench uses: its error, the progress log, commands, medians and the
Row the benchmarks return."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field


class BenchError(Exception):
    """A precondition or correctness check failed: printed as one message, exit status 1."""


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries the table only."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def sh(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command (no shell), stdin closed unless given; raise BenchError on failure."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise BenchError(f"command failed ({proc.returncode}): {' '.join(map(str, argv))}\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Row:
    name: str
    benchmark: str
    result: str
    goal: str
    met: str
    data: dict = field(default_factory=dict)
