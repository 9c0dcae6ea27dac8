"""xz: the compressed raw disk image `<stem>.img.xz` (stages/xz.py) with the real xz: argv, integrity
check, and the same bytes from the same `.img` whatever the cores, threads and file times."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tasks.graph import Context
from tasks.run import CommandError, run
from tasks.stages import xz
from tasks.state import checksum_path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- xz: argv ---------------------------------------------------------------------------

@pytest.mark.parametrize("level, preset", [(6, "-6"), (0, "-0"), (9, "-9")])
def test_xz_argv_builders(level, preset):
    assert xz.compress_argv(Path("/o/a.img"), level) == [
        "xz", "--compress", "--stdout", "--format=xz", "--check=crc64", preset, "--block-size=24MiB", "--threads=0",
        "--no-adjust", "--", "/o/a.img"]
    assert xz.check_argv(Path("/o/.a.img.xz.partial-1")) == ["xz", "--test", "--threads=0", "--",
                                                             "/o/.a.img.xz.partial-1"]


def test_xz_key_changes_with_the_argv_only(make_build):
    a = make_build(artifacts=("raw",), raw_generic=True)
    b = make_build(artifacts=("raw", "sbom"), raw_generic=True, registry="127.0.0.1:5000/k")
    assert xz.key(a) == xz.key(b)
    assert json.loads(xz.key(a))["argv"][-1] == "IMG"
    faster = make_build(artifacts=("raw",), raw_generic=True, raw_xz_level=0)
    assert xz.key(faster) != xz.key(a) and "-0" in json.loads(xz.key(faster))["argv"]


# --- xz: the real program -----------------------------------------------------------------

def test_compress_writes_a_checked_xz_and_its_checksum(raw_build):
    paths, b, img = raw_build
    xz.compress(paths, b)
    out, = paths.outputs_of(b, "xz")
    assert out.name == f"{b.stem}.img.xz"
    assert checksum_path(out).read_text() == f"{sha256(out)}  {out.name}\n"
    listing = run(["xz", "--robot", "--list", str(out)], capture=True)
    blocks = int(next(l for l in listing.splitlines() if l.startswith("file")).split("\t")[2])
    assert blocks == 2  # 30 MiB in 24 MiB blocks: the multi-threaded format
    plain = subprocess.run(["xz", "-dc", str(out)], capture_output=True, check=True).stdout
    assert hashlib.sha256(plain).hexdigest() == sha256(img)
    assert out.stat().st_size < img.stat().st_size // 4
    assert not [p.name for p in out.parent.iterdir() if ".partial-" in p.name]


def test_compression_is_reproducible_whatever_the_cores_and_times(raw_build, tmp_path):
    """Same .img -> same .img.xz bytes: again, after the input's times changed, on one core (the
    argv's --threads=0 keeps the multi-threaded format), and with other thread counts."""
    paths, b, img = raw_build
    out, = paths.outputs_of(b, "xz")
    xz.compress(paths, b)
    first = sha256(out)
    os.utime(img, (1, 1))
    xz.compress(paths, b)
    assert sha256(out) == first
    if hasattr(os, "sched_setaffinity"):
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})  # children inherit it: xz sees one core
        try:
            xz.compress(paths, b)
        finally:
            os.sched_setaffinity(0, cpus)
        assert sha256(out) == first
    def threads(value: str) -> str:
        run([value if a == "--threads=0" else a for a in xz.compress_argv(img, b.flavor.raw_xz_level)], stdout=tmp_path / "other.xz")
        return sha256(tmp_path / "other.xz")

    for value in ("--threads=+1", "--threads=2"):
        assert threads(value) == first, value
    # the single-threaded mode writes other bytes: what the fixed argv avoids
    assert threads("--threads=1") != first


def test_check_rejects_a_damaged_file(raw_build, tmp_path):
    paths, b, _ = raw_build
    xz.compress(paths, b)
    out, = paths.outputs_of(b, "xz")
    xz.check(out)
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.img.xz"
    bad.write_bytes(bytes(data))
    with pytest.raises(CommandError) as info:
        xz.check(bad)
    assert info.value.argv[:2] == ["xz", "--test"]
    truncated = tmp_path / "short.img.xz"
    truncated.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CommandError):
        xz.check(truncated)


def test_xz_task_depends_on_the_img_checksum_only(raw_build):
    paths, b, img = raw_build
    ctx = Context(root=Path("/r"), paths=paths, flavors=(b.flavor,), builds=(b,))
    (t,) = list(xz.tasks(ctx, "xz"))
    assert t["name"] == b.stem
    assert t["file_dep"] == [str(checksum_path(img))]
    assert [Path(p).name for p in t["targets"]] == [f"{b.stem}.img.xz", f"{b.stem}.img.xz.sha256"]
    none = replace(b, flavor=replace(b.flavor, raw_compression="none"))
    assert list(xz.tasks(replace(ctx, builds=(none,)), "xz")) == []
