#!/usr/bin/env python3
"""The full reproducibility check: the default flavor (flavors/debian-12.yaml) with a raw generic
image and iPXE media added, built twice from scratch by `python -m tasks rebuild-check`; prints its
table (one row per artifact: identical, DIFFERENT, MISSING or known exception) and how long each
run took. Exits with rebuild-check's status: 0 when every artifact is identical or a known
exception. Not a test: it takes two full builds (about 10 minutes each here).

Usage:
  python3 bench/rebuild_check.py                 # the table; both runs removed afterwards
  python3 bench/rebuild_check.py --keep          # keep both runs' state and outputs under --dir
  python3 bench/rebuild_check.py --json FILE     # also the rows as JSON
  python3 bench/rebuild_check.py --clean         # remove --dir and the images it pushed

The flavor copy differs from the default flavor in what it builds, not how: `raw` with
`raw_generic: true` (the generic raw disk image and its .img.xz), `ipxe` with a netboot URL, and no
`boot` (a boot check writes a record of that boot, not an artifact). It pushes to --registry
(default 127.0.0.1:5000/bench-rebuild), not to the default flavor's repository. Everything else
(base, converter, packages, scans, SOURCE_DATE_EPOCH) is the default flavor's.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FLAVOR = REPO / "flavors" / "debian-12.yaml"


def flavor_copy(registry: str) -> dict:
    """The default flavor with raw generic and iPXE added and boot dropped (pure but for the read)."""
    doc = yaml.safe_load(DEFAULT_FLAVOR.read_text())
    artifacts = [a for a in doc["artifacts"] if a != "boot"]
    doc.update(registry=registry, artifacts=artifacts + ["raw", "ipxe"], raw_generic=True,
               netboot_url="http://10.0.2.2:8080/kairos")
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dir", default="/var/tmp/kairos-bench-rebuild", help="where the flavor copy and both runs go")
    p.add_argument("--registry", default="127.0.0.1:5000/bench-rebuild", help="the repository prefix it pushes to")
    p.add_argument("--keep", action="store_true", help="keep both runs' state and outputs")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    p.add_argument("--clean", action="store_true", help="remove --dir and the images it pushed, then exit")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)
        refs = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"], capture_output=True,
                              text=True).stdout.split()
        mine = [r for r in refs if r.startswith(args.registry + "/")]
        if mine:
            subprocess.run(["docker", "rmi", "-f", *mine], capture_output=True)
        print(f"removed {root} and {len(mine)} image(s) of {args.registry}")
        return 0
    work = root / "work"
    if work.exists():
        shutil.rmtree(work)
    flavors = root / "flavors"
    flavors.mkdir(parents=True, exist_ok=True)
    (flavors / "debian-12.yaml").write_text(yaml.safe_dump(flavor_copy(args.registry), sort_keys=False))
    argv = [sys.executable, "-m", "tasks", "rebuild-check", "--flavors", str(flavors), "--work", str(work)]
    argv += ["--keep"] if args.keep else []
    argv += ["--json", args.json] if args.json else []
    print(f"$ {' '.join(argv)}", flush=True)
    started = time.monotonic()
    rc = subprocess.run(argv, cwd=REPO).returncode
    print(f"rebuild-check: exit {rc} after {time.monotonic() - started:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
