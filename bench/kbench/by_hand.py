"""By hand: the same tool commands the stages run, from the same pure argv builders, for the
stages row (squashfs, iso, raw)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tasks.builders import native_iso, native_raw
from tasks.epoch import build_epoch
from tasks.matrix import Build
from tasks.stages import extract, iso
from tasks.state import Paths, read_digest

from .common import BenchError, sh


def durable(path: Path) -> None:
    """`sync FILE` (fsync): the stages fsync every artifact before renaming it into place, so a
    machine crash never leaves a final name with unwritten data; by hand does the same."""
    sh(["sync", str(path)])


def checksum_argv(path: Path) -> list[str]:
    """SHA-256 by hand with OpenSSL, the implementation the stages use through Python's hashlib
    (coreutils' sha256sum on Debian 12 has no SHA-NI code and is ~4x slower here)."""
    return ["openssl", "dgst", "-sha256", "-r", str(path)] if shutil.which("openssl") else ["sha256sum", str(path)]


def by_hand_squashfs(paths: Paths, b: Build, work: Path) -> None:
    """docker create + docker export | tar -x, the stage's mksquashfs argv, sha256sum."""
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    cid = sh(["docker", "create", read_digest(paths.image_id(b)), "/bench"]).stdout.strip()
    try:
        export = subprocess.Popen(["docker", "export", cid], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        untar = subprocess.run(["tar", "-x", "--numeric-owner", "-p", "-C", str(rootfs), "-f", "-"],
                               stdin=export.stdout)
        export.stdout.close()
        if export.wait() != 0 or untar.returncode != 0:
            raise BenchError("by hand: docker export | tar -x failed")
    finally:
        sh(["docker", "rm", "-f", cid])
    (rootfs / ".dockerenv").unlink(missing_ok=True)
    out = work / "by-hand.squashfs"
    sh(extract.mksquashfs_argv(rootfs, out, b.flavor.squashfs, b.arch),
       env=dict(os.environ, **extract.mksquashfs_env(build_epoch(b.flavor))))
    durable(out)
    sh(checksum_argv(out))


def by_hand_iso(paths: Paths, b: Build, work: Path) -> None:
    """The stage's grub.cfg and grub-mkrescue argv on the same inputs, then sha256sum."""
    kernel, initrd, squashfs = paths.boot_files(b)
    cfg = work / "grub.cfg"
    cfg.write_text(native_iso.config(iso.title(b), b.arch))
    out = work / "by-hand.iso"
    sh(native_iso.mkrescue_argv(out, cfg, kernel, initrd, squashfs, epoch=build_epoch(b.flavor)))
    durable(out)
    sh(checksum_argv(out))


def by_hand_raw(paths: Paths, b: Build, work: Path) -> None:
    """A generic raw disk like tasks/builders/native_raw.py builds it, as commands: the memdisk tar
    + grub-mkimage, truncate + mkfs.vfat + mmd + mcopy, mkfs.ext4 -d + debugfs per partition,
    truncate + sfdisk, dd at the offsets, sha256sum."""
    epoch = build_epoch(b.flavor)
    kernel, initrd, squashfs = (paths.artifact(b, s) for s in ("-kernel", "-initrd", ".squashfs"))
    cfg = work / "grub.cfg"
    cfg.write_text(native_raw.grub_cfg())
    loader = work / native_raw.GRUB_EFI[b.arch][1]
    native_raw.grub_memdisk(b.arch, cfg, work / "memdisk.tar", epoch)
    sh(native_raw.grub_mkimage_argv(b.arch, loader, work / "memdisk.tar"))
    boot = {f"EFI/BOOT/{loader.name}": loader, native_raw.KERNEL_NAME: kernel, native_raw.INITRD_NAME: initrd}
    ident = native_raw.ids(b.stem)
    plan = native_raw.plan(sum(f.stat().st_size for f in boot.values()), squashfs.stat().st_size,
                           squashfs.stat().st_size, ident["label_id"], "ef")
    part = {p.label: p for p in plan.partitions}
    fs = {"COS_GRUB": by_hand_fat(work, boot, part["COS_GRUB"].size, ident["vfat"], epoch)}
    trees = {"COS_OEM": {}, "COS_RECOVERY": {native_raw.RECOVERY_IMAGE: squashfs},
             "COS_STATE": {native_raw.STATE_IMAGE: squashfs}, "COS_PERSISTENT": {}}
    for label, files in trees.items():
        tree = work / f"{label}.d"
        link_tree(tree, files)
        fs[label] = work / f"{label}.ext4"
        sh(native_raw.mkfs_ext4_argv(fs[label], label, ident[label], tree, part[label].size, epoch=epoch))
        script = work / f"{label}.debugfs"
        script.write_text(native_raw.ext4_times_script(native_raw.ext4_paths(tree), epoch))
        sh(native_raw.debugfs_argv(fs[label], script, epoch))
    disk = work / "by-hand.img"
    sh(["truncate", "-s", str(plan.disk_size), disk])
    sh(native_raw.sfdisk_argv(disk), input=native_raw.sfdisk_script(plan), stdin=None)
    for p in plan.partitions:
        sh(["dd", f"if={fs[p.label]}", f"of={disk}", "bs=1M", f"seek={p.start // native_raw.MIB}",
            "conv=notrunc,sparse", "status=none"])
    durable(disk)
    sh(checksum_argv(disk))


def link_tree(tree: Path, files: dict[str, Path]) -> None:
    tree.mkdir(parents=True)
    for rel, src in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(src, tree / rel)


def by_hand_fat(work: Path, boot: dict[str, Path], size: int, volume_id: str, epoch: int) -> Path:
    fat = work / "COS_GRUB.vfat"
    sh(["truncate", "-s", str(size), fat])
    sh(native_raw.mkfs_vfat_argv(fat, "COS_GRUB", volume_id, epoch=epoch))
    named = work / "COS_GRUB.d"
    link_tree(named, boot)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    sh(native_raw.mmd_argv(fat, native_raw.fat_dirs(list(boot)), epoch=epoch), env=env)
    by_dir: dict[str, list[Path]] = {}
    for rel in boot:
        by_dir.setdefault(os.path.dirname(rel), []).append(named / rel)
    for d, files in by_dir.items():
        sh(native_raw.mcopy_argv(fat, files, d + "/" if d else "", epoch=epoch), env=env)
    return fat


STAGES = {  # name -> (artifact suffix, by-hand function, what by hand is)
    "squashfs": (".squashfs", by_hand_squashfs, "docker export | tar -x, mksquashfs, sync, sha256"),
    "iso": (".iso", by_hand_iso, "grub-mkrescue, sync, sha256"),
    "raw": (".img", by_hand_raw, "grub-mkimage, mkfs.vfat+mtools, mkfs.ext4 -d + debugfs x4, sfdisk, dd, sync, sha256"),
}
