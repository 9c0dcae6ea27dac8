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
  [regcache]  `doit convert:<stem>` of that build in a fresh state directory on a second, empty
              dockerd (a new CI runner): BuildKit takes the steps from the inline cache of the
              build's last push (cache_from: own); next to the first (cold) conversion.
  [cold]      the default flavor (flavors/debian-12.yaml) from nothing: fresh state, a new
              mmdebstrap base (SOURCE_DATE_EPOCH of the moment, so no layer cache): the whole run,
              the run without its boot task, the boots' seconds to the login prompt, time per stage.
  [rpi4]      the arm64 Raspberry Pi 4 example flavor from nothing: cold `doit raw:<stem>`, `doit
              boot:<stem>`, then one overlay file changed and `doit raw:<stem>`: the tasks that ran,
              the time as a share of the cold build (goal <= 40%), BuildKit's reuse of the layers.
              cold and rpi4 take many minutes each and leave nothing behind.

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
import json
import os
import sys
from pathlib import Path

from kbench.benches import bench_noop, bench_parallel, bench_regcache, bench_reuse, bench_selective, bench_stage
from kbench.by_hand import STAGES
from kbench.common import BenchError, Row
from kbench.flavors import prepare_matrix, prepare_real
from kbench.fresh import bench_cold, bench_rpi4
from kbench.images import Images, check_services, clean
from kbench.space import Space
from kbench.table import machine, markdown_table, plain_table


DEFAULT_DIR = Path("/var/tmp/kairos-bench-matrix")
DEFAULT_NS = "127.0.0.1:5000/bench"
DEFAULT_TAR = Path("/var/tmp/kairos-test-cache/bookworm-minbase-amd64.tar")
BENCHES = ("noop", "selective", "parallel", "stages", "reuse", "regcache", "cold", "rpi4")


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
    ap.add_argument("--real-base", help="base image of the builtin-converter builds (default: the minbase rootfs with a bench-dir id, "
                                        "pushed as <registry>/base-minbase:bookworm-<id>)")
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
    if {"parallel", "stages", "reuse", "regcache"} & set(args.only):
        real = Space.under(args.dir / "real")
        a, b = prepare_real(real, args, images)
        if "parallel" in args.only:
            rows.append(bench_parallel(real, a, b, args.repeat))
        if "stages" in args.only:
            rows += [bench_stage(real, a, stage, args.repeat) for stage in args.stages]
        if "reuse" in args.only:
            rows.append(bench_reuse(args.dir, real, a, args.repeat))
        if "regcache" in args.only:
            rows.append(bench_regcache(args.dir, real, a, args.repeat))
    if "cold" in args.only:
        rows.append(bench_cold(args.dir, args.registry))
    if "rpi4" in args.only:
        rows.append(bench_rpi4(args.dir, args.registry))
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
