"""Release shape: a raw image pushed as an `-img` OCI carrier image holding `build/<stem>.img.xz` and
extracted again with the commands RELEASE.md prints (real crane, and the docker alternative);
RELEASE.md lists artifacts and commands; a cloud-config change rebuilds the ISO and the raw image
only; `doit xz:` killed midway leaves no final file. The 1 GB image is compressed once (xz is the
slow step: minutes on 2 cores), at `raw_xz_level: 0`."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks import naming
from tasks.config import load_flavors
from tasks.matrix import expand
from tasks.state import sha256_file

from tests.harness import LZ4, Workspace, builtin_doc, crane, crane_listing, write_flavor, xz_content_sha256
from .test_faults import kill_during, out, partials

pytestmark = pytest.mark.integration
CLOUD_CONFIG = "#cloud-config\nusers:\n  - name: kairos\n    passwd: kairos\n"
CHANGED = CLOUD_CONFIG + "hostname: changed\n"
XZ_LEVEL = 0  # the release's shape, not its ratio, is under test: xz -0 takes a third of -6's minutes


@pytest.fixture(scope="module")
def rel(tmp_path_factory, ns, bases):
    """The module's one build, in the order that compresses the 1 GB image once: the raw image and
    the ISO; then the cloud-config changed and the two rebuilt; then `doit xz:` SIGKILLed midway
    (what it left is recorded); then the whole run, which completes the .img.xz and the carrier."""
    ws = Workspace(root=tmp_path_factory.mktemp("release"), ns=ns)
    ws.flavors.mkdir(parents=True)
    (ws.flavors / "cloud-config.yml.in").write_text(CLOUD_CONFIG)
    write_flavor(ws.flavors / "rel.yaml", builtin_doc(
        "debian", bases["b"], f"{ns}/kairos", ["raw", "iso"], raw_generic=True, squashfs=LZ4,
        cloud_config="cloud-config.yml.in", raw_xz_level=XZ_LEVEL))
    (b,) = expand(load_flavors([ws.flavors]))
    first = ws.doit(f"raw:{b.stem}", f"iso:{b.stem}")
    assert first.rc == 0, first.err
    (ws.flavors / "cloud-config.yml.in").write_text(CHANGED)
    changed = ws.doit(f"raw:{b.stem}", f"iso:{b.stem}")
    assert changed.rc == 0, changed.err
    xz = out(ws, f"{b.stem}.img.xz")
    kill_during(ws, f"xz:{b.stem}", xz.name)
    killed = {"final": xz.exists() or out(ws, xz.name + ".sha256").exists(), "partials": partials(ws)}
    result = ws.doit()
    assert result.rc == 0, result.err
    return ws, b, result, SimpleNamespace(changed=changed, killed=killed)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def test_raw_image_round_trips_through_its_carrier_image(rel, engine, tmp_path):
    """The docker alternative RELEASE.md gives: `build/<stem>.img.xz` out of the carrier, intact, and
    the disk image in it is the published `.img`."""
    ws, b, result, _ = rel
    assert {f"xz:{b.stem}", f"carrier:{b.stem}"} <= set(result.executed)
    tag = naming.carrier_tag(b.image)
    assert tag.endswith("-generic-v3.1.0-img")
    pushed = (ws.state / "carrier" / f"{b.stem}.digest").read_text().strip()
    assert engine.images.get_registry_data(tag).id == pushed
    notes = (ws.outputs / "v3.1.0" / "RELEASE.md").read_text()
    commands = [l for l in notes.splitlines() if l.startswith("id=$(docker create")]
    assert len(commands) == 1 and pushed in commands[0]
    engine.images.remove(tag, force=True)  # the printed command must pull it by itself
    subprocess.run(["bash", "-c", commands[0]], cwd=tmp_path, check=True, env={"PATH": "/usr/bin:/bin"})
    name = f"{b.stem}.img.xz"
    assert files_under(tmp_path) == [f"build/{name}"]
    out = ws.outputs / "v3.1.0"
    assert sha256_file(tmp_path / "build" / name) == (out / f"{name}.sha256").read_text().split()[0]
    subprocess.run(["xz", "--test", str(tmp_path / "build" / name)], check=True)
    assert xz_content_sha256(tmp_path / "build" / name) == (out / f"{b.stem}.img.sha256").read_text().split()[0]


def test_crane_export_of_the_carrier_gives_build_img_xz(rel, tmp_path):
    """As a new user would, with real crane against the local registry: the crane line RELEASE.md gives
    (`crane export --insecure <ref> - | tar -xvf -`) leaves `build/<stem>.img.xz`, which passes `xz -t`
    and holds the disk image whose sha256 `<stem>.img.sha256` gives."""
    crane()
    ws, b, _, _ = rel
    out = ws.outputs / "v3.1.0"
    pushed = (ws.state / "carrier" / f"{b.stem}.digest").read_text().strip()
    ref = naming.pinned(naming.carrier_tag(b.image), pushed)
    name = f"{b.stem}.img.xz"
    # by tag, as the image support matrix page tells users: one file under build/
    listing = crane_listing(naming.carrier_tag(b.image))
    print(f"crane export --insecure {naming.carrier_tag(b.image)} - | tar -tvf -\n{listing}")
    assert [line.split()[-1] for line in listing.splitlines() if not line.startswith("d")] == [f"build/{name}"]
    notes = (out / "RELEASE.md").read_text()
    lines = [line for line in notes.splitlines() if line.startswith("crane export ")]
    assert lines == [f"crane export --insecure {ref} - | tar -xvf -"]
    unpacked = subprocess.run(["bash", "-o", "pipefail", "-c", lines[0]], cwd=tmp_path, capture_output=True,
                              text=True, timeout=1800, stdin=subprocess.DEVNULL)
    assert unpacked.returncode == 0, unpacked.stderr
    assert f"build/{name}" in unpacked.stdout.split()  # tar -v named it
    assert files_under(tmp_path) == [f"build/{name}"]
    got = tmp_path / "build" / name
    assert subprocess.run(["xz", "-t", str(got)], capture_output=True).returncode == 0
    assert sha256_file(got) == (out / f"{name}.sha256").read_text().split()[0]
    assert xz_content_sha256(got) == (out / f"{b.stem}.img.sha256").read_text().split()[0]
    print(f"{b.stem}.img: {(out / f'{b.stem}.img').stat().st_size} bytes; {name}: {got.stat().st_size} bytes")


def test_release_notes_list_every_artifact_with_size_and_sha256(rel):
    ws, b, _, _ = rel
    out = ws.outputs / "v3.1.0"
    notes = (out / "RELEASE.md").read_text()
    assert notes.startswith("# Kairos v3.1.0\n") and "- none (core images only)" in notes
    rows = {m.group(1): (int(m.group(2)), m.group(3))
            for m in re.finditer(r"^\| `([^`]+)` \| (\d+) \| `([0-9a-f]{64})` \|$", notes, re.M)}
    for suffix in (".img", ".img.xz", "-kernel", "-initrd", ".squashfs"):
        name = b.stem + suffix
        assert rows[name][0] == (out / name).stat().st_size
        assert rows[name][1] == (out / (name + ".sha256")).read_text().split()[0]
    assert f"`{b.image}` = `" in notes


def test_second_run_runs_nothing(rel):
    ws, _, _, _ = rel
    again = ws.doit()
    assert again.rc == 0 and again.build_actions == set(), again.build_actions


def test_cloud_config_is_baked_into_iso_and_raw(rel, tmp_path):
    ws, b, _, _ = rel
    out = ws.outputs / "v3.1.0"
    got = subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(out / f"{b.stem}.iso"),
                          "-extract", "/config.yaml", str(tmp_path / "iso-config.yaml")],
                         capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "iso-config.yaml").read_text() == CHANGED
    img = out / f"{b.stem}.img"
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    oem = table["partitions"][1]  # p2: COS_OEM
    part = tmp_path / "oem.ext4"
    with open(img, "rb") as src, open(part, "wb") as dst:
        src.seek(oem["start"] * 512)
        dst.write(src.read(oem["size"] * 512))
    label = subprocess.run(["e2label", str(part)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == "COS_OEM"
    cat = subprocess.run(["debugfs", "-R", "cat /90_custom.yaml", str(part)], capture_output=True, text=True)
    assert cat.stdout == CHANGED, cat.stderr


def test_changed_cloud_config_rebuilds_iso_and_raw_only(rel):
    """The fixture changed the cloud-config after the first build: of everything `doit raw: iso:`
    reaches (conversion, push, kernel, initrd, squashfs), only the two images that bake it in reran."""
    _, b, _, steps = rel
    assert steps.changed.build_actions == {f"iso:{b.stem}", f"raw:{b.stem}"}, steps.changed.build_actions


def test_xz_killed_midway_leaves_no_final_file_and_the_next_run_completes(rel):
    """`doit xz:` SIGKILLed once its partial file existed left no `.img.xz` (nor `.sha256`) under a
    final name; the next run compressed again, left no partial file, and its output checks."""
    ws, b, result, steps = rel
    name = f"{b.stem}.img.xz"
    assert steps.killed["final"] is False
    assert any(p.startswith(f".{name}.partial-") for p in steps.killed["partials"]), steps.killed
    assert f"xz:{b.stem}" in result.executed and partials(ws) == []
    assert subprocess.run(["xz", "--test", str(out(ws, name))]).returncode == 0
    assert subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=out(ws, ""),
                          capture_output=True).returncode == 0
