"""push: the converted image -> the configured registry, tagged by convention."""
from __future__ import annotations


from .. import naming
from ..graph import Context, action, task
from ..matrix import Build
from ..run import KairosError
from ..state import Paths, read_digest, write_text_atomic
from ..tools import docker



def push(paths: Paths, b: Build) -> None:
    image = read_digest(paths.image_id(b))
    if docker.image_id(image) is None:
        raise KairosError(f"image {image} of {b.stem} is no longer in the Docker daemon and was never pushed; "
                          f"rebuild it with: doit forget convert:{b.stem} && doit push:{b.stem}")
    docker.tag(image, b.image)
    digest = docker.push(b.image)
    write_text_atomic(paths.pushed(b), digest + "\n")


def ensure_image(paths: Paths, b: Build) -> str:
    """The converted image in the local daemon; pulled back by digest when a fresh
    daemon (e.g. a CI runner with a restored state cache) does not have it."""
    image = read_digest(paths.image_id(b))
    if not docker.image_id(image):
        digest = read_digest(paths.pushed(b))
        got = docker.pull(naming.repository(b.image), digest, b.platform)
        if got != image:
            raise KairosError(f"{naming.pinned(b.image, digest)} is image {got}, but the state says {b.stem} is {image}; "
                              f"the registry was changed behind our back: doit forget convert:{b.stem}")
    if docker.image_id(b.image) != image:
        docker.tag(image, b.image)  # tools given the tag (syft, trivy, grype) see this very image
    return image


def tasks(ctx: Context):
    for b in ctx.builds:
        yield task(b.stem, f"push {b.image}", action(push, ctx.paths, b), file_dep=[ctx.paths.image_id(b)],
                   targets=[ctx.paths.pushed(b)])
