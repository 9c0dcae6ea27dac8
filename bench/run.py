#!/usr/bin/env python3
"""Benchmark of the kairos-doit pipeline: prints one table of numbers (it is not a test).

Usage:
  python3 bench/run.py                          # everything, 48-build matrix, dir /var/tmp/kairos-bench-matrix
  python3 bench/run.py --only noop,selective    # some rows only
  python3 bench/run.py --builds 4 --repeat 3    # small matrix, median of 3 timed runs
  python3 bench/run.py --markdown               # the table as Markdown
  python3 bench/run.py --clean                  # remove the bench dir and everything it pushed

Rows (--only names in brackets):
  [noop]      a `doit` run over a synthetic matrix of --builds builds with every artifact up to
              date: wall time of the whole process, tasks checked, time per task. Goal < 2 s.
  [selective] one overlay file of the one-build "probe" flavor changed: which tasks ran (expected:
              convert, push, squashfs of that build and the manifest) and the wall time. The file is
              restored afterwards and doit run again, so the bench dir stays up to date.
  [parallel]  two independent builtin-converter builds (kernel, initrd, squashfs, ISO), outputs
              deleted, rebuilt with `doit -n 1` and with `doit -n 2`: both times and the speedup.
  [stages]    squashfs, iso and raw stages against the same commands run by hand: the whole `doit`
              process and the task alone (doit's json reporter `elapsed`) over the by-hand time.
              Goal for the task: <= 1.1.
  [reuse]     `doit convert:<stem>` of an already converted build in a fresh state directory
              (Docker's layer cache warm), next to the first conversion time in this bench dir.

Everything lives under --dir (kept between runs: the first run builds the matrix and the real
builds, minutes; later runs only measure) and under the registry namespace --registry
(default 127.0.0.1:5000/bench). The synthetic matrix uses a kairos-init STAND-IN image (the
shell script of tests/harness.py that only records its flags; it is not kairos-init)
on a tiny base (dash + libc cut out of the Debian minbase tarball). The real builds use the
builtin converter on the whole minbase rootfs. It needs what the pipeline needs (bash ci/setup.sh)
and exits non-zero when the engine or registry is down or an unexpected task runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.builders import native_iso, native_raw  # noqa: E402
from tasks.config import load_flavors  # noqa: E402
from tasks.matrix import Build, expand  # noqa: E402
from tasks.stages import extract, iso  # noqa: E402
from tasks.state import Paths, read_digest  # noqa: E402
from tests.harness import (  # noqa: E402  the tests' flavor builders and stand-in
    LZ4, STANDIN_SCRIPT, builtin_doc, drop_namespace, flavor_text, standin_doc)

DEFAULT_DIR = Path("/var/tmp/kairos-bench-matrix")
DEFAULT_NS = "127.0.0.1:5000/bench"
DEFAULT_TAR = Path("/var/tmp/kairos-test-cache/bookworm-minbase-amd64.tar")
MIRROR = "http://deb.debian.org/debian"
BENCHES = ("noop", "selective", "parallel", "stages", "reuse")
ALWAYS_RUN = ("preflight", "resolve:")
VERSION = "v3.1.0"
K3S = ("v1.28.2+k3s1", "v1.29.1+k3s1", "v1.30.2+k3s1")
PER_FLAVOR = 1 + len(K3S)          # core + one standard build per k3s version
NOOP_GOAL_S = 2.0
STAGE_GOAL = 1.1
# files of the tiny base: dash as /bin/sh and the two libraries it needs (usr-merged layout)
TINY_ROOTFS = ("bin", "lib", "lib64", "etc", "tmp", "var", "var/log", "usr", "usr/bin", "usr/bin/dash",
               "usr/bin/sh", "usr/lib", "usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/libc.so.6",
               "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "usr/lib64", "usr/lib64/ld-linux-x86-64.so.2")


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


# --- services and images -----------------------------------------------------------

def registry_host(ns: str) -> str:
    return ns.split("/", 1)[0]


def check_services(ns: str) -> None:
    """The Docker engine and the registry of ``ns`` must answer; say how to start them."""
    try:
        import docker
        docker.from_env(timeout=30).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means the same here
        raise BenchError(f"the Docker engine does not answer ({exc}); run: bash ci/setup.sh") from None
    url = f"http://{registry_host(ns)}/v2/"
    try:
        urllib.request.urlopen(url, timeout=5).close()
    except OSError as exc:
        raise BenchError(f"the registry at {url} does not answer ({exc}); run: bash ci/setup.sh") from None


def engine():
    import docker
    return docker.from_env(timeout=600)


def in_registry(ref: str) -> bool:
    from tasks.tools import docker as kdocker
    return kdocker.registry_has(ref)


def build_and_push(ref: str, files: dict[str, bytes], mode: dict[str, int], dockerfile: str) -> None:
    """Build a small image from in-memory files (legacy builder) and push it as ``ref``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {**files, "Dockerfile": dockerfile.encode()}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode.get(name, 0o644)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client = engine()
    client.images.build(fileobj=buf, custom_context=True, tag=ref, rm=True)
    repo, _, tag = ref.rpartition(":")
    for line in client.api.push(repo, tag=tag, stream=True, decode=True):
        if "error" in line:
            raise BenchError(f"push {ref}: {line['error']}")


def ensure_image(ref: str, make) -> str:
    """Push ``ref`` unless the registry has it already (a rebuilt base would get a new digest and
    make every build of the bench dir reconvert)."""
    if not in_registry(ref):
        log(f"building and pushing {ref}")
        make(ref)
    return ref


def ensure_rootfs_tar(path: Path) -> Path:
    """The Debian minbase rootfs tarball (the integration tests' cache), built if missing."""
    if not path.exists():
        log(f"{path} missing: mmdebstrap (a few minutes)")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        sh(["mmdebstrap", "--variant=minbase", "--arch=amd64", "--format=tar", "bookworm", partial, MIRROR])
        partial.rename(path)
    return path


def tiny_rootfs(source: Path) -> bytes:
    """A tar of dash + libc out of the minbase tarball: enough for /bin/sh, ~2 MiB."""
    out = io.BytesIO()
    found = set()
    with tarfile.open(source) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src:
            name = member.name.removeprefix("./").rstrip("/")
            if name in TINY_ROOTFS:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
                found.add(name)
    missing = sorted(set(TINY_ROOTFS) - found)
    if missing:
        raise BenchError(f"{source}: no {', '.join(missing)} (not an amd64 usr-merged Debian rootfs?)")
    return out.getvalue()


def push_rootfs(ref: str, rootfs: bytes) -> None:
    build_and_push(ref, {"rootfs.tar": rootfs}, {}, 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/sh"]\n')


def push_standin(ref: str) -> None:
    """The kairos-init STAND-IN of the integration tests (records flags; not kairos-init)."""
    build_and_push(ref, {"kairos-init": STANDIN_SCRIPT.encode()}, {"kairos-init": 0o755},
                   "FROM scratch\nCOPY kairos-init /kairos-init\n")


@dataclass(frozen=True)
class Images:
    """Image references the bench flavors use; each is pushed on first use unless given."""

    args: argparse.Namespace

    def _tar(self) -> Path:
        return ensure_rootfs_tar(self.args.rootfs_tar)

    def tiny_base(self) -> str:
        return self.args.base or ensure_image(f"{self.args.registry}/base-tiny:bookworm-dash",
                                              lambda ref: push_rootfs(ref, tiny_rootfs(self._tar())))

    def real_base(self) -> str:
        return self.args.real_base or ensure_image(f"{self.args.registry}/base-minbase:bookworm",
                                                   lambda ref: push_rootfs(ref, self._tar().read_bytes()))

    def standin(self) -> str:
        return self.args.kairos_init or ensure_image(f"{self.args.registry}/kairos-init-standin:v0",
                                                     push_standin)


# --- doit runs --------------------------------------------------------------------------

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


def doit(space: Space, *args: str, json_report: bool = False) -> Run:
    """Run `python3 -m doit -f dodo.py ARGS` as a whole process and time it."""
    argv = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"),
            *(["--reporter", "json"] if json_report else []), *args]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=space.env(), cwd=ROOT,
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


# --- flavor files ---------------------------------------------------------------------------

def write_if_changed(path: Path, text: str) -> None:
    """Unchanged files keep their mtime, so doit does not even rehash them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def matrix_sizes(builds: int) -> list[int]:
    """Builds per flavor file: a one-build probe flavor first (the selective row changes its
    overlay, which touches that build only), then flavors of core + 3 standard builds."""
    rest = builds - 1
    return [1] + [PER_FLAVOR] * (rest // PER_FLAVOR) + ([rest % PER_FLAVOR] if rest % PER_FLAVOR else [])


PROBE = "benchprobe"
PROBE_FILE = Path("overlay-benchprobe/etc/bench/probe.conf")


def write_matrix(flavors: Path, builds: int, images: Images, registry: str) -> None:
    """The synthetic matrix: kairos-init stand-in, tiny base, squashfs (lz4), one overlay each.
    Files of an earlier, bigger --builds are removed."""
    wanted = set()
    base, standin = images.tiny_base(), images.standin()
    for i, size in enumerate(matrix_sizes(builds)):
        name = PROBE if i == 0 else f"benchm{i:02d}"
        k3s = list(K3S[:size - 1])
        doc = standin_doc(name, base, standin, f"{registry}/kairos", ["squashfs"], squashfs=LZ4,
                          overlay=f"overlay-{name}", variants=["core", "standard"] if k3s else ["core"],
                          **({"k3s_versions": k3s} if k3s else {}))
        conf = PROBE_FILE.name if i == 0 else f"{name}.conf"
        write_if_changed(flavors / f"overlay-{name}" / "etc" / "bench" / conf, f"flavor {name}\n")
        write_if_changed(flavors / f"{name}.yaml", flavor_text(doc))
        wanted |= {f"{name}.yaml", f"overlay-{name}"}
    for stale in flavors.iterdir():
        if stale.name not in wanted:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


REAL_A, REAL_B = "benchpa", "benchpb"
REAL_ID = Path("overlay-bench/etc/kairos-bench-id")


def write_real(flavors: Path, images: Images, registry: str) -> None:
    """Two builtin-converter builds on the minbase image; A also makes the generic raw image.
    Both copy an overlay holding an id made once per bench dir: it comes before the converter's
    RUN step, so the first conversion in a new bench dir is cold (apt downloads the kernel) even
    when BuildKit's cache holds the same conversion made elsewhere; B's is then a cache hit of A's."""
    if not (flavors / REAL_ID).exists():
        write_if_changed(flavors / REAL_ID, f"{os.urandom(8).hex()}\n")
    base, registry, overlay = images.real_base(), f"{registry}/kairos", str(REAL_ID.parts[0])
    a = builtin_doc(REAL_A, base, registry, ["kernel", "initrd", "squashfs", "iso", "raw"], raw_generic=True,
                    overlay=overlay)
    b = builtin_doc(REAL_B, base, registry, ["kernel", "initrd", "squashfs", "iso"], overlay=overlay)
    for doc in (a, b):
        write_if_changed(flavors / f"{doc['flavor']}.yaml", flavor_text(doc))


def real_builds(space: Space) -> tuple[Build, Build]:
    by_flavor = {b.flavor.flavor: b for b in space.builds()}
    return by_flavor[REAL_A], by_flavor[REAL_B]


# --- rows -----------------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    benchmark: str
    result: str
    goal: str
    met: str
    data: dict = field(default_factory=dict)


def prepare_matrix(space: Space, args, images: Images) -> list[Build]:
    write_matrix(space.flavors, args.builds, images, args.registry)
    builds = space.builds()
    log(f"matrix: {len(builds)} builds in {len(list(space.flavors.glob('*.yaml')))} flavor files; "
        "bringing it up to date (the first time builds all of them: about a minute)")
    first = doit(space)
    log(f"  {len(first.build_actions)} build tasks ran in {first.wall:.1f} s")
    return builds


def bench_noop(space: Space, builds: list[Build], repeat: int) -> Row:
    runs = []
    for _ in range(repeat):
        run = doit(space)
        if run.build_actions:
            raise BenchError(f"no-op run executed build tasks: {run.build_actions}")
        runs.append(run)
    wall = median([r.wall for r in runs])
    tasks = runs[0].checked
    js = doit(space, json_report=True)  # where the time goes: the always-run tasks
    always = sum(v for k, v in js.elapsed.items() if k.startswith(ALWAYS_RUN))
    result = (f"{wall:.2f} s wall, {tasks} tasks ({len(runs[0].executed)} always-run: preflight+resolve "
              f"{always:.2f} s), {wall / tasks * 1000:.1f} ms/task, 0 build actions")
    return Row("noop", f"no-op, {len(builds)} builds", result, f"< {NOOP_GOAL_S:g} s",
               "yes" if wall < NOOP_GOAL_S else "no",
               {"wall": wall, "tasks": tasks, "always_run_s": always, "build_actions": [],
                "executed": runs[0].executed, "builds": len(builds)})


def compact(tasks: list[str]) -> str:
    """`convert:S, push:S, manifest:V` -> `convert/push:S, manifest:V` (order kept)."""
    by_stem: dict[str, list[str]] = {}
    for t in tasks:
        stage, _, stem = t.partition(":")
        by_stem.setdefault(stem, []).append(stage)
    return ", ".join(f"{'/'.join(stages)}:{stem}" for stem, stages in by_stem.items())


def bench_selective(space: Space, builds: list[Build], repeat: int) -> Row:
    probe = next(b for b in builds if b.flavor.flavor == PROBE)
    expected = [f"convert:{probe.stem}", f"push:{probe.stem}", f"squashfs:{probe.stem}", f"manifest:{VERSION}"]
    conf = space.flavors / PROBE_FILE
    original = conf.read_text()
    walls, ran, total = [], [], 0
    for _ in range(repeat):
        try:
            conf.write_text(original + "changed by bench/run.py\n")
            run = doit(space)
        finally:
            conf.write_text(original)
        walls.append(run.wall)
        ran, total = run.build_actions, run.checked
        log(f"  selective: {len(ran)} of {total} tasks ran in {run.wall:.1f} s; restoring")
        doit(space)  # back to the original overlay: the bench dir is up to date again
    ok = sorted(ran) == sorted(expected)
    result = f"{len(ran)} of {total} tasks ran in {median(walls):.1f} s: {compact(ran)}"
    return Row("selective", "selective rebuild (1 overlay file, 1 build)", result,
               "that build's convert/push/squashfs + manifest", "yes" if ok else "no",
               {"wall": median(walls), "tasks": total, "executed": ran, "expected": expected})


FIRST_CONVERSION = "first-conversion.json"


def run_step_cached(build_output: str) -> bool:
    """True when BuildKit took the converter's RUN step from its cache: the step `#N [k/m] RUN ...`
    is followed by a line `#N CACHED` (other steps, FROM and COPY, are often cached anyway)."""
    lines = [line.strip() for line in build_output.splitlines()]
    steps = {line.split()[0] for line in lines if re.match(r"#\d+ \[\d+/\d+\] RUN ", line)}
    return bool(steps) and all(f"{step} CACHED" in lines for step in steps)


def prepare_real(space: Space, args, images: Images) -> tuple[Build, Build]:
    write_real(space.flavors, images, args.registry)
    a, b = real_builds(space)
    log("real builds: bringing them up to date (the first time: base conversion with apt, squashfs, "
        "ISO, raw; several minutes)")
    run = doit(space, f"iso:{a.stem}", f"iso:{b.stem}", f"raw:{a.stem}", json_report=True)
    log(f"  {len(run.build_actions)} build tasks ran in {run.wall:.1f} s")
    convert = f"convert:{a.stem}"
    if convert in run.executed:  # remember how long it took for the reuse row
        cached = run_step_cached(run.outputs.get(convert, ""))
        log(f"  {convert}: {run.elapsed[convert]:.1f} s ({'BuildKit cache hit' if cached else 'cold'})")
        (space.state.parent / FIRST_CONVERSION).write_text(json.dumps(
            {"elapsed": run.elapsed[convert], "cached": cached, "when": time.strftime("%Y-%m-%d %H:%M:%S")}))
    return a, b


def bench_parallel(space: Space, a: Build, b: Build, repeat: int) -> Row:
    targets = [f"iso:{a.stem}", f"iso:{b.stem}"]
    expected = [f"{k}:{x.stem}" for x in (a, b) for k in ("kernel", "initrd", "squashfs", "iso")]
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeat):
        for n in (1, 2):
            unlink_outputs(*(space.paths.artifact(x, s) for x in (a, b)
                             for s in ("-kernel", "-initrd", ".squashfs", ".iso")))
            run = doit(space, "-n", str(n), *targets)
            expect_ran(run, expected, f"doit -n {n}")
            times[n].append(run.wall)
            log(f"  doit -n {n}: {len(run.build_actions)} build tasks in {run.wall:.1f} s")
    one, two = median(times[1]), median(times[2])
    result = f"-n 1 {one:.1f} s, -n 2 {two:.1f} s, speedup {one / two:.2f}x ({len(expected)} tasks, 2 builds)"
    return Row("parallel", "doit -n 2 vs -n 1 (2 builds: kernel, initrd, squashfs, iso)", result, "-", "-",
               {"n1": one, "n2": two, "speedup": one / two, "executed": expected})


# by hand: the same tool commands the stages run, from the same pure argv builders

def durable(path: Path) -> None:
    """`sync FILE` (fsync): the stages fsync every artifact before renaming it into place, so a
    machine crash never leaves a final name with unwritten data; by hand does the same."""
    sh(["sync", str(path)])


def checksum_argv(path: Path) -> list[str]:
    """SHA-256 by hand with OpenSSL, the implementation the stages use through Python's hashlib
    (coreutils' sha256sum on Debian 12 has no SHA-NI code and is ~4x slower here)."""
    return ["openssl", "dgst", "-sha256", "-r", str(path)] if shutil.which("openssl") else ["sha256sum", str(path)]


def by_hand_squashfs(paths: Paths, b: Build, work: Path) -> None:
    """docker create + docker export | tar -x, the stage's mksquashfs argv, sha256sum."""
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    cid = sh(["docker", "create", read_digest(paths.image_id(b)), "/bench"]).stdout.strip()
    try:
        export = subprocess.Popen(["docker", "export", cid], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        untar = subprocess.run(["tar", "-x", "--numeric-owner", "-p", "-C", str(rootfs), "-f", "-"],
                               stdin=export.stdout)
        export.stdout.close()
        if export.wait() != 0 or untar.returncode != 0:
            raise BenchError("by hand: docker export | tar -x failed")
    finally:
        sh(["docker", "rm", "-f", cid])
    (rootfs / ".dockerenv").unlink(missing_ok=True)
    out = work / "by-hand.squashfs"
    sh(extract.mksquashfs_argv(rootfs, out, b.flavor.squashfs, b.arch))
    durable(out)
    sh(checksum_argv(out))


def by_hand_iso(paths: Paths, b: Build, work: Path) -> None:
    """The stage's grub.cfg and grub-mkrescue argv on the same inputs, then sha256sum."""
    kernel, initrd, squashfs = iso.inputs(paths, b)
    cfg = work / "grub.cfg"
    cfg.write_text(native_iso.grub_cfg(iso.title(b), native_iso.kernel_cmdline()))
    out = work / "by-hand.iso"
    sh(native_iso.mkrescue_argv(out, cfg, kernel, initrd, squashfs))
    durable(out)
    sh(checksum_argv(out))


def by_hand_raw(paths: Paths, b: Build, work: Path) -> None:
    """A generic raw disk like tasks/builders/native_raw.py builds it, as commands: grub-mkstandalone,
    truncate + mkfs.vfat + mmd + mcopy, mkfs.ext4 -d per partition, truncate + sfdisk, dd at the
    offsets, sha256sum."""
    kernel, initrd, squashfs = (paths.artifact(b, s) for s in ("-kernel", "-initrd", ".squashfs"))
    cfg = work / "grub.cfg"
    cfg.write_text(native_raw.grub_cfg())
    loader = work / native_raw.GRUB_EFI[b.arch][1]
    sh(native_raw.grub_mkstandalone_argv(b.arch, loader, cfg))
    boot = {f"EFI/BOOT/{loader.name}": loader, native_raw.KERNEL_NAME: kernel, native_raw.INITRD_NAME: initrd}
    ident = native_raw.ids(b.stem)
    plan = native_raw.plan(sum(f.stat().st_size for f in boot.values()), squashfs.stat().st_size,
                           squashfs.stat().st_size, ident["label_id"], "ef")
    part = {p.label: p for p in plan.partitions}
    fs = {"COS_GRUB": by_hand_fat(work, boot, part["COS_GRUB"].size, ident["vfat"])}
    trees = {"COS_OEM": {}, "COS_RECOVERY": {native_raw.RECOVERY_IMAGE: squashfs},
             "COS_STATE": {native_raw.STATE_IMAGE: squashfs}, "COS_PERSISTENT": {}}
    for label, files in trees.items():
        tree = work / f"{label}.d"
        link_tree(tree, files)
        fs[label] = work / f"{label}.ext4"
        sh(native_raw.mkfs_ext4_argv(fs[label], label, ident[label], tree, part[label].size))
    disk = work / "by-hand.img"
    sh(["truncate", "-s", str(plan.disk_size), disk])
    sh(native_raw.sfdisk_argv(disk), input=native_raw.sfdisk_script(plan), stdin=None)
    for p in plan.partitions:
        sh(["dd", f"if={fs[p.label]}", f"of={disk}", "bs=1M", f"seek={p.start // native_raw.MIB}",
            "conv=notrunc,sparse", "status=none"])
    durable(disk)
    sh(checksum_argv(disk))


def link_tree(tree: Path, files: dict[str, Path]) -> None:
    tree.mkdir(parents=True)
    for rel, src in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(src, tree / rel)


def by_hand_fat(work: Path, boot: dict[str, Path], size: int, volume_id: str) -> Path:
    fat = work / "COS_GRUB.vfat"
    sh(["truncate", "-s", str(size), fat])
    sh(native_raw.mkfs_vfat_argv(fat, "COS_GRUB", volume_id))
    named = work / "COS_GRUB.d"
    link_tree(named, boot)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    sh(native_raw.mmd_argv(fat, native_raw.fat_dirs(list(boot))), env=env)
    by_dir: dict[str, list[Path]] = {}
    for rel in boot:
        by_dir.setdefault(os.path.dirname(rel), []).append(named / rel)
    for d, files in by_dir.items():
        sh(native_raw.mcopy_argv(fat, files, d + "/" if d else ""), env=env)
    return fat


STAGES = {  # name -> (artifact suffix, by-hand function, what by hand is)
    "squashfs": (".squashfs", by_hand_squashfs, "docker export | tar -x, mksquashfs, sync, sha256"),
    "iso": (".iso", by_hand_iso, "grub-mkrescue, sync, sha256"),
    "raw": (".img", by_hand_raw, "grub-mkstandalone, mkfs.vfat+mtools, mkfs.ext4 -d x4, sfdisk, dd, sync, sha256"),
}


def settle() -> None:
    """`sync` before a timed stage or by-hand run: both start with no dirty data to write back.
    Without it the side that runs after the other's big write pays for that writeback (the same
    grub-mkrescue command took 0.6 s to 1.6 s here depending on it)."""
    sh(["sync"])


def bench_stage(space: Space, b: Build, stage: str, repeat: int) -> Row:
    suffix, by_hand, hand_desc = STAGES[stage]
    target = f"{stage}:{b.stem}"
    work = space.state.parent / "by-hand"
    process, task, hand = [], [], []

    def staged() -> None:
        unlink_outputs(space.paths.artifact(b, suffix))
        settle()
        run = doit(space, target, json_report=True)
        expect_ran(run, [target], f"doit {target}")
        process.append(run.wall)
        task.append(run.elapsed[target])

    def manual() -> None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        settle()
        try:
            hand.append(timed(lambda: by_hand(space.paths, b, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    for n in range(repeat):
        # alternate which side goes first: on this VM the page cache and writeback state left
        # by the previous big write swing one ISO build between 0.9 s and 1.9 s
        for side in ((staged, manual) if n % 2 == 0 else (manual, staged)):
            side()
        log(f"  {stage}: doit {process[-1]:.1f} s (task {task[-1]:.1f} s), by hand {hand[-1]:.1f} s")
    p, t, h = median(process), median(task), median(hand)
    result = (f"doit {p:.1f} s, task {t:.1f} s, by hand {h:.1f} s: process {p / h:.2f}, task {t / h:.2f} "
              f"(by hand = {hand_desc})")
    return Row(f"stage-{stage}", f"{stage} stage vs by hand", result, f"task <= {STAGE_GOAL:g}",
               "yes" if t / h <= STAGE_GOAL else "no",
               {"process": p, "task": t, "hand": h, "process_ratio": p / h, "task_ratio": t / h})


def bench_reuse(root: Path, real: Space, a: Build, repeat: int) -> Row:
    """convert:<A> with the same flavor file in a fresh state directory."""
    fresh = Space(real.flavors, root / "reuse" / "state", root / "reuse" / "outputs")
    target = f"convert:{a.stem}"
    walls, task, ran, cached = [], [], [], False
    try:
        for _ in range(repeat):
            shutil.rmtree(fresh.state.parent, ignore_errors=True)
            run = doit(fresh, target, json_report=True)
            if target not in run.executed:
                raise BenchError(f"fresh state: {target} did not run ({run.executed})")
            walls.append(run.wall)
            task.append(run.elapsed[target])
            ran = run.executed
            cached = run_step_cached(run.outputs.get(target, ""))
            same = read_digest(fresh.paths.image_id(a)) == read_digest(real.paths.image_id(a))
    finally:
        shutil.rmtree(fresh.state.parent, ignore_errors=True)
    record = root / "real" / FIRST_CONVERSION
    first = json.loads(record.read_text()) if record.exists() else None
    first_text = (f"first conversion in this bench dir {first['elapsed']:.0f} s "
                  f"({'also a cache hit' if first['cached'] else 'cold: apt-get, initramfs'})"
                  if first else "first conversion: not recorded")
    result = (f"{median(walls):.1f} s (convert task {median(task):.1f} s; ran "
              f"{', '.join(t.split(':')[0] for t in ran)}; "
              f"BuildKit {'cache hit' if cached else 'NO cache hit'}, same image ID: {'yes' if same else 'no'}); "
              f"{first_text}")
    return Row("reuse", "conversion reuse (fresh state, warm layer cache)", result, "-", "-",
               {"wall": median(walls), "task": median(task), "executed": ran, "cached": cached,
                "same_image": same, "first": first and first["elapsed"]})


# --- output -----------------------------------------------------------------------------------

HEADER = ("benchmark", "result", "goal", "met?")


def cells(row: Row) -> tuple[str, str, str, str]:
    return row.benchmark, row.result, row.goal, row.met


def plain_table(rows: list[Row]) -> str:
    table = [HEADER] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*table[0]), "-+-".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt.format(*line) for line in table[1:]])


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows])


def machine() -> str:
    """The load averages (1, 5, 15 min): another job on the machine shows here."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- clean ------------------------------------------------------------------------------------

def clean(root: Path, ns: str) -> None:
    """Remove the bench dir, the namespace's images from the engine (tagged or only pushed) and
    its manifests from the registry."""
    client = engine()
    drop_namespace(client, ns)
    for image in client.images.list():
        names = (image.attrs.get("RepoTags") or []) + (image.attrs.get("RepoDigests") or [])
        if any(n.startswith(ns + "/") for n in names):
            try:
                client.images.remove(image.id, force=True)
            except Exception:  # noqa: BLE001 - already gone or in use: best effort
                pass
    shutil.rmtree(root, ignore_errors=True)
    log(f"removed {root} and the images of {ns}")


# --- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                    help=f"bench directory, kept between runs (default {DEFAULT_DIR})")
    ap.add_argument("--only", default=",".join(BENCHES),
                    help=f"comma-separated rows to run: {','.join(BENCHES)} (default: all)")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"stages of the stages row: {','.join(STAGES)} (default: all; iso and raw alone are cheap "
                         "to --repeat)")
    ap.add_argument("--builds", type=int, default=48, help="size of the synthetic matrix (default 48, >= 1)")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions; medians are printed (default 1)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--json", type=Path, help="also write the rows with their raw numbers to this JSON file")
    ap.add_argument("--registry", default=DEFAULT_NS,
                    help=f"registry namespace for everything pushed (default {DEFAULT_NS})")
    ap.add_argument("--base", help="base image of the synthetic matrix (default: a tiny dash rootfs "
                                   "pushed as <registry>/base-tiny:bookworm-dash)")
    ap.add_argument("--real-base", help="base image of the builtin-converter builds (default: the minbase "
                                        "rootfs pushed as <registry>/base-minbase:bookworm)")
    ap.add_argument("--kairos-init", help="kairos-init STAND-IN image (default: built from the integration "
                                          "tests' stand-in script as <registry>/kairos-init-standin:v0)")
    ap.add_argument("--rootfs-tar", type=Path, default=DEFAULT_TAR,
                    help=f"Debian minbase rootfs tarball (default {DEFAULT_TAR}; made with mmdebstrap if missing)")
    ap.add_argument("--clean", action="store_true",
                    help="remove --dir and every image of --registry (engine and registry), then exit")
    args = ap.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in args.only if x not in BENCHES]
    if unknown:
        ap.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(BENCHES)})")
    args.stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = [x for x in args.stages if x not in STAGES]
    if unknown:
        ap.error(f"--stages: unknown {', '.join(unknown)} (choose from {', '.join(STAGES)})")
    if args.builds < 1 or args.repeat < 1:
        ap.error("--builds and --repeat must be >= 1")
    if not args.registry.startswith("127.0.0.1:"):
        ap.error("--registry must be a namespace in a local registry (127.0.0.1:PORT/...)")
    args.dir = args.dir.absolute()
    args.registry = args.registry.rstrip("/")
    return args


def run_benches(args) -> list[Row]:
    check_services(args.registry)
    images = Images(args)
    rows: list[Row] = []
    matrix = Space.under(args.dir / "matrix")
    if {"noop", "selective"} & set(args.only):
        builds = prepare_matrix(matrix, args, images)
        if "noop" in args.only:
            rows.append(bench_noop(matrix, builds, args.repeat))
        if "selective" in args.only:
            rows.append(bench_selective(matrix, builds, args.repeat))
    if {"parallel", "stages", "reuse"} & set(args.only):
        real = Space.under(args.dir / "real")
        a, b = prepare_real(real, args, images)
        if "parallel" in args.only:
            rows.append(bench_parallel(real, a, b, args.repeat))
        if "stages" in args.only:
            rows += [bench_stage(real, a, stage, args.repeat) for stage in args.stages]
        if "reuse" in args.only:
            rows.append(bench_reuse(args.dir, real, a, args.repeat))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.clean:
            clean(args.dir, args.registry)
            return 0
        before = machine()
        rows = run_benches(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(rows) if args.markdown else plain_table(rows))
    print(f"\n(median of {args.repeat}; {os.cpu_count()} cores; load average {before} at the start, "
          f"{machine()} at the end; bench dir {args.dir})")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    failed = [r.name for r in rows if r.name == "selective" and r.met != "yes"]
    if failed:
        print(f"bench: error: unexpected tasks ran in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
