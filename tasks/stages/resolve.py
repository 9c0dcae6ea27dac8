"""resolve + pull: base and kairos-init references -> digests -> local images.

resolve always runs (cheap) and rewrites its small digest file only when the
registry's digest changed, so everything downstream reruns exactly then.
"""
from __future__ import annotations

from ..model import parse_ref
from .. import naming
from ..graph import Context, action, task
from ..run import KairosError
from ..state import Paths, read_digest, safe_id, write_if_changed, write_text_atomic
from ..tools import docker


def refs(ctx: Context) -> dict[str, tuple[str, set[str], str | None]]:
    """ident -> (reference, arches it is needed for, seeding task or None)."""
    out: dict[str, tuple[str, set[str], str | None]] = {}
    for b in ctx.builds:
        src = b.base
        wanted = [(src.ident, src.ref, f"seed:{src.ident}" if src.mmdebstrap else None)]
        if b.flavor.kairos_init_image:
            ref = b.flavor.kairos_init_image
            wanted.append((safe_id(ref), ref, None))
        for ident, ref, seed in wanted:
            out.setdefault(ident, (ref, set(), seed))[1].add(b.arch)
    return out


def resolve(paths: Paths, ident: str, ref: str) -> None:
    _, _, pinned = parse_ref(ref)
    digest = pinned or docker.registry_digest(ref)
    if write_if_changed(paths.resolved(ident), digest + "\n"):
        print(f"    {ref} -> {digest} (changed)")


def ensure_local(ref: str, digest: str, arch: str) -> str:
    """Make sure the daemon has ``repo@digest`` for ``arch``; return its image ID."""
    repo, pinned = naming.repository(ref), naming.pinned(ref, digest)
    if docker.image_id(pinned) and docker.image_arch(pinned) == arch:
        return docker.image_id(pinned)
    found = docker.pull(repo, digest, f"linux/{arch}")
    if docker.image_arch(pinned) != arch:
        raise KairosError(f"{pinned} has no linux/{arch} image (got {docker.image_arch(pinned)})")
    return found



def pull(paths: Paths, ident: str, ref: str, arch: str) -> None:
    digest = read_digest(paths.resolved(ident))
    ensure_local(ref, digest, arch)
    write_text_atomic(paths.pulled(ident, arch), digest + "\n")


def resolve_tasks(ctx: Context):
    for ident, (ref, _arches, seed) in sorted(refs(ctx).items()):
        yield task(ident, f"look up the digest of {ref}", action(resolve, ctx.paths, ident, ref),
                   targets=[ctx.paths.resolved(ident)], uptodate=[False],
                   task_dep=["preflight"] + ([seed] if seed else []))


def pull_tasks(ctx: Context):
    for ident, (ref, arches, _seed) in sorted(refs(ctx).items()):
        for arch in sorted(arches):
            yield task(f"{ident}-{arch}", f"pull {ref} by digest for linux/{arch}",
                       action(pull, ctx.paths, ident, ref, arch), file_dep=[ctx.paths.resolved(ident)],
                       targets=[ctx.paths.pulled(ident, arch)])
