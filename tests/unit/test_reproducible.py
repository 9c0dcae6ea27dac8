"""Same inputs, same bytes: the squashfs, ISO, raw and iPXE builders run twice on small fixture files
whose times differ (as two builds' outputs would) and at different clock times give identical
files; a different SOURCE_DATE_EPOCH gives different ones (so the check is not vacuous)."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest

from tasks.model import SquashfsOptions
from tasks.stages.extract import make_squashfs

EPOCH = 1700000000


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def touch_tree(root: Path, when: float) -> None:
    """Every file and directory of ``root`` dated ``when`` (newer than EPOCH: a fresh build's)."""
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            os.utime(os.path.join(top, name), (when, when), follow_symlinks=False)
    os.utime(root, (when, when))


def small_tree(root: Path, when: float) -> Path:
    """A small root file system: text, a binary-ish file, a symlink, an old file, empty dirs."""
    (root / "etc").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (root / "var/empty").mkdir(parents=True)
    (root / "etc/os-release").write_text('NAME="Kairos test"\n')
    (root / "usr/bin/tool").write_bytes(bytes(range(256)) * 400)
    (root / "usr/bin/tool").chmod(0o755)
    (root / "usr/bin/alias").symlink_to("tool")
    (root / "etc/old").write_text("older than the epoch\n")
    touch_tree(root, when)
    os.utime(root / "etc/old", (EPOCH - 86400, EPOCH - 86400))
    return root


def test_squashfs_same_tree_same_bytes(tmp_path):
    """Two exports of one image (files dated at export, mksquashfs started a second apart) give
    the same squashfs; file times older than the epoch are kept, newer ones clamped."""
    opts = SquashfsOptions(compression="gzip", block_size="128k")
    first = small_tree(tmp_path / "a", time.time())
    make_squashfs(first, tmp_path / "1.squashfs", opts, "amd64", EPOCH)
    time.sleep(1.1)
    second = small_tree(tmp_path / "b", time.time() + 3600)
    make_squashfs(second, tmp_path / "2.squashfs", opts, "amd64", EPOCH)
    assert sha256(tmp_path / "1.squashfs") == sha256(tmp_path / "2.squashfs")
    make_squashfs(second, tmp_path / "3.squashfs", opts, "amd64", EPOCH + 1)
    assert sha256(tmp_path / "3.squashfs") != sha256(tmp_path / "1.squashfs")
    listing = os.popen(f"unsquashfs -lln -UTC {tmp_path / '1.squashfs'}").read()
    assert " 2023-11-13 22:13 squashfs-root/etc/old" in listing
    assert " 2023-11-14 22:13 squashfs-root/usr/bin/tool" in listing


def boot_inputs(folder: Path, when: float) -> tuple[Path, Path, Path]:
    """Fake kernel, initrd and squashfs files (they need not boot), dated ``when``."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, size in (("s-kernel", 300_000), ("s-initrd", 200_000), ("s.squashfs", 500_000)):
        path = folder / name
        path.write_bytes(hashlib.sha256(name.encode()).digest() * (size // 32))
        os.utime(path, (when, when))
        files.append(path)
    return tuple(files)


needs_grub = pytest.mark.skipif(not all(shutil.which(t) for t in ("grub-mkrescue", "xorriso", "faketime", "mformat")),
                                reason="needs grub-mkrescue, xorriso, mtools and faketime (ci/setup.sh)")


@needs_grub
def test_iso_same_inputs_same_bytes(tmp_path):
    """Two ISO builds from the same kernel/initrd/squashfs bytes (dated differently, as two
    builds' outputs are) a couple of seconds apart are identical; another epoch differs."""
    from tasks.builders.native_iso import build_iso

    def build(name: str, when: float, epoch: int = EPOCH) -> str:
        kernel, initrd, squashfs = boot_inputs(tmp_path / name, when)
        out = tmp_path / f"{name}.iso"
        build_iso(out, kernel, initrd, squashfs, "Kairos test", "amd64", tmp_path / f"{name}.w", epoch=epoch)
        return sha256(out)

    first = build("one", time.time())
    time.sleep(1.5)
    assert build("two", time.time() + 7200) == first
    assert build("three", time.time(), EPOCH + 86400) != first


needs_disk_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkfs.vfat", "mcopy", "mkfs.ext4", "debugfs", "sfdisk", "faketime",
                                      "grub-mkimage")),
    reason="needs dosfstools, mtools, e2fsprogs, fdisk, grub and faketime (ci/setup.sh)")


@needs_disk_tools
@pytest.mark.parametrize("kind", ["rpi4", "generic"])
def test_raw_same_inputs_same_bytes(tmp_path, kind):
    """Two raw disk builds (Raspberry Pi firmware partition, or EFI partition with GRUB) from the
    same input bytes, dated differently and a second apart, are identical; another epoch differs."""
    from tasks.builders import native_raw

    def build(name: str, when: float, epoch: int = EPOCH) -> str:
        kernel, initrd, squashfs = boot_inputs(tmp_path / name, when)
        work = tmp_path / f"{name}.w"
        work.mkdir()
        if kind == "rpi4":
            firmware = []
            for fw in ("start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb"):
                (tmp_path / name / fw).write_bytes(fw.encode() * 100)
                os.utime(tmp_path / name / fw, (when, when))
                firmware.append(tmp_path / name / fw)
            boot = native_raw.rpi_boot_files(work, "rpi4", kernel, initrd, firmware[:2], firmware[2:])
        else:
            boot = native_raw.efi_boot_files(work, "amd64", kernel, initrd, epoch=epoch)
        out = tmp_path / f"{name}.img"
        native_raw.build_disk(out, work, "kairos-test", boot, squashfs, "c" if kind == "rpi4" else "ef",
                              {"90_custom.yaml": kernel}, epoch=epoch)
        return sha256(out)

    first = build("one", time.time())
    time.sleep(1.1)
    assert build("two", time.time() + 7200) == first
    assert build("three", time.time(), EPOCH + 86400) != first


@needs_grub
@needs_disk_tools
def test_ipxe_media_same_inputs_same_bytes(tmp_path):
    """The iPXE ISO and USB image, twice from the same script and ipxe.lkrn bytes (dated
    differently) a second apart, are identical; another epoch differs."""
    from tasks.builders import native_ipxe

    def build(name: str, when: float, epoch: int = EPOCH) -> tuple[str, str]:
        folder = tmp_path / name
        folder.mkdir()
        script, lkrn = folder / "kairos.ipxe", folder / "ipxe.lkrn"
        script.write_text("#!ipxe\nkernel http://10.0.2.2/k\nboot\n")
        lkrn.write_bytes(hashlib.sha256(b"lkrn").digest() * 9000)
        for path in (script, lkrn):
            os.utime(path, (when, when))
        iso, usb = folder / "m.iso", folder / "m.img"
        (folder / "wi").mkdir()
        (folder / "wu").mkdir()
        native_ipxe.build_iso(iso, folder / "wi", script, lkrn, "Kairos test", epoch=epoch)
        native_ipxe.build_usb(usb, folder / "wu", script, lkrn, "kairos-test", epoch=epoch)
        return sha256(iso), sha256(usb)

    first = build("one", time.time())
    time.sleep(1.1)
    assert build("two", time.time() + 7200) == first
    other = build("three", time.time(), EPOCH + 86400)
    assert other[0] != first[0] and other[1] != first[1]
