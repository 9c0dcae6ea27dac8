"""state.py (atomic writes, checksums) and run.py (the one subprocess runner), with real files and programs."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.run import CommandError, KairosError, UsageError, require_tool, run
from tasks.state import (TMP_MARK, Paths, atomic_path, partial_name, safe_id, write_checksum, write_if_changed,
                         write_text_atomic)

# --- state: atomic writes ------------------------------------------------------------

class Boom(Exception):
    pass


@pytest.mark.parametrize("outcome", ["success", "exception", "no-file"])
@pytest.mark.parametrize("previous", [None, "old\n"])
def test_atomic_path(tmp_path, outcome, previous):
    out = tmp_path / "outputs" / "v3.1.0" / "kairos-x.iso"
    if previous is not None:
        out.parent.mkdir(parents=True)
        out.write_text(previous)
    expected = {"success": "new\n", "exception": previous, "no-file": previous}[outcome]
    raised = {"success": None, "exception": Boom, "no-file": KairosError}[outcome]

    def attempt():
        with atomic_path(out) as tmp:
            assert tmp.parent == out.parent and tmp != out
            assert tmp.name.startswith(f".{out.name}{TMP_MARK}")
            if outcome != "no-file":
                tmp.write_text("new\n")
                assert out.read_text() == previous if previous else not out.exists()
            if outcome == "exception":
                raise Boom("killed half way")

    if raised:
        with pytest.raises(raised):
            attempt()
    else:
        attempt()
    assert (out.read_text() if out.exists() else None) == expected
    assert sorted(p.name for p in out.parent.iterdir()) == ([out.name] if expected is not None else [])


@pytest.mark.parametrize("outcome", ["success", "exception"])
def test_a_replaced_file_never_sits_beside_the_old_files_checksum(tmp_path, outcome):
    """Found by bench/torture.py: the artifact was renamed into place, the run killed before
    write_checksum, and the new file sat beside the old one's .sha256. The checksum now goes
    right before the rename; a failed step keeps both."""
    out = tmp_path / "kairos-x.squashfs"
    out.write_text("old\n")
    old_sum = write_checksum(out).read_text()
    try:
        with atomic_path(out) as tmp:
            tmp.write_text("new\n")
            if outcome == "exception":
                raise Boom("killed before the rename")
    except Boom:
        pass
    sha = out.with_name(out.name + ".sha256")
    if outcome == "success":
        assert out.read_text() == "new\n" and not sha.exists()
        assert write_checksum(out).read_text() == f"{hashlib.sha256(b'new' + bytes([10])).hexdigest()}  {out.name}\n"
    else:
        assert out.read_text() == "old\n" and sha.read_text() == old_sum


@pytest.mark.parametrize("leftover_kind", ["file", "dir", "symlink"])
def test_atomic_path_cleans_leftovers_of_a_killed_attempt(tmp_path, leftover_kind):
    out = tmp_path / "kairos-x-kernel"
    leftover = tmp_path / f".{out.name}{TMP_MARK}123"
    if leftover_kind == "file":
        leftover.write_text("half")
    elif leftover_kind == "dir":
        (leftover / "sub").mkdir(parents=True)
        (leftover / "sub" / "f").write_text("x")
    else:
        leftover.symlink_to(tmp_path / "elsewhere")
    unrelated = [tmp_path / f".other{TMP_MARK}123", tmp_path / f".{out.name}x{TMP_MARK}1", tmp_path / "keep"]
    for p in unrelated:
        p.write_text("keep")

    write_text_atomic(out, "kernel")
    assert out.read_text() == "kernel"
    assert not os.path.lexists(leftover)
    assert all(p.read_text() == "keep" for p in unrelated)


def test_partial_name_is_hidden_and_per_process(tmp_path):
    p = partial_name(tmp_path / "a.iso")
    assert p == tmp_path / f".a.iso{TMP_MARK}{os.getpid()}"


@pytest.mark.parametrize("initial, new, changed", [
    (None, "sha256:aaa\n", True),
    ("sha256:aaa\n", "sha256:aaa\n", False),
    ("sha256:aaa\n", "sha256:bbb\n", True),
    ("sha256:aaa\n", "sha256:aaa", True),
    ("", "", False),
])
def test_write_if_changed(tmp_path, initial, new, changed):
    path = tmp_path / "state" / "resolved" / "ubuntu-24.04.digest"
    old_mtime_ns = 1_000_000_000 * 10**9
    if initial is not None:
        path.parent.mkdir(parents=True)
        path.write_text(initial)
        os.utime(path, ns=(old_mtime_ns, old_mtime_ns))
    assert write_if_changed(path, new) is changed
    assert path.read_text() == new
    if initial is not None:
        assert (path.stat().st_mtime_ns != old_mtime_ns) is changed
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("name, data", [
    ("empty", b""),
    ("kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1.iso", b"ISO\x00" * 1000),
    ("big.img", bytes(range(256)) * 9000),  # > 2 MiB: read in several blocks
    ("name with spaces.img", b"x\n"),
])
def test_write_checksum_is_sha256sum_format(tmp_path, name, data):
    path = tmp_path / "out" / name
    path.parent.mkdir()
    path.write_bytes(data)
    written = write_checksum(path)
    assert written == path.with_name(name + ".sha256")
    assert written.read_text() == f"{hashlib.sha256(data).hexdigest()}  {name}\n"
    # and the real sha256sum agrees
    assert run(["sha256sum", "-c", written.name], cwd=path.parent, capture=True) == f"{name}: OK"


@pytest.mark.parametrize("text, ident", [
    ("ubuntu:24.04", "ubuntu-24.04"),
    ("quay.io/kairos/kairos-init:v4.3.0", "quay.io-kairos-kairos-init-v4.3.0"),
    ("127.0.0.1:5000/a/b@sha256:abc", "127.0.0.1-5000-a-b-sha256-abc"),
    ("kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1",
     "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1"),
    ("/weird//name/", "weird-name"),
])
def test_safe_id(text, ident):
    assert safe_id(text) == ident


def test_paths_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("KAIROS_STATE", raising=False)
    monkeypatch.delenv("KAIROS_OUTPUTS", raising=False)
    p = Paths.from_env(tmp_path)
    assert (p.state, p.outputs) == (tmp_path / ".state", tmp_path / "outputs")
    assert p.dep_file.parent == p.state  # one directory to cache in CI
    for path in (p.image_id(type("B", (), {"stem": "x"})()), p.context_dir("x"), p.rootfs_tar("x"), p.tmp_dir()):
        assert p.state in path.parents
    monkeypatch.setenv("KAIROS_STATE", str(tmp_path / "cache"))
    assert Paths.from_env(tmp_path).state == tmp_path / "cache"


# --- run: the one subprocess runner --------------------------------------------------------

def test_failure_raises_command_error_with_argv_status_and_tail():
    argv = ["sh", "-c", "echo hi; exit 3"]
    with pytest.raises(CommandError) as info:
        run(argv, what="say hi")
    err = info.value
    assert err.argv == argv
    assert err.status == 3
    assert "hi" in err.tail
    assert isinstance(err, KairosError) and err.kind == "failed"
    assert str(err).startswith("say hi: command failed with exit status 3: sh -c 'echo hi; exit 3'")
    assert "    hi" in str(err)


def test_tail_keeps_only_the_last_lines():
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "i=0; while [ $i -lt 100 ]; do echo line$i; i=$((i+1)); done; exit 1"])
    assert info.value.tail.splitlines() == [f"line{i}" for i in range(75, 100)]


@pytest.mark.parametrize("argv, kwargs, output", [
    (["sh", "-c", "echo hi"], {}, "hi"),
    (["sh", "-c", "echo out; echo err >&2"], {}, "out\nerr"),
    (["printf", "10%%\\r50%%\\r100%%\\ndone\\n"], {}, "100%\ndone"),
    (["sh", "-c", "echo $KAIROS_TEST_VALUE"], {"env": {"KAIROS_TEST_VALUE": "from-env"}}, "from-env"),
    (["cat"], {}, ""),  # stdin is closed, not inherited: cat ends at once
    (["wc", "-c"], {"feed": [b"abc", b"de"]}, "5"),
    (["wc", "-l"], {"feed": (b"x\n" for _ in range(100_000))}, "100000"),
    (["sh", "-c", "tr a-z A-Z"], {"feed": iter([b"kairos\n"])}, "KAIROS"),
])
def test_run_capture(argv, kwargs, output):
    assert run(argv, capture=True, **kwargs).strip() == output


def test_stdin_is_not_inherited():
    """A program run with no feed must see EOF at once, even when our own stdin is an open pipe."""
    code = "from tasks.run import run; print(repr(run(['cat'], capture=True)))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        status = proc.wait(timeout=30)  # our end of its stdin stays open meanwhile
    finally:
        proc.kill()
        proc.stdin.close()
    assert status == 0 and proc.stdout.read().decode().strip() == "''"


def test_run_without_capture_returns_nothing():
    assert run(["sh", "-c", "echo hi"]) == ""


def test_run_in_cwd(tmp_path):
    assert run(["pwd"], cwd=tmp_path, capture=True) == str(tmp_path)


def test_stdout_to_a_file_keeps_stderr_as_the_output(tmp_path):
    out = tmp_path / "out.bin"
    data = bytes(range(256)) * 4096  # binary, 1 MiB, no newlines to split on
    got = run(["sh", "-c", "cat; echo note >&2"], feed=[data], stdout=out, capture=True)
    assert out.read_bytes() == data and got == "note"


def test_stdout_to_a_file_failure_carries_stderr(tmp_path):
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo written; echo broken >&2; exit 5"], stdout=tmp_path / "out")
    assert info.value.status == 5 and info.value.tail == "broken"
    assert (tmp_path / "out").read_text() == "written\n"


def test_feeding_a_program_that_exits_early_reports_its_status():
    with pytest.raises(CommandError) as info:
        run(["sh", "-c", "echo bye; exit 4"], feed=(b"x" * 65536 for _ in range(200)))
    assert info.value.status == 4 and "bye" in info.value.tail


def test_an_error_in_the_feed_is_raised_after_cleanup():
    def feed():
        yield b"some data\n"
        raise Boom("source broke")

    with pytest.raises(Boom):
        run(["cat"], feed=feed())


@pytest.mark.parametrize("program", ["kairos-no-such-program", "/nonexistent/bin/kairos-tool"])
def test_missing_program_raises_usage_error_naming_it(program):
    with pytest.raises(UsageError) as info:
        run([program, "--version"], what="build the thing")
    assert info.value.kind == "error"
    assert f"cannot find {program}, needed to build the thing" in str(info.value)


@pytest.mark.parametrize("verbose, shown", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_verbose_prints_the_command(capsys, monkeypatch, verbose, shown):
    monkeypatch.setenv("KAIROS_VERBOSE", verbose)
    run(["sh", "-c", "echo 'a b'"])
    out = capsys.readouterr().out
    assert ("+ sh -c 'echo '\"'\"'a b'\"'\"''\n" in out) is shown
    assert ("    a b\n" in out) is shown


@pytest.mark.parametrize("tool, provider", [
    ("mksquashfs", "Debian package squashfs-tools"),
    ("unsquashfs", "Debian package squashfs-tools"),
    ("mmdebstrap", "Debian package mmdebstrap"),
    ("docker", "Debian package docker.io"),
    ("docker-registry", "Debian package docker-registry"),
    ("frobnicate", "a package that provides frobnicate"),
])
def test_require_tool_names_the_package(tmp_path, monkeypatch, tool, provider):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: nothing is found
    with pytest.raises(UsageError) as info:
        require_tool(tool, "build the .squashfs root filesystem")
    assert str(info.value) == (f"cannot find {tool}, needed to build the .squashfs root filesystem; "
                               f"install {provider}")


def test_require_tool_returns_the_full_path(tmp_path, monkeypatch):
    tool = tmp_path / "mksquashfs"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert require_tool("mksquashfs", "x") == str(tool)
    assert Path(require_tool("sh", "x")) == Path(shutil.which("sh"))


def test_fault_stop_stops_the_writer_with_the_file_complete_under_its_partial_name(tmp_path):
    """KAIROS_FAULT_STOP=<file name>: atomic_path's process stops itself (SIGSTOP) right before the
    rename, the output complete under its partial name; killed there, no final file exists."""
    import signal
    import time
    final = tmp_path / "out.bin"
    code = ("import sys; from pathlib import Path; from tasks.state import atomic_path\n"
            "with atomic_path(Path(sys.argv[1])) as tmp:\n    tmp.write_bytes(b'x' * 4096)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(final)], env=dict(os.environ, KAIROS_FAULT_STOP="out.bin"),
                            cwd=Path(__file__).resolve().parents[2])
    try:
        for _ in range(200):
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T" or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert state == "T", f"not stopped (state {state}, rc {proc.poll()})"
        assert not final.exists() and (tmp_path / f".out.bin{TMP_MARK}{proc.pid}").read_bytes() == b"x" * 4096
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not final.exists()
    # another file name: no stop, the file is renamed into place
    done = subprocess.run([sys.executable, "-c", code, str(final)], env=dict(os.environ, KAIROS_FAULT_STOP="other"),
                          cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert done.returncode == 0 and final.read_bytes() == b"x" * 4096


def test_the_run_holding_the_state_lock_removes_what_killed_runs_left_in_tmp(tmp_path):
    """Found by bench/torture.py: a /boot tar of a killed extraction stayed in state/tmp for good
    once its step named its scratch files differently. The run that takes the lock clears tmp/."""
    from tasks.graph import lock_state
    paths = Paths(tmp_path / "state", tmp_path / "outputs")
    tmp = paths.tmp_dir()
    (tmp / f".x-boot.tar{TMP_MARK}15541").parent.mkdir(parents=True)
    (tmp / f".x-boot.tar{TMP_MARK}15541").write_bytes(b"tar")
    (tmp / f".x-squashfs-rootfs{TMP_MARK}77" / "usr").mkdir(parents=True)
    (tmp / "kept").write_text("not a partial name")
    lock_state(paths, ["list"])  # read-only commands take no lock and clean nothing
    assert len(list(tmp.iterdir())) == 3
    lock_state(paths, [])
    assert sorted(p.name for p in tmp.iterdir()) == ["kept"]
