"""Kairos release pipeline. `doit list` shows the stages, `doit` builds every
selected flavor, `doit <stage>:<artifact stem>` builds one artifact and what it needs.

Selection (environment or doit variables, e.g. `doit flavors=flavors/upstream`):
  KAIROS_FLAVORS / flavors=   flavor files or directories (default: flavors/)
  KAIROS_SHARD   / shard=     I/N: only this shard of the build matrix
  KAIROS_STATE                state directory (doit DB, digests; default .state/)
  KAIROS_OUTPUTS              artifacts directory (default outputs/)
  KAIROS_VERBOSE=1 / -v 2     print every command run
  KAIROS_NO_CACHE=1           conversions run every step again (docker build --no-cache)
"""
import os
import sys
from pathlib import Path

from doit import get_var

from tasks import graph
from tasks.kinds import REGISTRY
from tasks.stages import base, carrier, convert, manifest, preflight, push, resolve, sign

if any(a in ("-v", "--verbosity") or a.startswith(("--verbosity=", "-v")) for a in sys.argv[1:]):
    os.environ.setdefault("KAIROS_VERBOSE", "1")  # `doit -v 2 ...`: also print every command run

CTX = graph.load(Path(__file__).resolve().parent,
                 get_var("flavors", os.environ.get("KAIROS_FLAVORS")),
                 get_var("shard", os.environ.get("KAIROS_SHARD")))
DOIT_CONFIG = dict(graph.doit_config(CTX), default_tasks=["build", "manifest"])


def task_preflight():
    """Check the Docker daemon, BuildKit CLI, tools and registries before any work."""
    return preflight.task(CTX)


def task_bootstrap():
    """Build offline base root filesystems with mmdebstrap."""
    yield from base.tasks(CTX, "bootstrap")


def task_seed():
    """Import offline base rootfs tarballs as images and push them to the registry."""
    yield from base.tasks(CTX, "seed")


def task_resolve():
    """Resolve base and kairos-init references to digests (always runs, cheap)."""
    yield from resolve.resolve_tasks(CTX)


def task_pull():
    """Pull base and kairos-init images by digest, per arch."""
    yield from resolve.pull_tasks(CTX)


def task_convert():
    """Convert a base image into a Kairos image (docker build with BuildKit)."""
    yield from convert.tasks(CTX)


def task_push():
    """Push the converted image to the flavor's registry, tagged by convention."""
    yield from push.tasks(CTX)


# one task per artifact kind of the registry (tasks/kinds.py): `<kind>:<stem>` subtasks from the
# stage module that builds it; its docstring is the `doit list` text
globals().update({f"task_{kind.name}": graph.kind_task(CTX, kind) for kind in REGISTRY})


def task_verify():
    """Verify artifacts against .sha256, blob and image signatures, attestations (run on demand)."""
    yield from sign.verify_tasks(CTX)


def task_carrier():
    """Push each raw image as the OCI image <repo>:<tag>-img (FROM scratch, build/<stem>.img.xz only)."""
    yield from carrier.tasks(CTX)


def task_manifest():
    """Write outputs/<version>/manifest.json (inputs, outputs, tool versions), SHA256SUMS, RELEASE.md."""
    yield from manifest.tasks(CTX)


def task_build():
    """Everything one build produces: `doit build:<stem>`."""
    for b in CTX.builds:
        yield {
            "name": b.stem,
            "doc": f"all artifacts of {b.stem}",
            "actions": None,
            "task_dep": [f"push:{b.stem}"] + [f"{kind}:{b.stem}" for kind in b.kinds]
            + ([f"carrier:{b.stem}"] if "raw" in b.kinds else []),
        }
