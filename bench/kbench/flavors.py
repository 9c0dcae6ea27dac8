"""The flavor files of the bench dir, written with the tests' flavor builders (tests/harness.py),
and the first `doit` runs that bring them up to date: the synthetic matrix (kairos-init stand-in,
tiny base) and the two real builds (builtin converter, minbase)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from tasks.matrix import Build
from tests.harness import LZ4, builtin_doc, flavor_text, standin_doc

from .common import log
from .images import Images
from .space import Space, doit, run_step_cached


VERSION = "v3.1.0"
K3S = ("v1.28.2+k3s1", "v1.29.1+k3s1", "v1.30.2+k3s1")
PER_FLAVOR = 1 + len(K3S)          # core + one standard build per k3s version


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


def prepare_matrix(space: Space, args, images: Images) -> list[Build]:
    write_matrix(space.flavors, args.builds, images, args.registry)
    builds = space.builds()
    log(f"matrix: {len(builds)} builds in {len(list(space.flavors.glob('*.yaml')))} flavor files; "
        "bringing it up to date (the first time builds all of them: about a minute)")
    first = doit(space)
    log(f"  {len(first.build_actions)} build tasks ran in {first.wall:.1f} s")
    return builds


REAL_A, REAL_B = "benchpa", "benchpb"
REAL_ID = Path("bench-id")


def write_real(flavors: Path, images: Images, registry: str) -> None:
    """Two builtin-converter builds on the minbase image; A also makes the generic raw image.
    Their base holds an id made once per bench dir (the overlay would not do: the converter
    copies it in after its RUN steps), so the first conversion in a new bench dir is cold (apt
    downloads the kernel) even when BuildKit's cache holds the same conversion made elsewhere;
    B's is then a cache hit of A's."""
    if not (flavors / REAL_ID).exists():
        write_if_changed(flavors / REAL_ID, f"{os.urandom(8).hex()}\n")
    base = images.real_base((flavors / REAL_ID).read_text().strip())
    registry = f"{registry}/kairos"
    a = builtin_doc(REAL_A, base, registry, ["kernel", "initrd", "squashfs", "iso", "raw"], raw_generic=True)
    b = builtin_doc(REAL_B, base, registry, ["kernel", "initrd", "squashfs", "iso"])
    for doc in (a, b):
        write_if_changed(flavors / f"{doc['flavor']}.yaml", flavor_text(doc))


def real_builds(space: Space) -> tuple[Build, Build]:
    by_flavor = {b.flavor.flavor: b for b in space.builds()}
    return by_flavor[REAL_A], by_flavor[REAL_B]


FIRST_CONVERSION = "first-conversion.json"


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
