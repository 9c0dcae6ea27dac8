#!/usr/bin/env python3
"""Torture benchmark: a signed build SIGKILLed at random moments in every stage, resumed until it
completes, checked after every run. Prints the figures; exits 1 when any check failed.

Usage:
  python3 bench/torture.py                         # 50 trials of the default profile, seed 1
  python3 bench/torture.py --trials 5 --seed 7     # fewer trials, another sequence
  python3 bench/torture.py --profile small         # seconds per trial (the test suite runs this)
  python3 bench/torture.py --clean                 # remove the torture dir and everything it pushed

Profiles:
  default  the default flavor's build (mmdebstrap bookworm base, builtin converter, kernel, initrd,
           squashfs, ISO, sbom, trivy), signed with a cosign key, plus a generic raw image; lz4
           squashfs and raw_compression none keep trials short; no boot checks (they write logs,
           not artifacts). A trial takes seconds to a few minutes.
  small    a kairos-init STAND-IN (tests/harness.py; it is not kairos-init) on a tiny base:
           squashfs, sbom, trivy, signed. A trial takes seconds.

A trial picks a stage of the profile (seeded), makes its work necessary (convert, push: a new
overlay file with 16 MiB of random data; iso, raw: a new cloud-config; pull: the base dropped from
the engine; bootstrap, seed, kernel, initrd, squashfs, sbom, trivy, sign, manifest: that stage's
output or record deleted), runs `doit` and SIGKILLs its process group a random time within that
stage's duration (measured on the previous complete run) after the stage's task line. Each resumed
run is killed again with probability 0.35 (at most 3 times), then runs to completion.

Checked after every killed run: no file under its final name mismatches its .sha256 (corrupt).
Checked after the complete run: every SHA256SUMS line holds, the squashfs holds the trial's
overlay marker, the ISO and raw image its cloud-config marker, the manifest the pushed digest
(stale); `doit verify` passes; a no-op run executes no build task; no partial file under state
or outputs and no extraction container of this state dir is left (leftovers).

Everything lives under --dir/<profile> (kept between runs) and the registry namespace --registry.
Needs what the pipeline needs (bash ci/setup.sh --all).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kbench.common import BenchError, log
from kbench.images import Images, check_services, clean
from kbench.space import Space
from kbench.torture import PROFILES, as_json, failed, report, run

DEFAULT_DIR = Path("/var/tmp/kairos-torture")
DEFAULT_NS = "127.0.0.1:5000/torture"
DEFAULT_TAR = Path("/var/tmp/kairos-test-cache/bookworm-minbase-amd64.tar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="default", help="what is built (default: default)")
    ap.add_argument("--trials", type=int, default=50, help="number of trials (default 50, >= 1)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random stages and moments (default 1)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"working directory, kept (default {DEFAULT_DIR})")
    ap.add_argument("--registry", default=DEFAULT_NS, help=f"registry namespace (default {DEFAULT_NS})")
    ap.add_argument("--rootfs-tar", type=Path, default=DEFAULT_TAR,
                    help=f"minbase rootfs tarball for the small profile's tiny base (default {DEFAULT_TAR})")
    ap.add_argument("--kairos-init", help="kairos-init STAND-IN image of the small profile (default: built and pushed "
                                          "as <registry>/kairos-init-standin:v0)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file (after every trial)")
    ap.add_argument("--clean", action="store_true", help="remove --dir and every image of --registry, then exit")
    args = ap.parse_args(argv)
    if args.trials < 1:
        ap.error("--trials must be >= 1")
    if not args.registry.startswith("127.0.0.1:"):
        ap.error("--registry must be a namespace in a local registry (127.0.0.1:PORT/...)")
    args.dir, args.registry = args.dir.absolute(), args.registry.rstrip("/")
    # what kbench.images.Images reads
    args.base = args.real_base = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.clean:
        clean(args.dir, args.registry)
        return 0
    try:
        check_services(args.registry)
        profile = PROFILES[args.profile]
        space = Space.under(args.dir / profile.name)
        totals = run(space, profile, args.registry, Images(args), args.trials, args.seed,
                     progress=lambda totals: write_json(args, totals, profile))
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    print(report(totals, profile, args.seed))
    return 1 if failed(totals) else 0


def write_json(args: argparse.Namespace, totals, profile) -> None:
    """--json after every trial (atomically): an interrupted run keeps the figures so far."""
    if args.json:
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(as_json(totals, profile, args.seed), indent=2) + "\n")
        partial.replace(args.json)


if __name__ == "__main__":
    sys.exit(main())
