"""The one subprocess runner and the error types every stage raises.

Rules: argv lists only (never a shell), stdin closed unless data is fed,
``+ command`` printed when verbose, and a failure raises CommandError carrying
the exact command, its exit status and the tail of its output.
"""
from __future__ import annotations

import collections
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from .kinds import PROGRAMS

TAIL_LINES = 25
HEARTBEAT_SECONDS = 20.0


class KairosError(Exception):
    """An error the user can act on; printed as one message, never a traceback."""

    #: doit exit status class: "error" (2: bad input or environment) or "failed" (1).
    kind = "failed"


class UsageError(KairosError):
    """Bad input or a broken environment (missing tool, daemon down): exit 2."""

    kind = "error"


class CommandError(KairosError):
    """A program exited non-zero."""

    def __init__(self, argv: Sequence[str], status: int, tail: str, what: str = ""):
        self.argv = list(argv)
        self.status = status
        self.tail = tail
        self.what = what
        head = f"{what}: " if what else ""
        msg = f"{head}command failed with exit status {status}: {quote(argv)}"
        if tail.strip():
            msg += "\n  last output:\n" + "\n".join("    " + l for l in tail.rstrip().splitlines())
        super().__init__(msg)


def quote(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def verbose() -> bool:
    return os.environ.get("KAIROS_VERBOSE", "") not in ("", "0", "false", "no")


def say(message: str) -> None:
    """Progress output for long steps (always shown, flushed at once)."""
    print(message, flush=True)


def require_tool(name: str, purpose: str) -> str:
    """Return the full path of ``name`` (a program on PATH, or a data file `PROGRAMS` names the
    paths of) or raise a UsageError saying how to get it."""
    program = PROGRAMS.get(name)
    files = program.files if program else ()
    path = shutil.which(name) or next((f for f in files if os.path.isfile(f)), None)
    if path:
        return path
    provider = program.provider if program else f"a package that provides {name}"
    where = f" ({', '.join(files)})" if files else ""
    raise UsageError(f"cannot find {name}{where}, needed to {purpose}; install {provider}")


def run(
    argv: Sequence[str],
    *,
    what: str = "",
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    feed: Iterable[bytes] | None = None,
    show: bool = False,
    capture: bool = False,
    stdout: str | os.PathLike | None = None,
) -> str:
    """Run ``argv`` and return its output (stdout+stderr) if ``capture``.

    ``feed`` streams bytes into stdin (else stdin is closed). ``stdout`` names a file
    that receives the program's standard output (e.g. `xz --stdout`); its output is then
    its standard error alone. ``show`` echoes the program's output live (long steps);
    otherwise only a heartbeat line is printed every HEARTBEAT_SECONDS so long steps
    never look hung.
    """
    argv = [str(a) for a in argv]
    if verbose():
        say("+ " + quote(argv))
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    sink = open(stdout, "wb") if stdout is not None else None
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
            stdout=sink if sink is not None else subprocess.PIPE,
            stderr=subprocess.PIPE if sink is not None else subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
        )
    except FileNotFoundError:
        require_tool(argv[0], what or "run this step")
        raise
    finally:
        if sink is not None:
            sink.close()  # the child holds its own descriptor
    output = proc.stderr if sink is not None else proc.stdout
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    captured: list[str] = []

    def reader() -> None:
        assert output is not None
        for raw in output:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            # progress bars redraw with \r: keep only the last state of the line
            line = line.rsplit("\r", 1)[-1]
            if not line.strip():
                continue
            tail.append(line)
            if capture:
                captured.append(line)
            if show or verbose():
                sys.stdout.write("    " + line + "\n")
                sys.stdout.flush()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    feed_error: BaseException | None = None
    if feed is not None:
        assert proc.stdin is not None
        try:
            for chunk in feed:
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # the program died; its status and output tell why
        except BaseException as exc:  # noqa: BLE001 - re-raised after cleanup
            feed_error = exc
            proc.kill()
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
    started = time.monotonic()
    label = what or os.path.basename(argv[0])
    while True:
        try:
            status = proc.wait(timeout=HEARTBEAT_SECONDS)
            break
        except subprocess.TimeoutExpired:
            if not (show or verbose()):
                say(f"    ... {label}: still running ({time.monotonic() - started:.0f}s)")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    thread.join(timeout=10)
    if feed_error is not None:
        raise feed_error
    if status != 0:
        raise CommandError(argv, status, "\n".join(tail), what)
    return "\n".join(captured)
