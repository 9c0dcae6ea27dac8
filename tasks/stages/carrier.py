"""carrier: a raw disk image too large for release hosting, pushed as an OCI image.

`<registry>/<flavor>:<tag>-img` is an image `FROM scratch` holding only
`/<stem>.img`; `extract_command()` is the one line that gets the file back.
"""
from __future__ import annotations

import shlex

from .. import naming
from ..graph import Context, action, task
from ..matrix import Build
from ..run import run, say
from ..state import Paths, build_context, checksum_path, read_digest, write_text_atomic
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
    img, = paths.outputs_of(b, "raw")
    with build_context(paths, f"carrier-{b.stem}", {img.name: img}) as ctx_dir:
        (ctx_dir / "Dockerfile").write_text(dockerfile(b))
        tag = naming.carrier_tag(b.image)
        cli = docker.find_build_cli()
        say(f"    {img.name} -> {tag}")
        run(docker.build_argv(cli, ctx_dir, tag, b.platform, ctx_dir / "iid"), env=cli.env(),
            what=f"carrier image {tag}")
        digest = docker.push(tag)
    write_text_atomic(paths.carrier(b), digest + "\n")


def tasks(ctx: Context):
    for b in ctx.builds:
        if "raw" not in b.kinds:
            continue
        img, = ctx.paths.outputs_of(b, "raw")
        yield task(b.stem, f"push {img.name} as the OCI image {naming.carrier_tag(b.image)}",
                   action(carrier, ctx.paths, b), file_dep=[checksum_path(img), ctx.paths.pushed(b)],
                   targets=[ctx.paths.carrier(b)])
