"""`python -m tasks ...`: commands that are not doit tasks.

  plan   print the expanded build matrix: every build's image tag and the file
         name of every artifact it produces (Kairos naming convention)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, load_flavors
from .graph import flavor_sources, select_builds
from .matrix import Build

ROOT = Path(__file__).resolve().parent.parent


def build_record(b: Build) -> dict:
    return {
        "stem": b.stem,
        "flavor_file": str(b.flavor.path),
        "flavor": b.flavor.flavor,
        "release": b.flavor.release,
        "variant": b.variant,
        "k3s_version": b.k3s_version,
        "arch": b.arch,
        "device": b.device,
        "version": b.version,
        "image": b.image,
        "base_image": b.base.ref,
        "converter": b.flavor.converter,
        "artifacts": b.files(),
    }


def render_text(builds: list[Build]) -> str:
    lines = []
    for b in builds:
        lines.append(b.stem)
        lines.append(f"  {'image':<9} {b.image}")
        for kind, names in b.files().items():
            for i, name in enumerate(names):
                lines.append(f"  {kind if i == 0 else '':<9} {name}")
    lines.append(f"{len(builds)} build(s)")
    return "\n".join(lines) + "\n"


def cmd_plan(args) -> int:
    try:
        flavors = load_flavors(flavor_sources(ROOT, args.flavors))
        builds = select_builds(flavors, args.shard)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.json:
        json.dump({"builds": [build_record(b) for b in builds]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(builds))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tasks",
        description="Kairos release pipeline helpers. Builds run with `doit`; see `doit list`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plan = sub.add_parser(
        "plan", help="print the expanded build matrix and artifact names",
        description="Expand the flavor files into builds and print, for each, its image tag and the "
                    "file name of every artifact, named by the Kairos convention. Contacts nothing.")
    plan.add_argument("--flavors", metavar="PATHS",
                      help="flavor file or directory (several separated by ':'); default: flavors/")
    plan.add_argument("--shard", metavar="I/N", help="only shard I of N (round robin over sorted stems)")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
