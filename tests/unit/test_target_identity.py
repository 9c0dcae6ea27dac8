"""A task whose target is no longer what it wrote is out of date (graph.targets_unchanged).

Real doit runs (`python3 -m doit`, the pipeline's doit configuration) of the tiny pipeline
tests/fixtures/identity_dodo.py in a temp directory: a kernel-like output (same bytes on
every build), a squashfs-like one (stamped with the build time), an ISO made from their
`.sha256`, a task without targets, a manifest, an always-running resolve that rewrites
its digest only on change, and a directory target. No Docker, no mocks.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.state import file_identity, same_identity

REPO = Path(__file__).resolve().parents[2]
DODO = REPO / "tests" / "fixtures" / "identity_dodo.py"
ALWAYS_RUN = ("resolve:",)
EVERY_TASK = {"resolve:base", "pull:base", "extract:kernel", "extract:initrd", "extract:squashfs", "iso:x",
              "check:x", "manifest:v", "bundle:x"}
TARGETS = {"extract:kernel": ["kernel", "kernel.sha256"], "extract:initrd": ["initrd", "initrd.sha256"],
           "extract:squashfs": ["squashfs", "squashfs.sha256"], "iso:x": ["x.iso", "x.iso.sha256"],
           "manifest:v": ["SHA256SUMS"], "bundle:x": ["bundle/inside"], "pull:base": [],
           "check:x": [], "resolve:base": []}
SECOND = 10**9


class Pipeline:
    def __init__(self, root: Path):
        self.root = root
        self.out = root / "out"
        self.state = root / "state"

    def doit(self, *args: str, old: bool = False) -> set[str]:
        """Run doit; the build actions it ran (tasks other than the always-running resolve)."""
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("KAIROS_TEST_OLD_PIPELINE", None)
        if old:
            env["KAIROS_TEST_OLD_PIPELINE"] = "1"
        proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(self.root / "dodo.py"), *args],
                              cwd=self.root, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        executed = {line[3:].strip() for line in proc.stdout.splitlines() if line.startswith(".  ")}
        return {t for t in executed if not t.startswith(ALWAYS_RUN)}

    def snapshot(self) -> dict[str, tuple[int, str]]:
        """Every file the pipeline wrote -> (mtime_ns, sha256); doit's DB and the lock excluded."""
        files = {}
        for top in (self.out, self.state):
            for path in sorted(top.rglob("*")):
                if path.is_file() and path.name not in ("doit.db", "lock"):
                    files[str(path.relative_to(self.root))] = (path.stat().st_mtime_ns, sha256(path))
        return files

    def sha_line_ok(self, name: str) -> bool:
        digest, fname = (self.out / f"{name}.sha256").read_text().split()
        return fname == name and digest == sha256(self.out / name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def pipeline(tmp_path) -> Pipeline:
    shutil.copy(DODO, tmp_path / "dodo.py")
    (tmp_path / "src").mkdir()
    for name in ("kernel", "initrd", "squashfs", "base"):
        (tmp_path / "src" / f"{name}.txt").write_text(f"{name} of the build\n")
    return Pipeline(tmp_path)


@pytest.fixture
def built(pipeline) -> Pipeline:
    assert pipeline.doit() == EVERY_TASK - {"resolve:base"}
    return pipeline


# --- the ways an output goes bad -------------------------------------------------------

def flip(path: Path) -> None:
    """One byte changed in place (the file keeps its size and inode)."""
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def older_copy(path: Path) -> None:
    """Replaced by an older file of the same size and other bytes, its own mtime kept (`cp -p`)."""
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    older = path.with_name(path.name + ".older")
    older.write_bytes(bytes(data))
    then = path.stat().st_mtime_ns - 3600 * SECOND
    os.utime(older, ns=(then, then))
    os.replace(older, path)


def delete(path: Path) -> None:
    path.unlink()


DAMAGE = {"flipped": flip, "truncated": truncate, "older-copy": older_copy, "deleted": delete}
# target -> what a rebuild runs: the kernel comes back with the same bytes, so its .sha256 is
# unchanged and nothing that depends on it reruns; the squashfs carries its build time, so
# its .sha256 changes and the ISO, its check and the manifest rerun.
REBUILDS = {"kernel": {"extract:kernel"}, "kernel.sha256": {"extract:kernel"},
            "squashfs": {"extract:squashfs", "iso:x", "check:x", "manifest:v"}}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("target", ["kernel", "squashfs"])
def test_a_damaged_output_rebuilds_its_task_and_dependants_only(built, target, damage):
    before = built.snapshot()
    DAMAGE[damage](built.out / target)
    assert built.doit() == REBUILDS[target]
    after = built.snapshot()
    rewritten = {f"out/{name}" for task in REBUILDS[target] for name in TARGETS[task]}
    assert {k: v for k, v in after.items() if k not in rewritten} == \
           {k: v for k, v in before.items() if k not in rewritten}
    assert built.sha_line_ok(target)
    if target == "kernel":  # the same bytes as before the damage
        assert after["out/kernel"][1] == before["out/kernel"][1]
        assert after["out/kernel.sha256"][1] == before["out/kernel.sha256"][1]
    else:
        assert after["out/squashfs"][1] != before["out/squashfs"][1]
        assert (built.out / "squashfs.sha256").read_text() in (built.out / "SHA256SUMS").read_text()
        assert built.sha_line_ok("x.iso")
    assert built.doit() == set()


def test_a_damaged_checksum_file_is_covered_the_same_way(built):
    before = built.snapshot()
    flip(built.out / "kernel.sha256")
    assert built.doit() == {"extract:kernel"}
    after = built.snapshot()
    assert after["out/kernel.sha256"][1] == before["out/kernel.sha256"][1]
    assert {k: v for k, v in after.items() if not k.startswith("out/kernel")} == \
           {k: v for k, v in before.items() if not k.startswith("out/kernel")}
    assert built.doit() == set()


def test_the_pipeline_before_the_check_left_the_damage_in_place(pipeline):
    """What issue #13 reported: doit alone judges a corrupted output up to date."""
    assert pipeline.doit(old=True) == EVERY_TASK - {"resolve:base"}
    flip(pipeline.out / "kernel")
    damaged = sha256(pipeline.out / "kernel")
    assert pipeline.doit(old=True) == set()
    assert sha256(pipeline.out / "kernel") == damaged


def test_state_of_an_older_pipeline_is_adopted_and_a_missing_target_still_rebuilds(pipeline):
    """No identities recorded yet (an older pipeline's state, e.g. a restored CI cache): the
    targets that exist are adopted as they are, without a rebuild, and checked from then on;
    a missing target rebuilds its task as always. A change made before the upgrade is not
    seen (nothing recorded what was written): `doit verify` checks against the `.sha256`."""
    assert pipeline.doit(old=True) == EVERY_TASK - {"resolve:base"}
    delete(pipeline.out / "kernel")
    flip(pipeline.out / "x.iso")  # before the upgrade: adopted as it is
    before = pipeline.snapshot()
    assert pipeline.doit() == {"extract:kernel"}
    assert {k: v for k, v in pipeline.snapshot().items() if not k.startswith("out/kernel")} == \
           {k: v for k, v in before.items() if not k.startswith("out/kernel")}
    flip(pipeline.out / "initrd")  # adopted above, so now checked
    assert pipeline.doit() == {"extract:initrd"}
    assert pipeline.doit() == set()


def test_a_restored_cache_rebuilds_nothing(built, tmp_path_factory):
    """CI restores outputs/ and the state directory as new files (new inodes and ctimes):
    actions/cache with `tar --posix` (mtimes to the nanosecond), GNU tar's default format
    (whole seconds, as GitLab's zip cache), `cp -a` (ci/reproduce.sh)."""
    before = {k: v[1] for k, v in built.snapshot().items()}
    for how in ("--posix", "--format=gnu", "cp -a"):
        saved = tmp_path_factory.mktemp("cache")
        if how.startswith("--"):
            subprocess.run(["tar", how, "-cf", str(saved / "c.tar"), "-C", str(built.root), "out", "state"],
                           check=True)
            shutil.rmtree(built.out), shutil.rmtree(built.state)
            subprocess.run(["tar", "-xf", str(saved / "c.tar"), "-C", str(built.root)], check=True)
        else:
            for d in ("out", "state"):
                shutil.move(built.root / d, saved / d)
                subprocess.run(["cp", "-a", str(saved / d), str(built.root / d)], check=True)
        if how == "--format=gnu":
            assert all(p.stat().st_mtime_ns % SECOND == 0 for p in built.out.iterdir())
        assert built.doit() == set(), how
        assert {k: v[1] for k, v in built.snapshot().items()} == before
    flip(built.out / "kernel")  # and the check still works on the restored files
    assert built.doit() == {"extract:kernel"}


def test_a_restore_that_drops_modification_times_rebuilds_what_it_restored(built):
    """The documented limit: without the mtimes (`cp -r`) every output looks replaced."""
    for d in ("out", "state"):
        shutil.move(built.root / d, built.root / f"{d}.saved")
        subprocess.run(["cp", "-r", str(built.root / f"{d}.saved"), str(built.root / d)], check=True)
    # every task with file targets; check:x too, as the rebuilt squashfs carries a new build
    # time (and so a new x.iso); not bundle:x (a directory: its presence counts)
    assert built.doit() == EVERY_TASK - {"resolve:base", "bundle:x"}
    assert built.doit() == set()


def test_clean_forget_always_and_parallel_runs(built):
    built.doit("clean", "extract:initrd")
    assert not (built.out / "initrd").exists()
    assert built.doit() == {"extract:initrd"}
    built.doit("forget", "iso:x")
    assert built.doit() == {"iso:x"}
    assert built.doit("--always", "extract:kernel") == {"extract:kernel"}
    assert built.doit() == set()  # what the forced run wrote was recorded
    flip(built.out / "squashfs")
    assert built.doit("-n", "2") == REBUILDS["squashfs"]  # recorded by the parallel runner too
    assert built.doit() == set()


def test_rewrite_only_when_changed_and_directory_targets(built):
    """resolve runs every time and leaves its digest alone (identity unchanged, pull does not
    rerun); a directory target counts by its presence only."""
    digest = built.state / "resolved" / "base.digest"
    mtime = digest.stat().st_mtime_ns
    assert built.doit() == set()
    assert digest.stat().st_mtime_ns == mtime
    (built.root / "src" / "base.txt").write_text("a new base\n")
    assert built.doit() == {"pull:base"}
    (built.out / "bundle" / "extra").write_text("a new entry moves the directory's mtime\n")
    assert built.doit() == set()
    shutil.rmtree(built.out / "bundle")
    assert built.doit() == {"bundle:x"}


def test_identity_of_real_files(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    when = 1_700_000_000_123_456_789
    os.utime(path, ns=(when, when))
    recorded = file_identity(path)
    assert recorded == [100, when]
    for restored in (when - when % SECOND, when - when % SECOND + SECOND,  # cut or rounded to seconds
                     when - when % 1000, when - when % 100):               # to microseconds, 100 ns
        os.utime(path, ns=(restored, restored))
        assert same_identity(recorded, file_identity(path)), restored
    for later in (when + 1, when + SECOND, when + 5 * SECOND, when - 3600 * SECOND):
        os.utime(path, ns=(later, later))
        assert not same_identity(recorded, file_identity(path)), later
    os.utime(path, ns=(when, when))
    os.truncate(path, 99)
    os.utime(path, ns=(when, when))
    assert not same_identity(recorded, file_identity(path))
    assert file_identity(tmp_path) == [] and same_identity([], file_identity(tmp_path))
    path.unlink()
    assert file_identity(path) is None and not same_identity(recorded, None)
