"""sbom: `<stem>-sbom.spdx.json` and `<stem>-sbom.syft.json` of the converted image (syft).

SBOMs are published as separate files (attestations over 40 MiB break pushes);
the sign stage attests the SPDX one to the image as well.
"""
from __future__ import annotations

from pathlib import Path

from ..graph import Context, action, task
from ..matrix import Build
from ..run import run, say
from ..state import Paths, atomic_path
from .push import ensure_image

SYFT_ENV = {"SYFT_CHECK_FOR_APP_UPDATE": "false"}


def syft_argv(image: str, spdx: Path, syft_json: Path) -> list[str]:
    """One syft catalog run writing both formats (pure)."""
    return ["syft", f"docker:{image}", "--quiet", "-o", f"spdx-json={spdx}", "-o", f"json={syft_json}"]


def sbom(paths: Paths, b: Build) -> None:
    ensure_image(paths, b)
    spdx, syft_json = paths.outputs_of(b, "sbom")
    say(f"    syft docker:{b.image}")
    with atomic_path(spdx) as tmp_spdx, atomic_path(syft_json) as tmp_syft:
        run(syft_argv(b.image, tmp_spdx, tmp_syft), env=SYFT_ENV, what=f"syft {b.stem}")


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        yield task(b.stem, f"SPDX and syft SBOMs of {b.image}", action(sbom, ctx.paths, b),
                   file_dep=[ctx.paths.image_id(b), ctx.paths.pushed(b)], targets=ctx.paths.targets_of(b, kind))
