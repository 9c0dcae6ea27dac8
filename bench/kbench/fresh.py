"""The rows that build from nothing: the repository's own flavors, each in a fresh bench
subdirectory, with a SOURCE_DATE_EPOCH of the moment so that the mmdebstrap base is new and
BuildKit has no layer of it (a cold conversion, apt downloads included).

- cold: the default flavor (flavors/debian-12.yaml): the whole `doit`, where the time goes per
  stage, and the boot stage's boots (seconds to the login prompt per artifact and firmware).
- rpi4: the arm64 Raspberry Pi 4 example (flavors/examples/debian-12-rpi4.yaml) with an overlay
  of one file: cold `doit raw:<stem>`, `doit boot:<stem>`, then one overlay file changed and
  `doit raw:<stem>` again: which tasks ran, the time against the cold build, and whether
  BuildKit reused the package and initrd layers.

Both write their flavor copies with the registry moved under --registry, and remove their
directory and images afterwards (the registry's blobs go at its next garbage collection).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from tests.harness import drop_namespace

from . import ROOT
from .common import BenchError, Row, log
from .images import engine
from .space import Space, doit, run_step_cached

DEFAULT_FLAVOR = ROOT / "flavors" / "debian-12.yaml"
RPI4_FLAVOR = ROOT / "flavors" / "examples" / "debian-12-rpi4.yaml"
RPI4_GOAL = 0.40
OVERLAY_FILE = Path("overlay-bench/etc/kairos-bench/overlay.conf")


def fresh_space(root: Path, name: str, source: Path, registry: str, **changes) -> Space:
    """A new bench subdirectory holding ``source`` with its registry under ``registry``."""
    shutil.rmtree(root / name, ignore_errors=True)
    space = Space.under(root / name)
    space.flavors.mkdir(parents=True)
    doc = yaml.safe_load(source.read_text())
    doc.update(registry=registry, **changes)
    (space.flavors / source.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return space


def epoch() -> dict[str, str]:
    return {"SOURCE_DATE_EPOCH": str(int(time.time()))}


def by_stage(elapsed: dict[str, float]) -> dict[str, float]:
    """Task seconds summed per stage (`convert:<stem>` -> convert), biggest first."""
    out: dict[str, float] = {}
    for task, seconds in elapsed.items():
        stage = task.split(":", 1)[0]
        out[stage] = out.get(stage, 0.0) + seconds
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def boots(space: Space, stem: str, version: str) -> list[dict]:
    report = space.outputs / version / f"{stem}-boot.json"
    return json.loads(report.read_text())["boots"] if report.exists() else []


def boot_text(records: list[dict]) -> str:
    return ", ".join(f"{Path(r['artifact']).suffix.lstrip('.') or r['artifact']}-{r['firmware']} "
                     f"{r['seconds']:.0f} s ({r['accel']})" if r.get("passed") else
                     f"{r['artifact']} {r['firmware']} {'skipped' if r.get('skipped') else 'FAILED'}"
                     for r in records)


def cleanup(root: Path, name: str, namespace: str) -> None:
    drop_namespace(engine(), namespace)
    shutil.rmtree(root / name, ignore_errors=True)


def bench_cold(root: Path, registry: str) -> Row:
    namespace = f"{registry}/cold"
    space = fresh_space(root, "cold", DEFAULT_FLAVOR, namespace)
    (b,) = space.builds()
    log(f"cold: the default flavor from nothing in {space.state.parent} (several minutes, boots included)")
    try:
        run = doit(space, json_report=True, env=epoch())
        stages = by_stage(run.elapsed)
        boot = stages.get("boot", 0.0)
        records = boots(space, b.stem, b.flavor.version)
    finally:
        cleanup(root, "cold", namespace)
    top = ", ".join(f"{k} {v:.0f}" for k, v in list(stages.items())[:6])
    result = (f"{run.wall:.0f} s, without boot {run.wall - boot:.0f} s; boot {boot:.0f} s: {boot_text(records)}; "
              f"stages (s): {top}")
    return Row("cold", "default flavor from nothing (doit, fresh state and base)", result, "-", "-",
               {"wall": run.wall, "without_boot": run.wall - boot, "boot": boot, "stages": stages,
                "boots": records, "executed": run.executed})


def bench_rpi4(root: Path, registry: str) -> Row:
    namespace = f"{registry}/rpi4"
    space = fresh_space(root, "rpi4", RPI4_FLAVOR, namespace, overlay=OVERLAY_FILE.parts[0])
    overlay = space.flavors / OVERLAY_FILE
    overlay.parent.mkdir(parents=True)
    overlay.write_text("v1\n")
    (b,) = space.builds()
    chain = [f"{k}:{b.stem}" for k in ("convert", "push", "kernel", "initrd", "squashfs", "raw")]
    log(f"rpi4: {b.stem} from nothing in {space.state.parent} (arm64 under qemu-user: many minutes)")
    env = epoch()  # the same for every run of the row: another epoch is another base, a new conversion
    try:
        cold = doit(space, f"raw:{b.stem}", json_report=True, env=env)
        log(f"  cold raw: {cold.wall:.0f} s; booting")
        booted = doit(space, f"boot:{b.stem}", json_report=True, env=env)
        records = boots(space, b.stem, b.flavor.version)
        overlay.write_text("v2\n")
        warm = doit(space, f"raw:{b.stem}", json_report=True, env=env)
        log(f"  overlay change: {warm.wall:.0f} s")
        cached = run_step_cached(warm.outputs.get(f"convert:{b.stem}", ""))
    finally:
        cleanup(root, "rpi4", namespace)
    ran = sorted(warm.build_actions)
    if ran != sorted(chain):
        raise BenchError(f"rpi4: after an overlay change expected {chain} to run, got {ran}")
    ratio = warm.wall / cold.wall
    result = (f"cold raw {cold.wall:.0f} s (convert {cold.elapsed.get(f'convert:{b.stem}', 0):.0f} s); "
              f"boot {booted.wall:.0f} s: {boot_text(records)}; overlay change {warm.wall:.0f} s = {ratio:.0%} "
              f"(convert {warm.elapsed.get(f'convert:{b.stem}', 0):.0f} s, package+initrd layers "
              f"{'CACHED' if cached else 'REBUILT'}); ran {', '.join(t.split(':')[0] for t in warm.build_actions)}")
    return Row("rpi4", "rpi4 arm64 raw: cold, boot, one overlay file changed", result,
               f"change <= {RPI4_GOAL:.0%} of cold", "yes" if ratio <= RPI4_GOAL and cached else "no",
               {"cold": cold.wall, "boot": booted.wall, "boots": records, "overlay_change": warm.wall,
                "ratio": ratio, "cached": cached, "executed": warm.build_actions})
