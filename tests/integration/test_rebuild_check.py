"""Reproducible artifacts, end to end: `python -m tasks rebuild-check iso:<stem>` builds a small
builtin flavor (the registry's Debian minbase base; kernel, dracut initrd, lz4 squashfs, ISO) twice,
each time in a new state and outputs directory and with `docker build --no-cache`, and every
artifact it made must have the same bytes both times. The whole table is printed.

The full check (the default flavor, its raw generic image, and the signed and scanned kinds) is a
benchmark-style script: bench/rebuild_check.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tasks import rebuild
from tasks.config import load_flavors
from tasks.matrix import expand

from tests.harness import LZ4, REPO, buildkit_steps, builtin_doc, write_flavor

pytestmark = pytest.mark.integration


def test_two_clean_builds_give_the_same_squashfs_kernel_initrd_and_iso(tmp_path, ns, bases):
    flavors = tmp_path / "flavors"
    write_flavor(flavors / "repro.yaml", builtin_doc("repro", bases["b"], f"{ns}/kairos", ["iso"], squashfs=LZ4))
    (b,) = expand(load_flavors([flavors]))
    table = tmp_path / "table.json"
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "tasks", "rebuild-check", "--flavors", str(flavors),
                           "--work", str(work), "--keep", "--json", str(table), f"iso:{b.stem}"],
                          cwd=REPO, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
    print(proc.stdout, proc.stderr[-6000:])
    try:
        check(proc, table, b, work)
    finally:  # run 1's converted image lost its tag to run 2's: the check's own clean-up removes it
        removed = rebuild.drop_superseded_images([b], work / "run1", work / "run2")
        print(f"removed: {removed}")
        shutil.rmtree(work, ignore_errors=True)
    assert len(removed) == 1 and removed[0].startswith("sha256:")


def check(proc, table, b, work):
    assert table.exists(), proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(table.read_text())["rows"]}
    wanted = {f"v3.1.0/{b.stem}{suffix}{sha}" for suffix in (".squashfs", "-kernel", "-initrd", ".iso")
              for sha in ("", ".sha256")}
    assert wanted <= set(rows), sorted(rows)
    different = {n: r["detail"] for n, r in rows.items() if r["verdict"] != "identical"}
    assert different == {}, different
    assert proc.returncode == 0
    assert "8 identical, 0 DIFFERENT, 0 MISSING, 0 known exception" in proc.stdout
    # each run converted, and BuildKit ran every step of the conversion (none taken from a cache)
    for n in (1, 2):
        assert f"run {n}: .  convert:{b.stem}" in proc.stdout
        log = (work / f"run{n}" / "doit.log").read_text()
        assert "KAIROS_NO_CACHE=1: every step runs again (docker build --no-cache)" in log
        # every step after FROM (BuildKit reports the base image it has as CACHED: nothing to build)
        ran = {step: hit for step, hit in buildkit_steps(log).items() if not step.startswith("FROM ")}
        assert "RUN sh /tmp/builtin-install.sh && rm -f /tmp/builtin-install.sh" in ran, sorted(ran)
        assert not any(ran.values()), {step for step, hit in ran.items() if hit}
