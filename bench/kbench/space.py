"""One doit "world" (flavors, state and outputs directories) and timed `doit` processes in it,
with what they ran parsed from doit's console or json reporter."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.config import load_flavors
from tasks.matrix import Build, expand
from tasks.state import Paths
from tests.harness import ALWAYS_RUN, buildkit_steps

from . import ROOT
from .common import BenchError


@dataclass(frozen=True)
class Space:
    """A flavors directory with its state and outputs directories: one doit "world"."""

    flavors: Path
    state: Path
    outputs: Path

    @classmethod
    def under(cls, root: Path) -> "Space":
        return cls(root / "flavors", root / "state", root / "outputs")

    @property
    def paths(self) -> Paths:
        return Paths(self.state, self.outputs)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("KAIROS_VERBOSE", "KAIROS_SHARD")}
        env.update(KAIROS_FLAVORS=str(self.flavors), KAIROS_STATE=str(self.state),
                   KAIROS_OUTPUTS=str(self.outputs))
        return env

    def builds(self) -> list[Build]:
        return expand(load_flavors([self.flavors]))


@dataclass
class Run:
    """One doit process: wall time, the tasks it ran and the up-to-date ones."""

    wall: float
    executed: list[str]
    uptodate: list[str]
    elapsed: dict[str, float] = field(default_factory=dict)   # json reporter only
    outputs: dict[str, str] = field(default_factory=dict)     # json reporter only: task -> output

    @property
    def build_actions(self) -> list[str]:
        return [t for t in self.executed if not t.startswith(ALWAYS_RUN)]

    @property
    def checked(self) -> int:
        return len(self.executed) + len(self.uptodate)


def has_actions(name: str) -> bool:
    """False for doit's group tasks (`squashfs`, `build:<stem>`): they run nothing."""
    return (":" in name or name == "preflight") and not name.startswith("build:")


def parse_console(wall: float, out: str) -> Run:
    lines = out.splitlines()
    return Run(wall, [l[3:].strip() for l in lines if l.startswith(".  ")],
               [l[3:].strip() for l in lines if l.startswith("-- ")])


def parse_json(wall: float, out: str) -> Run:
    data = json.loads(out[out.index("{"):])
    tasks = [t for t in data["tasks"] if has_actions(t["name"])]
    return Run(wall, [t["name"] for t in tasks if t["result"] == "success"],
               [t["name"] for t in tasks if t["result"] == "up-to-date"],
               {t["name"]: t["elapsed"] for t in tasks if t["elapsed"] is not None},
               {t["name"]: t["out"] for t in tasks})


def doit(space: Space, *args: str, json_report: bool = False, env: dict[str, str] | None = None) -> Run:
    """Run `python3 -m doit -f dodo.py ARGS` as a whole process and time it (``env``: more variables)."""
    argv = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"),
            *(["--reporter", "json"] if json_report else []), *args]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**space.env(), **(env or {})}, cwd=ROOT,
                          stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"doit {' '.join(args)} failed ({proc.returncode}) in {space.state}:\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return parse_json(wall, proc.stdout) if json_report else parse_console(wall, proc.stdout)


def expect_ran(run: Run, expected: list[str], what: str) -> None:
    if sorted(run.build_actions) != sorted(expected):
        raise BenchError(f"{what}: expected {expected} to run, got {run.build_actions}")


def unlink_outputs(*files: Path) -> None:
    for f in files:
        f.unlink(missing_ok=True)
        f.with_name(f.name + ".sha256").unlink(missing_ok=True)


def run_step_cached(build_output: str) -> bool:
    """True when BuildKit took every RUN step of the conversion from its cache (other steps, FROM
    and COPY, are often cached anyway)."""
    runs = [hit for step, hit in buildkit_steps(build_output).items() if step.startswith("RUN ")]
    return bool(runs) and all(runs)
