"""Glue between the flavor matrix and doit: the context, the task-dict helper, the action
guard, the task creator of each artifact kind (dodo.py lists the other stages), the reporter
and the doit configuration.

Loading never contacts Docker or a registry: it reads flavor files and lists
overlay directories, nothing else.
"""
from __future__ import annotations

import fcntl
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
import urllib3
from doit.dependency import UptodateCalculator
from doit.exceptions import TaskError, TaskFailed
from doit.tools import config_changed
from doit.reporter import ConsoleReporter

from .config import load_flavors
from .matrix import Build, duplicate_problems, expand, parse_shard, shard
from .model import ConfigError, Flavor
from .run import KairosError, UsageError
from .state import Paths, clean_scratch, file_identity, same_identity


@dataclass(frozen=True)
class Context:
    """Everything the stage task generators need."""

    root: Path
    paths: Paths
    flavors: tuple[Flavor, ...]
    builds: tuple[Build, ...]


def flavor_sources(root: Path, value: str | None) -> list[Path]:
    """KAIROS_FLAVORS / `flavors=` (os.pathsep-separated files or dirs), default `flavors/`."""
    if not value:
        return [root / "flavors"]
    return [Path(p) if os.path.isabs(p) else Path.cwd() / p for p in value.split(os.pathsep) if p]


def select_builds(flavors: tuple[Flavor, ...], shard_text: str | None) -> list[Build]:
    builds = expand(flavors)
    problems = duplicate_problems(builds)
    if problems:
        raise ConfigError(problems)
    if shard_text:
        try:
            index, count = parse_shard(shard_text)
        except ValueError as exc:
            raise ConfigError([f"shard: {exc}"]) from None
        builds = shard(builds, index, count)
    return builds


def load(root: Path, flavors: str | None = None, shard_text: str | None = None) -> Context:
    """Build the context, or print every config problem and exit with status 2."""
    try:
        loaded = load_flavors(flavor_sources(root, flavors))
        builds = select_builds(loaded, shard_text)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in the flavor files; nothing was built", file=sys.stderr)
        raise SystemExit(2) from None
    return Context(root=root, paths=Paths.from_env(root), flavors=loaded, builds=tuple(builds))


# --- actions --------------------------------------------------------------------

def _guarded(fn, args):
    try:
        fn(*args)
    except KairosError as exc:
        return TaskError(str(exc)) if exc.kind == "error" else TaskFailed(str(exc))
    except (requests.exceptions.ConnectionError, urllib3.exceptions.ProtocolError) as exc:
        # a stream from the Docker engine (push, pull, copy out of a container) broken mid-way: the
        # engine (or the registry behind it) stopped; found when dockerd was stopped mid-push
        return TaskError(f"the connection to the Docker engine broke ({exc}); "
                         "start it again (bash ci/setup.sh) and rerun")
    except OSError as exc:  # full disk, permissions, ...: name the path, no traceback
        where = exc.filename or ""
        return TaskError(f"{exc.strerror or exc}{': ' + str(where) if where else ''}")
    return None


def action(fn, *args):
    """A doit python-action that turns KairosError into a clean one-message failure."""
    return (_guarded, (fn, args))


TARGETS_VALUE = "_targets"  # the task value holding {target: file_identity} after a success


class targets_unchanged(UptodateCalculator):
    """doit `uptodate`: a task is out of date when one of its targets is no longer what it
    wrote. doit itself checks only `file_dep` and that targets exist, so a corrupted or
    replaced artifact would be judged up to date.

    After each successful run the identity (`state.file_identity`: size and mtime, one stat)
    of every target is saved with the task's values; the check compares it and returns False
    on a difference, else None (no opinion: doit decides as before, so a task without
    file_dep still always runs). doit's missing-target check covers deleted targets
    (`doit clean` included). A task doit has a success record for but without saved
    identities (state of an older pipeline, e.g. a restored CI cache) adopts its existing
    targets as they are, without a rebuild: the identities are written into doit's DB
    during the check, and from then on compared. What a `.sha256` covers is not re-hashed.
    """

    def __init__(self):
        super().__init__()
        self.dep_manager = None

    def setup(self, dep_manager, tasks_dict):
        super().setup(dep_manager, tasks_dict)
        self.dep_manager = dep_manager

    def configure_task(self, task):
        task.value_savers.append(lambda: {TARGETS_VALUE: identities(task.targets)})

    def __call__(self, task, values):
        recorded = values.get(TARGETS_VALUE) or {}
        adopt = {}
        for target in task.targets:
            if target not in recorded:
                current = file_identity(target)
                if current is not None:
                    adopt[target] = current
            elif not same_identity(recorded[target], file_identity(target)):
                return False
        if adopt and self.dep_manager is not None and self.get_val(task.name, "checker:") is not None:
            self.dep_manager._set(task.name, "_values_:", {**values, TARGETS_VALUE: {**recorded, **adopt}})
        return None

    def __repr__(self):
        return "targets_unchanged()"


def identities(targets) -> dict[str, list[int]]:
    """Target -> `file_identity` of the targets that exist."""
    out = {}
    for target in targets:
        current = file_identity(target)
        if current is not None:
            out[target] = current
    return out


def task(name: str, doc: str, act, *, file_dep=(), targets=(), key: str | None = None, uptodate=(),
         **more) -> dict:
    """One doit subtask: ``act`` (made by `action`), file dependencies and targets (paths);
    out of date also when `config_changed(key)` (``key`` given), any of ``uptodate`` says so,
    or a target is no longer what the task wrote (`targets_unchanged`; not added when
    ``uptodate`` holds False: the task always runs). `doit clean` removes the targets.
    Output verbosity is DOIT_CONFIG's (see doit_config)."""
    checks = ([config_changed(key)] if key is not None else []) + list(uptodate)
    if targets and not any(c is False for c in checks):
        checks.append(targets_unchanged())
    out = {"name": name, "doc": doc, "actions": [act], "file_dep": [str(p) for p in file_dep],
           "targets": [str(p) for p in targets], "clean": True}
    if checks:
        out["uptodate"] = checks
    out.update(more)
    return out


def kind_task(ctx: Context, kind) -> Callable:
    """The doit task creator of one artifact kind: its stage module's `tasks(ctx, kind)`,
    documented by the registry entry (the `doit list` text)."""
    module = importlib.import_module(f"{__package__}.stages.{kind.stage}")

    def creator():
        yield from module.tasks(ctx, kind.name)

    creator.__doc__ = kind.doc
    creator.__name__ = f"task_{kind.name}"
    return creator


def _refuse(message: str) -> None:
    raise UsageError(message)


def refused_task(name: str, doc: str, message: str) -> dict:
    """A subtask that cannot be built: running it fails with ``message`` (exit 2), writes nothing."""
    return {"name": name, "doc": f"{doc} (cannot be built: see the message)", "actions": [action(_refuse, message)]}


class Reporter(ConsoleReporter):
    """doit's console reporter, but known errors print as `error: <task>: <message>`
    on stderr without tracebacks or repeated output blocks."""

    desc = "kairos console output"

    def _write_failure(self, result, write_exception=True):
        fail = result["exception"]
        task = result["task"].name
        if fail.traceback:
            super()._write_failure(result, write_exception)
            return
        sys.stderr.write(f"error: {task}: {fail.message}\n")
        sys.stderr.flush()

    def complete_run(self):
        # output is streamed live (verbosity 2); do not print it again
        for msg in self.runtime_errors:
            sys.stderr.write(msg + "\n")


# doit commands that only read the state: no lock needed
READ_ONLY_COMMANDS = {"list", "info", "help", "tabcompletion", "dumpdb"}
_LOCK_HANDLE = None


def command_of(argv: list[str]) -> str:
    """The doit command in ``argv`` (doit's default command is run)."""
    for arg in argv:
        if not arg.startswith("-") and "=" not in arg:
            return arg
    return "run"


def lock_state(paths: Paths, argv: list[str]) -> None:
    """Hold an exclusive lock on the state directory for this process's lifetime.

    A second run on the same state stops at once instead of racing the first
    one's dependency DB and digest files.
    """
    global _LOCK_HANDLE
    if command_of(argv) in READ_ONLY_COMMANDS:
        return
    lock = paths.lock_file
    handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        print(f"error: another doit run (pid {owner}) is using the state directory {paths.state}; "
              "wait for it to finish or stop it", file=sys.stderr)
        raise SystemExit(2) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCK_HANDLE = handle
    clean_scratch(paths)  # no other run uses this state now: what is in its tmp/ was left by a killed one


def doit_config(ctx: Context) -> dict:
    ctx.paths.state.mkdir(parents=True, exist_ok=True)
    lock_state(ctx.paths, sys.argv[1:])
    return {
        "dep_file": str(ctx.paths.dep_file),
        "backend": "sqlite3",
        "verbosity": 2,
        "reporter": Reporter,
        "action_string_formatting": "new",
    }
