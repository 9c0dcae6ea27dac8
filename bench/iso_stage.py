#!/usr/bin/env python3
"""Benchmark: the iso stage against running the same commands by hand.

For the default flavor (flavors/debian-12.yaml) with `iso` added to its artifacts:
1. build everything once (`doit iso:<stem>`: base, conversion, kernel, initrd,
   squashfs, ISO) in a benchmark state directory that is kept between runs;
2. delete the ISO and time `doit iso:<stem>` end to end (process start, task
   loading, preflight, resolve, the ISO task: grub.cfg, grub-mkrescue, sha256);
   then time the same grub-mkrescue command (same grub.cfg, same inputs) and
   sha256sum by hand;
3. unless --iso-only: delete the squashfs and the ISO and time
   `doit squashfs:<stem> iso:<stem>` against docker export | tar, the same
   mksquashfs and the same grub-mkrescue by hand;
4. print a table (seconds, ratio) and the size of each artifact file.

Usage: python3 bench/iso_stage.py [--dir DIR] [--repeat N] [--iso-only]
It needs what the pipeline needs (bash ci/setup.sh). Not a test: it prints numbers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.builders import native_iso  # noqa: E402
from tasks.config import load_flavors  # noqa: E402
from tasks.matrix import expand  # noqa: E402
from tasks.stages import extract, iso  # noqa: E402
from tasks.state import Paths, read_digest  # noqa: E402
from tasks.stages.convert import image_file  # noqa: E402

FLAVOR = ROOT / "flavors" / "debian-12.yaml"
ARTIFACTS = ["kernel", "initrd", "squashfs", "iso"]


def sh(argv: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def doit(env: dict, *targets: str) -> list[str]:
    """Run doit; return the tasks it executed (lines starting with '.  ')."""
    proc = sh([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *targets], env=env, cwd=ROOT)
    return [line[3:].strip() for line in proc.stdout.splitlines() if line.startswith(".  ")]


def build_actions(executed: list[str]) -> list[str]:
    return [t for t in executed if not t.startswith(("preflight", "resolve:"))]


def write_flavor(dest: Path) -> Path:
    doc = yaml.safe_load(FLAVOR.read_text())
    doc["artifacts"] = ARTIFACTS
    dest.mkdir(parents=True, exist_ok=True)
    (dest / FLAVOR.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def by_hand_iso(paths: Paths, b, work: Path) -> None:
    """The same grub.cfg and grub-mkrescue command as the stage, plus sha256sum."""
    kernel, initrd, squashfs = (extract.output(paths, b, s) for s in iso.INPUTS)
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "grub.cfg"
    cfg.write_text(native_iso.grub_cfg(iso.title(b), native_iso.kernel_cmdline()))
    out = work / "by-hand.iso"
    out.unlink(missing_ok=True)
    sh(native_iso.mkrescue_argv(out, cfg, kernel, initrd, squashfs))
    sh(["sha256sum", str(out)])


def by_hand_squashfs_iso(paths: Paths, b, work: Path) -> None:
    """docker export | tar -x, the same mksquashfs command, then by_hand_iso on that squashfs."""
    image = read_digest(image_file(paths, b))
    rootfs = work / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.mkdir(parents=True)
    cid = sh(["docker", "create", image, "/bench"]).stdout.strip()
    try:
        export = subprocess.Popen(["docker", "export", cid], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        tar = subprocess.run(["tar", "-x", "--numeric-owner", "-p", "-C", str(rootfs), "-f", "-"],
                             stdin=export.stdout)
        export.stdout.close()
        if export.wait() != 0 or tar.returncode != 0:
            sys.exit("docker export | tar failed")
    finally:
        sh(["docker", "rm", "-f", cid])
    (rootfs / ".dockerenv").unlink(missing_ok=True)
    sq = work / "by-hand.squashfs"
    sq.unlink(missing_ok=True)
    sh(extract.mksquashfs_argv(rootfs, sq, b.flavor.squashfs, b.arch))
    sh(["sha256sum", str(sq)])
    shutil.rmtree(rootfs, ignore_errors=True)
    kernel, initrd = extract.output(paths, b, "-kernel"), extract.output(paths, b, "-initrd")
    cfg = work / "grub.cfg"
    cfg.write_text(native_iso.grub_cfg(iso.title(b), native_iso.kernel_cmdline()))
    out = work / "by-hand.iso"
    out.unlink(missing_ok=True)
    sh(native_iso.mkrescue_argv(out, cfg, kernel, initrd, sq))
    sh(["sha256sum", str(out)])


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("KAIROS_BENCH_DIR", "/var/tmp/kairos-bench")),
                    help="benchmark directory; its state/ and outputs/ are reused between runs "
                         "(default /var/tmp/kairos-bench)")
    ap.add_argument("--repeat", type=int, default=1, help="timed repetitions; the median is printed")
    ap.add_argument("--iso-only", action="store_true", help="skip the squashfs + iso comparison")
    args = ap.parse_args()

    bench = args.dir.absolute()
    flavors = write_flavor(bench / "flavors")
    paths = Paths(bench / "state", bench / "outputs")
    env = dict(os.environ, KAIROS_FLAVORS=str(flavors), KAIROS_STATE=str(paths.state),
               KAIROS_OUTPUTS=str(paths.outputs))
    env.pop("KAIROS_VERBOSE", None)
    (b,) = [x for x in expand(load_flavors([flavors])) if "iso" in x.kinds]
    target = f"iso:{b.stem}"
    out = iso.output(paths, b)
    squashfs = extract.output(paths, b, ".squashfs")

    print(f"flavor {FLAVOR.relative_to(ROOT)} + iso, build {b.stem}")
    print(f"bench dir {bench} (state and outputs kept between runs)")
    first, executed = timed(lambda: doit(env, target))
    print(f"first run (inputs and ISO; {len(build_actions(executed))} build tasks): {first:.1f}s")

    rows = []
    work = Path(tempfile.mkdtemp(prefix="by-hand-", dir=paths.state))
    try:
        stage_t, hand_t = [], []
        for _ in range(args.repeat):
            for p in (out, Path(str(out) + ".sha256")):
                p.unlink(missing_ok=True)
            t, executed = timed(lambda: doit(env, target))
            ran = build_actions(executed)
            if ran != [target]:
                sys.exit(f"expected only {target} to run, got {ran}")
            stage_t.append(t)
            hand_t.append(timed(lambda: by_hand_iso(paths, b, work))[0])
        rows.append(("iso stage", f"doit {target}", "grub-mkrescue + sha256sum",
                     statistics.median(stage_t), statistics.median(hand_t)))

        if not args.iso_only:
            stage_t, hand_t = [], []
            for _ in range(args.repeat):
                for p in (out, squashfs):
                    p.unlink(missing_ok=True)
                    Path(str(p) + ".sha256").unlink(missing_ok=True)
                t, executed = timed(lambda: doit(env, f"squashfs:{b.stem}", target))
                ran = build_actions(executed)
                if sorted(ran) != sorted([f"squashfs:{b.stem}", target]):
                    sys.exit(f"expected squashfs and iso to run, got {ran}")
                stage_t.append(t)
                hand_t.append(timed(lambda: by_hand_squashfs_iso(paths, b, work))[0])
            rows.append(("squashfs + iso", "doit squashfs: iso:",
                         "export|tar, mksquashfs, grub-mkrescue, sha256sum",
                         statistics.median(stage_t), statistics.median(hand_t)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'what':<16} {'stage s':>8} {'by hand s':>10} {'ratio':>6}  by hand = ")
    for what, _, hand_desc, s, h in rows:
        print(f"{what:<16} {s:>8.1f} {h:>10.1f} {s / h:>6.2f}  {hand_desc}")
    print(f"(median of {args.repeat}; stage = whole `doit` process: load, preflight, resolve, task)")
    print()
    print(f"{'artifact':<60} {'bytes':>12} {'size':>10}")
    for f in sorted(paths.version_dir(b.flavor.version).iterdir()):
        if f.is_file() and not f.name.startswith("."):
            print(f"{f.name:<60} {f.stat().st_size:>12} {human(f.stat().st_size):>10}")


if __name__ == "__main__":
    main()
