"""The conversion cache shared through the registry (`cache_from`, default `own`): a runner whose
state directory and engine are both empty converts by taking every step from the inline cache of
the image the first build pushed, and gets the same image.

The empty engine is a second dockerd (tests.harness.second_engine: its own data root, exec root,
socket and bridge, no iptables): a new CI runner as it really starts, while the machine's engine,
its build cache and the other xdist worker stay untouched. Its RUN steps reach no network, so a
step it had to run instead of taking it from the cache fails the conversion (apt cannot reach the
mirror) rather than passing slowly."""
from __future__ import annotations

import subprocess
import time

import pytest

from tasks.config import load_flavors
from tasks.matrix import expand

from tests.harness import Workspace, buildkit_steps, builtin_doc, second_engine, write_flavor

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def empty_engine():
    with second_engine() as host:
        yield host


@pytest.fixture(scope="module")
def first(tmp_path_factory, ns, bases):
    """A builtin conversion on the machine's engine, pushed: what an earlier CI run leaves."""
    ws = Workspace(root=tmp_path_factory.mktemp("regcache"), ns=ns)
    write_flavor(ws.flavors / "rc.yaml", builtin_doc("regcache", bases["b"], f"{ns}/kairos", ["kernel"]))
    (b,) = expand(load_flavors([ws.flavors]))
    assert b.flavor.cache_from == ("own",)
    result = ws.doit(f"push:{b.stem}")
    assert result.rc == 0, result.err
    return ws, b, (ws.state / "image" / f"{b.stem}.digest").read_text().strip()


def test_an_empty_runner_takes_the_conversion_from_the_registry(first, empty_engine, tmp_path):
    ws, b, image = first
    state = tmp_path / "state"
    started = time.monotonic()
    result = ws.doit(f"convert:{b.stem}", state=state, outputs=tmp_path / "outputs",
                     env={"DOCKER_HOST": empty_engine})
    elapsed = time.monotonic() - started
    assert result.rc == 0, result.out[-3000:] + result.err
    assert f"convert:{b.stem}" in result.executed
    log = result.out + result.err
    assert f"build cache from the registry: {b.image}" in log
    steps = buildkit_steps(log)
    runs = {step: hit for step, hit in steps.items() if step.startswith("RUN ")}
    assert len(runs) >= 2 and all(runs.values()), steps  # the package and initrd steps: CACHED
    assert (state / "image" / f"{b.stem}.digest").read_text().strip() == image
    # the machine's engine keeps its bridge (dockerd --bridge none would have deleted docker0)
    assert subprocess.run(["ip", "link", "show", "docker0"], capture_output=True).returncode == 0
    print(f"convert:{b.stem} on an empty engine with an empty state directory: {elapsed:.0f} s; steps: {steps}")


def test_the_first_build_of_a_tag_converts_although_its_cache_image_is_missing(tmp_path_factory, ns, bases):
    """`own` names a tag nobody has pushed yet: BuildKit skips it and converts in full."""
    ws = Workspace(root=tmp_path_factory.mktemp("regcache-new"), ns=ns)
    write_flavor(ws.flavors / "nc.yaml", builtin_doc("regcachenew", bases["b"], f"{ns}/kairos", ["kernel"],
                                                     cache_from=["own", f"{ns}/never-pushed:cache"]))
    (b,) = expand(load_flavors([ws.flavors]))
    result = ws.doit(f"convert:{b.stem}")
    assert result.rc == 0, result.out[-3000:] + result.err
    assert f"build cache from the registry: {b.image}, {ns}/never-pushed:cache" in result.out + result.err
