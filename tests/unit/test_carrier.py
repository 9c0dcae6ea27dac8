"""The `-img` carrier image (stages/carrier.py): its layout (`build/<file>`), what it is keyed on,
the extraction and write commands RELEASE.md gives, one of them run for real."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tasks.graph import Context
from tasks.stages import carrier, xz
from tasks.stages.manifest import release_notes
from tasks.state import Paths, checksum_path

LOCAL = "127.0.0.1:5000/kairos/debian:12-core-arm64-rpi4-v3.1.0-img@sha256:" + "a" * 64
REMOTE = "quay.io/kairos/alpine:3.19-standard-arm64-rpi3-v3.2.3-k3sv1.31.2-k3s1-img@sha256:" + "b" * 64


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_carrier_dockerfile_puts_the_file_under_build():
    assert carrier.dockerfile("kairos-x.img.xz") == (
        "FROM scratch\nCOPY kairos-x.img.xz /build/kairos-x.img.xz\n"
        'LABEL org.opencontainers.image.title="kairos-x.img.xz"\n')


@pytest.mark.parametrize("compression, carried", [("xz", ".img.xz"), ("none", ".img")])
def test_carrier_carries_the_xz_unless_raw_compression_none(make_build, compression, carried):
    b = make_build(artifacts=("raw",), arch="arm64", device="rpi4", raw_compression=compression)
    paths = Paths(Path("/state"), Path("/out"))
    path = carrier.carried(paths, b)
    assert path == Path("/out/v3.1.0") / f"{b.stem}{carried}"
    ctx = Context(root=Path("/r"), paths=paths, flavors=(b.flavor,), builds=(b,))
    (t,) = list(carrier.tasks(ctx))
    # keyed on the carried file's small checksum and the image's layout, not on the converted image
    assert t["file_dep"] == [f"/out/v3.1.0/{b.stem}{carried}.sha256"]
    assert t["targets"] == [f"/state/carrier/{b.stem}.digest"]
    assert f"build/{b.stem}{carried}" in t["doc"]


def test_carrier_key_changes_with_what_the_image_is_not_with_the_rest(make_build):
    paths = Paths(Path("/state"), Path("/out"))

    def key(**fields):
        return carrier.key(paths, make_build(arch="arm64", device="rpi4", **{"artifacts": ("raw",), **fields}))

    same = {key(), key(artifacts=("raw", "sbom", "trivy")), key(fips=True), key(squashfs=replace(
        make_build().flavor.squashfs, compression="zstd"))}
    assert len(same) == 1  # what changes the .img reaches the carrier through its checksum
    assert len({key(), key(registry="127.0.0.1:5000/k"), key(raw_compression="none")}) == 3


@pytest.mark.parametrize("ref, name, lines", [
    (LOCAL, "kairos-debian-12-core-arm64-rpi4-v3.1.0.img.xz", {
        "crane": f"crane export --insecure {LOCAL} - | tar -xvf -",
        "write": "xzcat build/kairos-debian-12-core-arm64-rpi4-v3.1.0.img.xz | dd of=/dev/sdX bs=4M conv=fsync "
                 "status=progress",
        "docker": f'id=$(docker create {LOCAL} /none) && docker cp "$id:/build" . && docker rm "$id" >/dev/null'}),
    (REMOTE, "kairos-alpine-3.19-standard-arm64-rpi3-v3.2.3-k3sv1.31.2+k3s1.img.xz", {
        "crane": f"crane export {REMOTE} - | tar -xvf -",
        "write": "xzcat build/kairos-alpine-3.19-standard-arm64-rpi3-v3.2.3-k3sv1.31.2+k3s1.img.xz | "
                 "dd of=/dev/sdX bs=4M conv=fsync status=progress",
        "docker": f'id=$(docker create {REMOTE} /none) && docker cp "$id:/build" . && docker rm "$id" >/dev/null'}),
    (REMOTE, "kairos-x.img", {
        "crane": f"crane export {REMOTE} - | tar -xvf -",
        "write": "dd if=build/kairos-x.img of=/dev/sdX bs=4M conv=fsync status=progress",
        "docker": f'id=$(docker create {REMOTE} /none) && docker cp "$id:/build" . && docker rm "$id" >/dev/null'}),
])
def test_extract_commands(ref, name, lines):
    assert carrier.extract_commands(ref, name) == lines


def test_the_write_command_writes_the_image_byte_for_byte(raw_build, tmp_path):
    """The `xzcat build/<file> | dd ...` line of RELEASE.md, run with bash onto a file instead of /dev/sdX,
    in a directory laid out as the carrier unpacks."""
    paths, b, img = raw_build
    xz.compress(paths, b)
    out, = paths.outputs_of(b, "xz")
    unpacked = tmp_path / "unpacked"
    (unpacked / "build").mkdir(parents=True)
    shutil.copy(out, unpacked / "build" / out.name)
    line = carrier.write_command(out.name).replace(carrier.DEVICE, str(tmp_path / "disk"))
    subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=unpacked, check=True, capture_output=True)
    assert sha256(tmp_path / "disk") == checksum_path(img).read_text().split()[0]


def test_release_notes_give_crane_write_and_docker_commands(make_build):
    b = make_build(artifacts=("raw",), arch="arm64", device="rpi4", registry="127.0.0.1:5000/kairos")
    record = {"stem": b.stem, "image_digest": "sha256:" + "c" * 64, "outputs": []}
    name = f"{b.stem}.img.xz"
    text = release_notes("v3.1.0", [b], [record], {name: LOCAL})
    section = text.split("## Raw disk images as OCI images", 1)[1]
    lines = carrier.extract_commands(LOCAL, name)
    assert "`build/<file>`" in section and "/dev/sdX" in section
    at = [section.index(lines[k]) for k in ("crane", "write", "docker")]
    assert at == sorted(at), "crane, then writing the image, then the docker alternative"
    assert f"`{name}`:" in section
