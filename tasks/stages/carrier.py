"""carrier: a raw disk image too large for release hosting, pushed as an OCI image.

`<registry>/<flavor>:<tag>-img` is an image `FROM scratch` laid out like upstream Kairos's
`-img` images: one directory `build/` holding `<stem>.img.xz` (flavors with `raw_compression:
xz`, the default; the xz stage made and checked it) or `<stem>.img` (`raw_compression: none`).
`crane export <ref> - | tar -xvf -` therefore leaves `build/<file>` in the working directory,
and so does the docker alternative of `extract_commands()`.

The carrier is rebuilt only when what it carries changes: the task depends on that file's small
`.sha256` and on the image's tag, layout and platform (`key`), not on the converted image.
An `.img.xz` is checked with `xz --test` again right before it is pushed.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from .. import naming
from ..graph import Context, action, task
from ..matrix import Build
from ..run import run, say
from ..state import Paths, build_context, checksum_path, read_digest, write_text_atomic
from ..tools import docker
from . import xz

STAGE_VERSION = 2   # 2: build/<file>, .img.xz
DIRECTORY = "build"  # where the file sits in the image (upstream's layout)
DEVICE = "/dev/sdX"  # what RELEASE.md tells users to replace


def carried(paths: Paths, b: Build) -> Path:
    """The file the carrier of ``b`` holds: `<stem>.img.xz` when the build compresses its raw
    image, else `<stem>.img`."""
    kind = "xz" if "xz" in b.kinds else "raw"
    out, = paths.outputs_of(b, kind)
    return out


def dockerfile(name: str) -> str:
    """The carrier image (pure): nothing but ``name`` under /build."""
    return (f"FROM scratch\nCOPY {name} /{DIRECTORY}/{name}\n"
            f'LABEL org.opencontainers.image.title="{name}"\n')


def insecure(ref: str) -> bool:
    """A plain-http (loopback) registry: crane needs --insecure there."""
    return docker.is_local_host(docker.registry_host(ref))


def crane_command(ref: str) -> str:
    """Unpack the carrier ``ref`` into `.` with crane: leaves `build/<file>` (pure)."""
    return f"crane export {'--insecure ' if insecure(ref) else ''}{shlex.quote(ref)} - | tar -xvf -"


def docker_command(ref: str) -> str:
    """The same with the docker CLI alone: copies `/build` out of a created container (pure)."""
    return (f"id=$(docker create {shlex.quote(ref)} /none) && docker cp \"$id:/{DIRECTORY}\" . "
            f"&& docker rm \"$id\" >/dev/null")


def write_command(name: str) -> str:
    """Write the unpacked disk image onto a device (pure)."""
    path = shlex.quote(f"{DIRECTORY}/{name}")
    if name.endswith(".xz"):
        return f"xzcat {path} | dd of={DEVICE} bs=4M conv=fsync status=progress"
    return f"dd if={path} of={DEVICE} bs=4M conv=fsync status=progress"


def extract_commands(ref: str, name: str) -> dict[str, str]:
    """The lines RELEASE.md gives for one carrier (pure): crane, then writing the image, and the
    docker alternative to crane."""
    return {"crane": crane_command(ref), "write": write_command(name), "docker": docker_command(ref)}


def carrier_ref(paths: Paths, b: Build) -> str:
    """The carrier image by digest (as pushed)."""
    return naming.pinned(naming.carrier_tag(b.image), read_digest(paths.carrier(b)))


def carrier(paths: Paths, b: Build) -> None:
    path = carried(paths, b)
    if path.name.endswith(".xz"):
        xz.check(path)  # the file as it is now, right before it is pushed
    with build_context(paths, f"carrier-{b.stem}", {path.name: path}) as ctx_dir:
        (ctx_dir / "Dockerfile").write_text(dockerfile(path.name))
        tag = naming.carrier_tag(b.image)
        cli = docker.find_build_cli()
        say(f"    {path.name} -> {tag} ({DIRECTORY}/{path.name})")
        run(docker.build_argv(cli, ctx_dir, tag, b.platform, ctx_dir / "iid"), env=cli.env(),
            what=f"carrier image {tag}")
        digest = docker.push(tag)
    write_text_atomic(paths.carrier(b), digest + "\n")


def key(paths: Paths, b: Build) -> str:
    """Everything about the carrier image but the file's bytes (its .sha256 is a file_dep) (pure)."""
    return json.dumps({"tag": naming.carrier_tag(b.image), "platform": b.platform,
                       "dockerfile": dockerfile(carried(paths, b).name), "stage": STAGE_VERSION}, sort_keys=True)


def tasks(ctx: Context):
    for b in ctx.builds:
        if "raw" not in b.kinds:
            continue
        path = carried(ctx.paths, b)
        yield task(b.stem, f"push {path.name} as the OCI image {naming.carrier_tag(b.image)} "
                   f"({DIRECTORY}/{path.name})", action(carrier, ctx.paths, b),
                   file_dep=[checksum_path(path)], targets=[ctx.paths.carrier(b)], key=key(ctx.paths, b))
