"""A CI run reproduced locally: a fresh checkout of the flavors (new mtimes), the
state and outputs restored from a cache, and a Docker engine that holds none of
the images involved (converted images, bases, kairos-init) so it could only seed
from the registry. Nothing is rebuilt or pulled; after one overlay change only
that flavor's chain runs.

(A second, empty dockerd would be the purer fresh daemon, but dockerd with its
own --bridge deletes the host's docker0 and breaks the machine's engine; so the
images are removed from the one engine instead.)
"""
from __future__ import annotations

import shutil
import time

import pytest

from tasks.config import load_flavors
from tasks.matrix import expand

from .conftest import Workspace, write_flavor

pytestmark = pytest.mark.integration


def local_images(client, refs: list[str]) -> list[str]:
    """Which of ``refs`` (tags or repo@digest) the engine has."""
    found = []
    for ref in refs:
        try:
            client.images.get(ref)
            found.append(ref)
        except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound
            pass
    return found


def test_restored_cache_on_an_engine_without_the_images_rebuilds_nothing_then_only_what_changed(
        tmp_path_factory, ns, bases, standin, engine):
    ws = Workspace(root=tmp_path_factory.mktemp("ci"), ns=ns)
    for name in ("a", "b"):
        (ws.flavors / f"overlay-{name}").mkdir(parents=True)
        (ws.flavors / f"overlay-{name}" / f"{name}.conf").write_text(f"{name}\n")
        write_flavor(ws.flavors / f"{name}.yaml", f"""
            flavor: ci{name}
            release: "1"
            base_image: {bases['b']}
            version: v3.1.0
            variants: [core]
            arches: [amd64]
            devices: [generic]
            converter: kairos-init
            kairos_init_image: {standin}
            registry: {ns}/kairos
            artifacts: [squashfs]
            overlay: overlay-{name}
            squashfs: {{compression: lz4}}
            """)
    # the CI job that filled the cache, on the machine's daemon
    first = ws.doit()
    assert first.rc == 0, first.err

    # cache save, a fresh checkout (same paths, new mtimes), cache restore
    cache = ws.root / "cache"
    for d in (ws.state, ws.outputs):
        shutil.copytree(d, cache / d.name, symlinks=True)
        shutil.rmtree(d)
    flavors_copy = ws.root / "checkout"
    shutil.copytree(ws.flavors, flavors_copy)
    shutil.rmtree(ws.flavors)
    time.sleep(1.1)
    shutil.copytree(flavors_copy, ws.flavors, copy_function=shutil.copy)  # new mtimes, same content
    for d in (ws.state, ws.outputs):
        shutil.copytree(cache / d.name, d, symlinks=True)

    # the engine of the next job has none of the images
    builds = expand(load_flavors([ws.flavors]))
    refs = [b.image for b in builds] + [bases["b"], standin]
    refs += [f"{bases['b'].rpartition(':')[0]}@{(ws.state / 'resolved' / f'{b.base.ident}.digest').read_text().strip()}"
             for b in builds[:1]]
    ids = [(ws.state / "image" / f"{b.stem}.digest").read_text().strip() for b in builds]
    for ref in ids + refs:
        if local_images(engine, [ref]):  # removing one reference may remove the others of that image
            engine.images.remove(ref, force=True)
    assert local_images(engine, ids + refs) == []

    again = ws.doit()
    assert again.rc == 0, again.err
    assert again.build_actions == set(), again.build_actions
    assert local_images(engine, ids + refs) == []  # nothing was pulled or built

    (ws.flavors / "overlay-a" / "a.conf").write_text("a changed\n")
    changed = ws.doit()
    assert changed.rc == 0, changed.err
    (a,) = [b for b in builds if b.flavor.flavor == "cia"]
    assert changed.build_actions == {f"convert:{a.stem}", f"push:{a.stem}", f"squashfs:{a.stem}",
                                     "manifest:v3.1.0"}
    assert local_images(engine, [a.image]) == [a.image]  # rebuilt from what the registry seeded
