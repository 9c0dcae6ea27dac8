"""bootstrap + seed: an offline base image from mmdebstrap, pushed to the local
registry so it is resolved and pulled like any other base."""
from __future__ import annotations

import json
from pathlib import Path

from ..epoch import build_epoch, epoch_env
from ..model import MmdebstrapBase
from ..graph import Context, action, task
from ..matrix import BaseSource
from ..run import run, say
from ..state import Paths, atomic_path, build_context, write_text_atomic
from ..tools import docker

STAGE_VERSION = 2


def mmdebstrap_argv(base: MmdebstrapBase, arch: str, out: Path) -> list[str]:
    """mmdebstrap command that writes a rootfs tarball (pure)."""
    argv = ["mmdebstrap", f"--variant={base.variant}", f"--arch={arch}", "--format=tar",
            f"--components={','.join(base.components)}"]
    if base.include:
        argv.append(f"--include={','.join(base.include)}")
    argv += [base.suite, str(out), base.mirror]
    return argv


SEED_DOCKERFILE = 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n'


def bootstrap(paths: Paths, src: BaseSource) -> None:
    """mmdebstrap writes a byte-identical tarball for the same packages at one SOURCE_DATE_EPOCH:
    fresh state directories (CI) then reuse BuildKit's cache. A base can serve several flavors, so
    its epoch is the environment's (or the default), not a flavor's `source_date_epoch`."""
    tar = paths.rootfs_tar(src.ident)
    say(f"    mmdebstrap {src.mmdebstrap.suite} ({src.arch}) -> {tar}")
    with atomic_path(tar) as tmp:
        run(mmdebstrap_argv(src.mmdebstrap, src.arch, tmp), what=f"mmdebstrap {src.mmdebstrap.suite}",
            env=epoch_env(build_epoch(None)))


def seed(paths: Paths, src: BaseSource) -> None:
    """Import the rootfs tarball as an image with the right arch and push it."""
    with build_context(paths, f"seed-{src.ident}", {"rootfs.tar": paths.rootfs_tar(src.ident)}) as ctx_dir:
        (ctx_dir / "Dockerfile").write_text(SEED_DOCKERFILE)
        cli = docker.find_build_cli()
        # a FROM scratch build sets the image's arch from --platform (docker import cannot)
        run(docker.build_argv(cli, ctx_dir, src.ref, f"linux/{src.arch}", ctx_dir / "iid"), env=cli.env(),
            what=f"import {src.ident}")
        digest = docker.push(src.ref)
    write_text_atomic(paths.seeded(src.ident), digest + "\n")


def tasks(ctx: Context, kind: str):
    seen = set()
    for b in ctx.builds:
        src = b.base
        if src.mmdebstrap is None or src.ident in seen:
            continue
        seen.add(src.ident)
        tar = ctx.paths.rootfs_tar(src.ident)
        if kind == "bootstrap":
            key = json.dumps({"argv": mmdebstrap_argv(src.mmdebstrap, src.arch, Path("OUT")),
                              # a string, as before tasks/epoch.py: an unchanged key keeps every cached base
                              "epoch": str(build_epoch(None)), "stage": STAGE_VERSION}, sort_keys=True)
            yield task(src.ident, f"mmdebstrap {src.mmdebstrap.suite} rootfs ({src.arch})",
                       action(bootstrap, ctx.paths, src), targets=[tar], key=key, task_dep=["preflight"])
        else:
            yield task(src.ident, f"import the {src.mmdebstrap.suite} rootfs and push it as {src.ref}",
                       action(seed, ctx.paths, src), file_dep=[tar], targets=[ctx.paths.seeded(src.ident)],
                       uptodate=[lambda ref=src.ref: docker.registry_has(ref)])
