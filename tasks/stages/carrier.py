"""carrier: a raw disk image too large for release hosting, pushed as an OCI image.

`<registry>/<flavor>:<tag>-img` is an image `FROM scratch` holding only
`/<stem>.img`; `extract_command()` is the one line that gets the file back.
"""
from __future__ import annotations

import os
import shlex
import shutil

from .. import naming
from ..graph import Context, action
from ..matrix import Build
from ..run import run, say
from ..state import Paths, read_digest, write_text_atomic
from ..tools import docker


def dockerfile(b: Build) -> str:
    """The carrier image (pure): nothing but the disk image file."""
    return (f"FROM scratch\nCOPY {b.stem}.img /{b.stem}.img\n"
            f'LABEL org.opencontainers.image.title="{b.stem}.img"\n')


def extract_command(ref: str, filename: str) -> str:
    """One shell line that copies ``filename`` out of the carrier image ``ref`` into `.`."""
    return (f"id=$(docker create {shlex.quote(ref)} /none) && docker cp \"$id:/{filename}\" . "
            f"&& docker rm \"$id\" >/dev/null")



def carrier_ref(paths: Paths, b: Build) -> str:
    """The carrier image by digest (as pushed)."""
    return naming.pinned(naming.carrier_tag(b.image), read_digest(paths.carrier(b)))


def carrier(paths: Paths, b: Build) -> None:
    img = paths.artifact(b, ".img")
    ctx_dir = paths.context_dir(f"carrier-{b.stem}")
    shutil.rmtree(ctx_dir, ignore_errors=True)
    ctx_dir.mkdir(parents=True)
    try:
        try:
            os.link(img, ctx_dir / img.name)
        except OSError:  # outputs on another file system
            shutil.copy2(img, ctx_dir / img.name)
        (ctx_dir / "Dockerfile").write_text(dockerfile(b))
        tag = naming.carrier_tag(b.image)
        cli = docker.find_build_cli()
        say(f"    {img.name} -> {tag}")
        run(docker.build_argv(cli, ctx_dir, tag, b.platform, ctx_dir / "iid"), env=cli.env(),
            what=f"carrier image {tag}")
        digest = docker.push(tag)
        write_text_atomic(paths.carrier(b), digest + "\n")
    finally:
        shutil.rmtree(ctx_dir, ignore_errors=True)


def tasks(ctx: Context):
    for b in ctx.builds:
        if "raw" not in b.kinds:
            continue
        img = ctx.paths.artifact(b, ".img")
        yield {
            "name": b.stem,
            "doc": f"push {img.name} as the OCI image {naming.carrier_tag(b.image)}",
            "actions": [action(carrier, ctx.paths, b)],
            "file_dep": [str(img) + ".sha256", str(ctx.paths.pushed(b))],
            "targets": [str(ctx.paths.carrier(b))],
            "clean": True,
            "verbosity": 2,
        }
