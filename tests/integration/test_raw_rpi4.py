"""arm64 on amd64 (qemu-user-static + binfmt): a Raspberry Pi 4 raw disk image and a generic
arm64 ISO, cross-built from one mmdebstrap --arch arm64 base by the builtin converter.

rpi4: checks the partition table and file systems of the image and its firmware partition's
files; `doit boot:<rpi4 stem>` boots it to its login prompt in qemu-system-aarch64 -M virt
(kernel, initrd and command line from its own boot partition, root from its COS_STATE
partition); selective rebuilds: `doit raw:<rpi4 stem>` builds only what the image needs, and an
overlay change of the rpi4 flavor reruns exactly the rpi4 chain, with BuildKit reusing the
package and initrd layers (the overlay is copied in after them).

arm64 generic: `doit boot:<stem>` builds the EFI ISO (grub's arm64-efi modules from the image)
and boots it under AAVMF to its login prompt.

After the default run, `crane export` of the rpi4 `-img` carrier lists one file,
`build/<stem>.img.xz` (the test prints the listing and the .img and .img.xz sizes).

A cheap amd64 flavor (builtin converter on a registry base, raw_generic, `raw_compression: none`:
no minutes of xz for an image no test here unpacks) shares nothing with
the arm64 ones and must stay untouched; `doit boot:<stem>` boots its generic raw image under
OVMF to the login prompt. The arm64 conversions under emulation are the slow part; BuildKit's
layer cache makes reruns fast when the mmdebstrap rootfs is byte-identical, so the runs pin
SOURCE_DATE_EPOCH (mmdebstrap then writes a reproducible tarball).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tasks import naming
from tasks.builders import native_raw as n
from tasks.config import load_flavors
from tasks.matrix import expand
from tasks.tools import qemu

from tests.harness import LZ4, Workspace, buildkit_steps, builtin_doc, crane_listing, write_flavor

pytestmark = pytest.mark.integration

MIB = 1 << 20
ENV = {"SOURCE_DATE_EPOCH": "1700000000"}
# a cap, not a target: a boot ends at its login prompt (140-340 s here); the arm64 ISO under AAVMF,
# emulated next to the other test worker's xz, once needed more than 600 s in CI (its serial log
# moved on to the end, only slowly)
BOOT_TIMEOUT = 1200
FAT_FILES = {"start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "config.txt", "cmdline.txt", n.KERNEL_NAME,
             n.INITRD_NAME}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(outputs: Path, skip: str = "") -> dict[str, tuple[int, str]]:
    """file name -> (mtime_ns, sha256) of every build artifact file (`kairos-<stem>...`) not
    belonging to ``skip``; version-level aggregates (manifest.json, SHA256SUMS) are not artifacts
    of one build and legitimately change when any build changes."""
    return {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in sorted(outputs.rglob("kairos-*"))
            if p.is_file() and not (skip and p.name.startswith(skip))}


@pytest.fixture(scope="module")
def private_tmp():
    """A scratch directory of this module outside pytest's basetemp: concurrent pytest sessions
    prune old basetemp directories, and this module runs for many minutes."""
    root = Path(tempfile.mkdtemp(prefix="kairos-raw-rpi4-", dir="/var/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def scratch(private_tmp, request):
    path = private_tmp / "t" / request.node.name
    path.mkdir(parents=True)
    return path


ARM64_BASE = {"mmdebstrap": {"suite": "bookworm", "components": ["main", "non-free-firmware"]}}
BOOT = {"timeout": BOOT_TIMEOUT}


@pytest.fixture(scope="module")
def rpi(private_tmp, ns, bases):
    """Workspace with the arm64 rpi4 flavor (overlay of one file), a cheap amd64 flavor and the
    arm64 generic ISO flavor (same mmdebstrap base as rpi4: one seed)."""
    root = private_tmp / "ws"
    ws = Workspace(root=root, ns=ns)
    overlay = ws.flavors / "overlay-rpi" / "etc" / "kairos-raw-test.conf"
    overlay.parent.mkdir(parents=True)
    overlay.write_text("rpi4 overlay v1\n")
    write_flavor(ws.flavors / "rpi.yaml", builtin_doc(
        "debian", ARM64_BASE, f"{ns}/kairos", ["kernel", "initrd", "squashfs", "raw", "boot"], arches=["arm64"],
        devices=["rpi4"], overlay="overlay-rpi", squashfs=LZ4, boot=BOOT, raw_xz_level=0))
    write_flavor(ws.flavors / "other.yaml", builtin_doc(
        "other", bases["b"], f"{ns}/kairos", ["kernel", "initrd", "squashfs", "raw", "boot"], release="1",
        raw_generic=True, raw_compression="none", squashfs=LZ4, boot=BOOT))
    write_flavor(ws.flavors / "arm.yaml", builtin_doc(
        "debian", ARM64_BASE, f"{ns}/kairos", ["iso", "boot"], arches=["arm64"], devices=["generic"],
        squashfs=LZ4, boot=BOOT))
    builds = {b.flavor.path.stem: b for b in expand(load_flavors([ws.flavors]))}
    return ws, builds["rpi"], builds["other"], overlay


@pytest.fixture(scope="module")
def arm_iso(rpi):
    ws, _, _, _ = rpi
    (b,) = [b for b in expand(load_flavors([ws.flavors])) if b.flavor.path.stem == "arm"]
    return b


def timed(ws: Workspace, *args: str):
    started = time.monotonic()
    result = ws.doit(*args, env=ENV, timeout=3 * 3600)
    elapsed = time.monotonic() - started
    print(f"TIMING doit {' '.join(args) or '(all)'}: {elapsed:.0f} s")
    return result, elapsed


@pytest.fixture(scope="module")
def built(rpi):
    """Build the amd64 generic raw image first, then `doit raw:<rpi4 stem>`; returns both results."""
    ws, b, other, _ = rpi
    first, _ = timed(ws, f"raw:{other.stem}")
    assert first.rc == 0, first.err
    before = snapshot(ws.outputs)
    assert {f"{other.stem}{s}" for s in ("-kernel", "-initrd", ".squashfs", ".img")} <= set(before)
    result, elapsed = timed(ws, f"raw:{b.stem}")
    assert result.rc == 0, result.err
    return result, before, elapsed


def rpi_chain(b) -> set[str]:
    return {f"{s}:{b.stem}" for s in ("convert", "push", "kernel", "initrd", "squashfs", "raw")}


def test_raw_builds_only_what_it_needs(rpi, built):
    ws, b, other, _ = rpi
    result, before, elapsed = built
    ran = result.build_actions
    assert rpi_chain(b) <= ran
    extra = {t for t in ran - rpi_chain(b) if not t.startswith(("bootstrap:", "seed:", "pull:"))}
    assert extra == set(), f"raw:{b.stem} ran unrelated tasks: {extra}"
    assert not any(other.stem in t for t in ran)
    # the amd64 artifact built before stayed untouched (same mtime and sha256)
    assert snapshot(ws.outputs, skip=b.stem) == before
    out = ws.outputs / "v3.1.0"
    img = out / f"{b.stem}.img"
    digest, name = (out / f"{b.stem}.img.sha256").read_text().split()
    assert name == img.name and digest == sha256(img)
    assert not [p for p in out.iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def disk(rpi, built, private_tmp):
    """The image, its sfdisk -J table, each partition extracted to a file, the FAT's files."""
    ws, b, _, _ = rpi
    img = ws.outputs / "v3.1.0" / f"{b.stem}.img"
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    work = private_tmp / "parts"
    work.mkdir()
    parts = {}
    with open(img, "rb") as src:
        for i, p in enumerate(table["partitions"], 1):
            if p["type"] == "5":
                continue
            dest = work / f"p{i}.fs"
            src.seek(p["start"] * 512)
            with open(dest, "wb") as fh:
                left = p["size"] * 512
                while left:
                    block = src.read(min(left, 4 * MIB))
                    assert block, f"image ends inside partition {i}"
                    fh.write(block)
                    left -= len(block)
            parts[i] = dest
    fat_dir = work / "fat"
    fat_dir.mkdir()
    subprocess.run(["mcopy", "-s", "-m", "-i", str(parts[1]), "::/", str(fat_dir)], check=True,
                   env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    return img, table, parts, fat_dir


def test_partition_table_is_as_planned(rpi, disk):
    ws, b, _, _ = rpi
    img, table, _, fat_dir = disk
    assert table["label"] == "dos"
    assert table["id"] == n.ids(b.stem)["label_id"]
    squash = (ws.outputs / "v3.1.0" / f"{b.stem}.squashfs").stat().st_size
    boot_content = sum(p.stat().st_size for p in fat_dir.rglob("*") if p.is_file())
    plan = n.plan(boot_content, squash, squash, n.ids(b.stem)["label_id"])
    got = [{"start": p["start"], "size": p["size"], "type": p["type"], "bootable": p.get("bootable", False)}
           for p in table["partitions"]]
    assert got == n.expected_table(plan)
    assert img.stat().st_size == plan.disk_size


def test_file_systems_are_clean_and_labelled(disk):
    _, _, parts, _ = disk
    vfat = subprocess.run(["fsck.vfat", "-n", str(parts[1])], capture_output=True, text=True)
    assert vfat.returncode == 0, vfat.stdout + vfat.stderr
    labels = {1: "COS_GRUB", 2: "COS_OEM", 3: "COS_RECOVERY", 5: "COS_STATE", 6: "COS_PERSISTENT"}
    for i, path in parts.items():
        got = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(path)], capture_output=True,
                             text=True).stdout.strip()
        assert got == labels[i]
        if i == 1:
            continue
        fsck = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)
        assert fsck.returncode == 0, f"partition {i}: {fsck.stdout}{fsck.stderr}"


def _debugfs_dump(fs: Path, inner: str, dest: Path) -> None:
    subprocess.run(["debugfs", "-R", f"dump {inner} {dest}", str(fs)], capture_output=True, check=True)


def test_kairos_partitions_hold_the_system(rpi, disk, scratch):
    tmp_path = scratch
    ws, b, _, _ = rpi
    _, _, parts, _ = disk
    squash = ws.outputs / "v3.1.0" / f"{b.stem}.squashfs"
    for i, inner in ((5, "/" + n.STATE_IMAGE), (3, "/" + n.RECOVERY_IMAGE)):
        dest = tmp_path / f"p{i}.squashfs"
        _debugfs_dump(parts[i], inner, dest)
        assert dest.exists() and sha256(dest) == sha256(squash), f"{inner} in partition {i}"
    listing = subprocess.run(["unsquashfs", "-lc", "-d", "", str(squash)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert "/etc/kairos-raw-test.conf" in listing        # the overlay is in the system image
    assert "/usr/lib/raspi-firmware/start4.elf" in listing


def test_firmware_partition_files(rpi, disk):
    ws, b, _, _ = rpi
    _, _, _, fat_dir = disk
    names = {p.name for p in fat_dir.iterdir()}
    assert FAT_FILES <= names, f"missing: {FAT_FILES - names}"
    out = ws.outputs / "v3.1.0"
    assert sha256(fat_dir / n.KERNEL_NAME) == sha256(out / f"{b.stem}-kernel")
    assert sha256(fat_dir / n.INITRD_NAME) == sha256(out / f"{b.stem}-initrd")
    assert (fat_dir / "config.txt").read_text() == n.config_txt("rpi4")
    assert (fat_dir / "cmdline.txt").read_text() == n.cmdline_txt("rpi4", live=True)  # builtin: dracut live root
    # real firmware blobs, not placeholders: start4.elf is an ELF file of a few MB
    start4 = (fat_dir / "start4.elf").read_bytes()
    assert start4[:4] == b"\x7fELF" and len(start4) > 1 * MIB
    assert (fat_dir / "bcm2711-rpi-4-b.dtb").read_bytes()[:4] == b"\xd0\x0d\xfe\xed"  # FDT magic


def test_kernel_is_aarch64(disk):
    _, _, _, fat_dir = disk
    data = (fat_dir / n.KERNEL_NAME).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    assert data[0x38:0x3c] == b"ARM\x64", "no arm64 Image header magic at 0x38"


def test_overlay_change_reruns_exactly_the_rpi4_chain(rpi, built, disk):
    """Before any boot (a boot of the changed image is the next test's): one overlay file changed,
    `doit raw:<rpi4 stem>` reruns exactly that build's chain, BuildKit reusing its package and
    initrd layers, and leaves every other artifact as it was."""
    ws, b, other, overlay = rpi
    img = ws.outputs / "v3.1.0" / f"{b.stem}.img"
    old_img = sha256(img)
    others = snapshot(ws.outputs, skip=b.stem)
    # unique to this session: an engine that kept its build cache from an earlier run has not seen it
    overlay.write_text(f"rpi4 overlay v2 {ws.ns}\n")
    result, _ = timed(ws, f"raw:{b.stem}")
    assert result.rc == 0, result.err
    assert result.build_actions == rpi_chain(b), result.build_actions
    # the overlay comes after the package and initrd steps: BuildKit reuses both layers
    cached = {step for step, hit in buildkit_steps(result.out + result.err).items() if hit}
    assert {"RUN sh /tmp/builtin-install.sh && rm -f /tmp/builtin-install.sh",
            "RUN sh /tmp/builtin-initrd.sh && rm -f /tmp/builtin-initrd.sh"} <= cached, cached
    assert "COPY overlay/ /" not in cached
    assert snapshot(ws.outputs, skip=b.stem) == others
    assert sha256(img) != old_img
    listing = subprocess.run(["unsquashfs", "-cat", str(ws.outputs / "v3.1.0" / f"{b.stem}.squashfs"),
                              "etc/kairos-raw-test.conf"], capture_output=True, text=True, check=True).stdout
    assert listing == f"rpi4 overlay v2 {ws.ns}\n"


def booted(ws: Workspace, b, hows: list[str]) -> dict:
    """`doit boot:<stem>`: runs the boot task (and what it needs), which must pass; returns
    <stem>-boot.json after printing the serial lines around the login prompt."""
    result, _ = timed(ws, f"boot:{b.stem}")
    assert result.rc == 0, result.out[-3000:] + result.err
    out = ws.outputs / "v3.1.0"
    report = json.loads((out / f"{b.stem}-boot.json").read_text())
    assert report["stem"] == b.stem
    assert [r["firmware"] for r in report["boots"]] == hows
    for r in report["boots"]:
        lines = r["last_serial_lines"]
        at = next(i for i, l in enumerate(lines) if qemu.LOGIN in l)
        print(f"{r['artifact']} ({r['firmware']}, {r['accel']}): login prompt after {r['seconds']} s:\n  "
              + "\n  ".join(lines[max(0, at - 4):at + 1]))
        assert r["passed"] is True and r["seconds"] > 0
        assert any(f"Kairos {b.stem} ({qemu.SERIAL[b.arch]})" in l for l in lines[:at])
    serial = (out / f"{b.stem}-boot.log").read_text()
    assert serial.count(qemu.LOGIN) >= len(hows)
    return report


def test_rpi4_image_boots_to_login_in_qemu_aarch64(rpi, disk):
    """qemu's virt machine has no Raspberry Pi firmware: the boot stage boots the kernel, initrd and
    command line of the image's own COS_GRUB partition (console moved to virt's serial port) with
    the image as its disk, so the root file system comes from the image's COS_STATE partition."""
    ws, b, _, _ = rpi
    img, _, _, fat_dir = disk
    assert "root=live:LABEL=COS_STATE rd.live.dir=/cOS rd.live.squashimg=active.squashfs" in \
        (fat_dir / "cmdline.txt").read_text()
    before = sha256(img)
    report = booted(ws, b, ["virt"])
    qemu_argv = report["boots"][0]["qemu"].split()
    assert qemu_argv[0] == "qemu-system-aarch64" and f"file={img},format=raw,if=virtio,snapshot=on" in qemu_argv
    serial = (ws.outputs / "v3.1.0" / f"{b.stem}-boot.log").read_text()
    assert "Linux version" in serial and ("aarch64" in serial or "arm64" in serial)
    assert sha256(img) == before  # the boot did not write into the artifact


def test_arm64_generic_iso_boots_to_login_under_aavmf(rpi, arm_iso, built):
    """The EFI ISO of an arm64 image, built on amd64 with the image's own grub arm64-efi modules."""
    ws, _, _, _ = rpi
    b = arm_iso
    booted(ws, b, ["uefi"])
    iso = ws.outputs / "v3.1.0" / f"{b.stem}.iso"
    listing = subprocess.run(["xorriso", "-indev", str(iso), "-find", "/", "-type", "f"], capture_output=True,
                             text=True, check=True).stdout
    assert "'/rootfs.squashfs'" in listing and "'/boot/grub/grub.cfg'" in listing
    assert "i386-pc" not in listing  # EFI only
    efi = subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"], capture_output=True,
                         text=True, check=True).stdout
    assert "UEFI" in efi
    serial = (ws.outputs / "v3.1.0" / f"{b.stem}-boot.log").read_text()
    assert "console=ttyAMA0" in serial or "ttyAMA0" in serial


def test_generic_raw_boots_to_login_with_ovmf(rpi, built):
    ws, _, other, _ = rpi
    img = ws.outputs / "v3.1.0" / f"{other.stem}.img"
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert [p["type"] for p in table["partitions"]] == ["ef", "83", "83", "5", "83", "83"]
    booted(ws, other, ["uefi"])
    serial = (ws.outputs / "v3.1.0" / f"{other.stem}-boot.log").read_text()
    assert "root=live:LABEL=COS_STATE" in serial, "the raw image's GRUB command line not seen"


def stems(ws: Workspace) -> set[str]:
    return {b.stem for b in expand(load_flavors([ws.flavors]))}


def per_build(ws: Workspace, ran: set[str]) -> tuple[set[str], set[str]]:
    """Split executed tasks into (tasks of one build, version-level aggregates like manifest:v3.1.0)."""
    names = stems(ws)
    mine = {t for t in ran if t.split(":", 1)[-1] in names}
    rest = ran - mine
    assert all(t.split(":", 1)[-1] == "v3.1.0" for t in rest), f"unexpected tasks ran: {rest}"
    return mine, rest


def test_second_raw_run_builds_nothing(rpi, built, arm_iso):
    ws, b, other, _ = rpi
    again, _ = timed(ws, f"raw:{b.stem}")
    assert again.rc == 0, again.err
    assert again.build_actions == set(), f"expected nothing to rebuild, ran {again.build_actions}"
    # the whole workspace: no build's task reruns (aggregates such as the manifest run once)
    whole, _ = timed(ws)
    assert whole.rc == 0, whole.err
    # the .img.xz and the -img carrier image holding it are made by the default run only, not by `doit raw:`;
    # `other` has raw_compression: none, so no .img.xz, and its carrier holds the .img
    assert per_build(ws, whole.build_actions)[0] == {f"xz:{b.stem}", f"carrier:{b.stem}",
                                                     f"carrier:{other.stem}"}, whole.build_actions
    out = ws.outputs / "v3.1.0"
    assert (out / f"{b.stem}.img.xz").is_file() and not (out / f"{other.stem}.img.xz").exists()
    final, _ = timed(ws)
    assert final.rc == 0, final.err
    assert final.build_actions == set(), f"expected nothing to rebuild, ran {final.build_actions}"


def test_rpi4_carrier_holds_build_img_xz(rpi, built):
    """The rpi4 `-img` carrier (pushed by the default run; `doit carrier:<stem>` builds nothing new when
    it is there): `crane export` lists one file, `build/<stem>.img.xz`, of the size of the published one.
    Prints the listing and the sizes of the .img and the .img.xz."""
    ws, b, _, _ = rpi
    result, _ = timed(ws, f"carrier:{b.stem}")
    assert result.rc == 0, result.err
    out = ws.outputs / "v3.1.0"
    img, packed = out / f"{b.stem}.img", out / f"{b.stem}.img.xz"
    tag = naming.carrier_tag(b.image)
    listing = crane_listing(tag)
    print(f"crane export --insecure {tag} - | tar -tvf -\n{listing}")
    print(f"{img.name}: {img.stat().st_size} bytes; {packed.name}: {packed.stat().st_size} bytes")
    files = [line.split() for line in listing.splitlines() if not line.startswith("d")]
    assert [(f[-1], int(f[2])) for f in files] == [(f"build/{packed.name}", packed.stat().st_size)]
