"""Artifact kinds whose stage is not implemented yet.

Their tasks exist so the graph has its final shape (`doit list`), but they fail
with a clear message instead of pretending: nothing is written.
"""
from __future__ import annotations

from ..graph import Context, action
from ..run import UsageError

PENDING = {
    "iso": "issue #3 (bootable artifacts)",
    "raw": "issue #3 (bootable artifacts)",
    "ipxe": "issue #3 (bootable artifacts)",
    "sbom": "issue #4 (supply chain)",
    "trivy": "issue #4 (supply chain)",
    "grype": "issue #4 (supply chain)",
    "sign": "issue #4 (supply chain)",
}


def not_implemented(kind: str, stem: str) -> None:
    raise UsageError(f"the {kind} stage is not implemented yet ({PENDING[kind]}); "
                     f"remove {kind!r} from the flavor's artifacts to build {stem} without it")


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind in b.kinds:
            yield {
                "name": b.stem,
                "doc": f"{kind} of {b.stem} (not implemented yet)",
                "actions": [action(not_implemented, kind, b.stem)],
                "task_dep": [f"push:{b.stem}"],
                "verbosity": 2,
            }
