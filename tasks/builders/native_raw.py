"""Native raw disk image builder (Debian tools, no loop mounts, no privileges).

The disk is assembled from file systems built as plain files:
  - sfdisk writes an MBR partition table into a sparse image file;
  - the firmware/boot partition is `mkfs.vfat` on a file, filled with mtools (mmd, mcopy);
  - the Kairos partitions are `mkfs.ext4 -d <dir>` on files;
  - each file system is copied into the image at its partition offset (sparse, dd conv=notrunc).

Layout (MBR: the Raspberry Pi boot ROM/EEPROM reads the first FAT partition of an MBR disk;
five partitions need an extended one):

  p1  COS_GRUB        FAT32 (type 0c, bootable)  firmware, device trees, config.txt,
                                                 cmdline.txt, kernel, initrd
  p2  COS_OEM         ext4  (64 MiB)             empty: cloud-config / OEM files go here
  p3  COS_RECOVERY    ext4                       cOS/recovery.squashfs (the system, fallback)
  p4  (extended)
  p5  COS_STATE       ext4                       cOS/active.squashfs (the system)
  p6  COS_PERSISTENT  ext4  (64 MiB)             empty: persistent data

Generic (amd64, `raw_generic`) images differ in p1 only: an EFI system partition (type ef,
still labelled COS_GRUB like Kairos's EFI partition) with a standalone GRUB loader
EFI/BOOT/BOOTX64.EFI whose embedded grub.cfg boots /vmlinuz and /initrd.img; no BIOS boot code.

Not reproduced from Kairos's real installed layout (see README, raw stage): Kairos boots rpi
images through u-boot and GRUB from COS_GRUB and loop-mounts cOS/active.img (an ext4 image
labelled COS_ACTIVE) with immucore, keeps a passive.img for A/B upgrades and grows
COS_PERSISTENT at first boot. Here the firmware boots the kernel and initrd directly from
COS_GRUB (config.txt kernel=/initramfs), the active system is the squashfs as is, there is
no passive image, and nothing resizes partitions.

Pure builders (plan, sfdisk script, config.txt, cmdline.txt, argv) are unit-tested by tables;
`build_disk` runs them.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import posixpath
import re
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..epoch import frozen_clock_argv
from ..run import KairosError, run, say

MIB = 1 << 20
SECTOR = 512
ALIGN = MIB                      # every partition starts on a MiB boundary
OEM_SIZE = 64 * MIB
PERSISTENT_SIZE = 64 * MIB
MIN_BOOT_SIZE = 64 * MIB         # FAT32 needs >= 65525 clusters; 64 MiB of 512-byte clusters is fine
EXT4_SLACK = 48 * MIB            # journal, inode tables and reserved metadata of a small ext4

KERNEL_NAME = "vmlinuz"          # names inside the firmware partition
INITRD_NAME = "initrd.img"
CMDLINE_NAME = "cmdline.txt"     # the kernel command line the Raspberry Pi firmware reads
STATE_IMAGE = "cOS/active.squashfs"
RECOVERY_IMAGE = "cOS/recovery.squashfs"

# device -> firmware files: (required, optional globs) in the firmware package's directory
FIRMWARE = {
    "rpi4": (("start4.elf", "fixup4.dat"), ("start4*.elf", "fixup4*.dat")),
    "rpi3": (("bootcode.bin", "start.elf", "fixup.dat"), ("start_*.elf", "fixup_*.dat")),
}
# device -> (required device tree, globs of the SoC family's device trees); upstream kernel names
DTBS = {
    "rpi4": ("bcm2711-rpi-4-b.dtb", ("bcm2711-*.dtb",)),
    "rpi3": ("bcm2837-rpi-3-b.dtb", ("bcm2837-*.dtb", "bcm2710-*.dtb")),
}
# where distributions put the firmware and the kernel's broadcom device trees (relative to /)
FIRMWARE_DIRS = ("usr/lib/raspi-firmware", "usr/lib/linux-firmware-raspi", "boot/firmware")
DTB_DIR_PATTERNS = (r"usr/lib/linux-image-[^/]+/broadcom", r"lib/firmware/[^/]+/device-tree/broadcom",
                    r"boot/dtbs/[^/]+/broadcom", r"usr/lib/modules/[^/]+/dtb/broadcom", r"boot/dtb/broadcom",
                    r"boot/firmware")


@dataclass(frozen=True)
class Partition:
    number: int        # MBR partition number (5, 6: logical partitions in the extended one)
    label: str         # file system label
    fs: str            # "vfat" or "ext4"
    start: int         # bytes from the start of the disk
    size: int          # bytes
    mbr_type: str      # sfdisk type code
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Plan:
    disk_size: int
    partitions: tuple[Partition, ...]     # file system partitions, in disk order
    extended: tuple[int, int]             # (start, size) of the extended partition
    label_id: str                         # MBR disk identifier, 0x + 8 hex digits


def round_up(value: int, unit: int = MIB) -> int:
    return -(-value // unit) * unit


def boot_size(content: int) -> int:
    """FAT partition size for ``content`` bytes of files: 10% + 16 MiB headroom, >= 64 MiB."""
    return max(MIN_BOOT_SIZE, round_up(content + content // 10 + 16 * MIB))


def ext4_size(content: int) -> int:
    """ext4 partition size that holds ``content`` bytes of (few, large) files."""
    return round_up(content + content // 20 + EXT4_SLACK)


def plan(boot_content: int, recovery_content: int, state_content: int, label_id: str,
         boot_type: str = "c") -> Plan:
    """The partition plan (pure): sizes from contents, offsets MiB-aligned. ``boot_type`` is
    the MBR type of the FAT partition: "c" (FAT32 LBA, Raspberry Pi) or "ef" (EFI system).

    Logical partitions start 1 MiB after the start of the extended partition or of the
    previous logical one: the gap holds each logical partition's EBR.
    """
    parts = []
    pos = ALIGN
    for number, label, fs, size, mbr_type, bootable in (
            (1, "COS_GRUB", "vfat", boot_size(boot_content), boot_type, True),
            (2, "COS_OEM", "ext4", OEM_SIZE, "83", False),
            (3, "COS_RECOVERY", "ext4", ext4_size(recovery_content), "83", False)):
        parts.append(Partition(number, label, fs, pos, size, mbr_type, bootable))
        pos += size
    ext_start = pos
    for number, label, size in ((5, "COS_STATE", ext4_size(state_content)),
                                (6, "COS_PERSISTENT", PERSISTENT_SIZE)):
        pos += ALIGN  # EBR
        parts.append(Partition(number, label, "ext4", pos, size, "83"))
        pos += size
    return Plan(disk_size=pos, partitions=tuple(parts), extended=(ext_start, pos - ext_start),
                label_id=label_id)


def sfdisk_script(p: Plan) -> str:
    """sfdisk input for the plan (pure); the 4th entry is the extended partition."""
    lines = ["label: dos", f"label-id: {p.label_id}", "unit: sectors", f"sector-size: {SECTOR}", ""]

    def entry(start: int, size: int, mbr_type: str, bootable: bool = False) -> str:
        return f"start={start // SECTOR}, size={size // SECTOR}, type={mbr_type}" + (", bootable" if bootable else "")

    primaries = [x for x in p.partitions if x.number <= 4]
    logicals = [x for x in p.partitions if x.number > 4]
    lines += [entry(x.start, x.size, x.mbr_type, x.bootable) for x in primaries]
    lines.append(entry(p.extended[0], p.extended[1], "5"))
    lines += [entry(x.start, x.size, x.mbr_type, x.bootable) for x in logicals]
    return "\n".join(lines) + "\n"


def expected_table(p: Plan) -> list[dict]:
    """What `sfdisk -J` lists for the plan (pure): start/size in sectors, type, bootable."""
    rows = []
    for x in [q for q in p.partitions if q.number <= 4]:
        rows.append({"start": x.start // SECTOR, "size": x.size // SECTOR, "type": x.mbr_type,
                     "bootable": x.bootable})
    rows.append({"start": p.extended[0] // SECTOR, "size": p.extended[1] // SECTOR, "type": "5",
                 "bootable": False})
    for x in [q for q in p.partitions if q.number > 4]:
        rows.append({"start": x.start // SECTOR, "size": x.size // SECTOR, "type": x.mbr_type,
                     "bootable": x.bootable})
    return rows


def ids(seed: str) -> dict[str, str]:
    """Stable identifiers derived from the build stem (pure): MBR label id, FAT volume id,
    one UUID per ext4 label. Same stem, same ids: images differ only in content."""
    digest = hashlib.sha256(seed.encode()).hexdigest()
    out = {"label_id": "0x" + digest[:8], "vfat": digest[8:16].upper()}
    for label in ("COS_OEM", "COS_RECOVERY", "COS_STATE", "COS_PERSISTENT"):
        out[label] = str(uuid.UUID(hashlib.sha256(f"{seed}:{label}".encode()).hexdigest()[:32]))
    return out


def config_txt(device: str) -> str:
    """Raspberry Pi firmware config.txt (pure): 64-bit, upstream device tree names, the kernel
    and initrd from this partition, serial console on."""
    return "\n".join([
        f"# {device}: written by kairos-doit (native raw builder); read by the Raspberry Pi firmware",
        "arm_64bit=1",
        "enable_uart=1",
        "upstream_kernel=1",
        f"kernel={KERNEL_NAME}",
        f"initramfs {INITRD_NAME} followkernel",
    ]) + "\n"


def cmdline_txt(device: str, live: bool = False) -> str:
    """Kernel command line (pure), one line: the Kairos active-system parameters.

    ``live``: the dracut live form (`root=live:LABEL=COS_STATE rd.live.dir=/cOS
    rd.live.squashimg=active.squashfs`), which the builtin converter's initrd boots;
    otherwise immucore's `root=LABEL=COS_STATE cos-img/filename=...` (kairos-init images).
    The serial console of arm64 rpi3/rpi4 with the upstream kernel is the mini UART ttyS1;
    generic machines use ttyS0.
    """
    serial = "ttyS0" if device == "generic" else "ttyS1"
    state_dir, _, state_file = STATE_IMAGE.rpartition("/")
    root = ["root=live:LABEL=COS_STATE", f"rd.live.dir=/{state_dir}", f"rd.live.squashimg={state_file}"] if live \
        else ["root=LABEL=COS_STATE", f"cos-img/filename=/{STATE_IMAGE}"]
    return " ".join([
        "console=tty1", f"console={serial},115200", *root,
        "panic=5", "rd.neednet=0", "rd.cos.oemlabel=COS_OEM", "rd.cos.oemtimeout=10", "rootwait",
    ]) + "\n"


def grub_cfg(live: bool = False) -> str:
    """GRUB configuration embedded in the EFI loader of generic raw images (pure): the kernel
    and initrd from the COS_GRUB partition, serial and screen consoles."""
    return "\n".join([
        "serial --unit=0 --speed=115200",
        "terminal_input console serial",
        "terminal_output console serial",
        "set timeout=1",
        "set default=0",
        "search --no-floppy --label COS_GRUB --set=root",
        'menuentry "Kairos (active)" {',
        f"  linux /{KERNEL_NAME} {cmdline_txt('generic', live).strip()}",
        f"  initrd /{INITRD_NAME}",
        "}",
    ]) + "\n"


GRUB_EFI = {"amd64": ("x86_64-efi", "BOOTX64.EFI")}
GRUB_MODULES = ("part_msdos", "fat", "ext2", "search", "search_label", "normal", "linux", "gzio", "echo",
                "configfile", "serial", "terminal", "all_video", "test")


GRUB_LISTS = ("moddep.lst", "command.lst", "fs.lst", "partmap.lst", "parttool.lst", "video.lst", "crypto.lst",
              "terminal.lst", "modinfo.sh")          # what grub-mkstandalone puts next to the modules
GRUB_PREFIX = "(memdisk)/boot/grub"


def module_closure(moddep: str, wanted: tuple[str, ...]) -> list[str]:
    """``wanted`` and every module they need, by grub's moddep.lst text, sorted (pure)."""
    deps = {}
    for line in moddep.splitlines():
        name, _, needs = line.partition(":")
        deps[name.strip()] = needs.split()
    found: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += deps.get(name, [])
    return sorted(found)


def grub_memdisk(arch: str, cfg: Path, out: Path, epoch: int, grub_lib: Path = Path("/usr/lib/grub")) -> None:
    """The memdisk tar of a standalone GRUB at ``out``, as grub-mkstandalone lays it out
    (boot/grub/grub.cfg, boot/grub/<platform>/ with GRUB_MODULES, what they need and grub's
    lists), but with sorted members, owner 0 and every time ``epoch``: grub-mkstandalone 2.06
    dates its members with the time it copied the modules, so it cannot be reproducible."""
    platform = GRUB_EFI[arch][0]
    source = grub_lib / platform
    names = [f"{m}.mod" for m in module_closure((source / "moddep.lst").read_text(), GRUB_MODULES)]
    members = [(f"boot/grub/{platform}/{n}", source / n) for n in sorted(names + list(GRUB_LISTS))]
    members.append(("boot/grub/grub.cfg", cfg))
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, path in sorted(members):
            info = tarfile.TarInfo(name)
            data = path.read_bytes()
            info.size, info.mtime, info.mode = len(data), epoch, 0o644
            tar.addfile(info, io.BytesIO(data))


def grub_mkimage_argv(arch: str, out: Path, memdisk: Path) -> list[str]:
    """A standalone GRUB EFI loader (pure): GRUB_MODULES and the memdisk ``memdisk`` built in,
    its prefix the memdisk (what grub-mkstandalone runs, with our memdisk)."""
    return ["grub-mkimage", "-O", GRUB_EFI[arch][0], "-o", str(out), "-p", GRUB_PREFIX, "-m", str(memdisk),
            "memdisk", "tar", *GRUB_MODULES]


def pick_firmware(listing: list[str], device: str) -> tuple[list[str], list[str]]:
    """Choose firmware files and device trees among squashfs paths (pure).

    ``listing`` holds paths relative to / (no leading slash). Returns (firmware, dtbs) paths;
    raises KairosError naming what is missing.
    """
    required, globs = FIRMWARE[device]
    firmware: list[str] = []
    for top in FIRMWARE_DIRS:
        names = {posixpath.basename(p): p for p in listing if posixpath.dirname(p) == top}
        if all(r in names for r in required):
            firmware = sorted(names[n] for n in names if any(fnmatch.fnmatch(n, g) for g in (*required, *globs)))
            break
    if not firmware:
        need = ", ".join(required)
        raise KairosError(f"no Raspberry Pi firmware ({need}) in the image (looked in /"
                          + ", /".join(FIRMWARE_DIRS) + "); the builtin converter installs raspi-firmware for "
                          "rpi devices (Debian: needs the non-free-firmware component in the base)")
    dtb_required, dtb_globs = DTBS[device]
    dirs: dict[str, list[str]] = {}
    for p in listing:
        d = posixpath.dirname(p)
        if any(re.fullmatch(pat, d) for pat in DTB_DIR_PATTERNS):
            dirs.setdefault(d, []).append(posixpath.basename(p))
    usable = [d for d, names in dirs.items() if dtb_required in names]
    if not usable:
        raise KairosError(f"no {dtb_required} in the image (looked in /usr/lib/linux-image-*/broadcom and "
                          "other kernel device tree directories)")
    best = max(usable, key=_version_key)
    dtbs = sorted(f"{best}/{n}" for n in dirs[best] if any(fnmatch.fnmatch(n, g) for g in dtb_globs))
    return firmware, dtbs


def _version_key(text: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


# FAT: mkfs.vfat (dosfstools 4.2) and mtools date what they write with the clock and have no
# SOURCE_DATE_EPOCH: they run with the clock stopped at the epoch (faketime), and mcopy without -m
# dates each file at that clock, not at its source's time (a build output's: when it was written).
def mkfs_vfat_argv(path: Path, label: str, volume_id: str, *, epoch: int) -> list[str]:
    return frozen_clock_argv(epoch, ["mkfs.vfat", "-F", "32", "-n", label, "-i", volume_id, str(path)])


def mmd_argv(image: Path, dirs: list[str], *, epoch: int) -> list[str]:
    return frozen_clock_argv(epoch, ["mmd", "-i", str(image), *[f"::/{d}" for d in dirs]])


def mcopy_argv(image: Path, sources: list[Path], dest: str = "", *, epoch: int) -> list[str]:
    return frozen_clock_argv(epoch, ["mcopy", "-i", str(image), "-o", *[str(s) for s in sources], f"::/{dest}"])


def ext4_env(epoch: int) -> list[str]:
    """`env` words dating what e2fsprogs 1.47.0 stamps with the clock (superblock, root,
    lost+found, creation times) at ``epoch``: its E2FSPROGS_FAKE_TIME (pure)."""
    return ["env", f"E2FSPROGS_FAKE_TIME={epoch}"]


def mkfs_ext4_argv(path: Path, label: str, fs_uuid: str, source: Path, size: int, *, epoch: int) -> list[str]:
    """mkfs.ext4 that fills the file system from ``source`` (no mount needed); UUID and directory
    hash seed fixed, clock at ``epoch``. `-d` copies each file's atime, mtime and ctime from
    ``source``: `ext4_times_script` sets them afterwards."""
    return [*ext4_env(epoch), "mkfs.ext4", "-F", "-q", "-L", label, "-U", fs_uuid,
            "-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-m", "0", "-d", str(source), str(path), f"{size // 1024}k"]


EXT4_TIMES = ("atime", "mtime", "ctime", "crtime")


def ext4_times_script(paths: list[str], epoch: int) -> str:
    """debugfs commands dating every inode of ``paths`` (absolute, in the file system) at
    ``epoch`` (pure). mkfs.ext4 -d took the times of the staged files: build outputs and files
    written by this run (a checked-out cloud-config at best), so they carry no information and
    none can be clamped afterwards (the source's ctime is the time it was staged)."""
    return "".join(f"set_inode_field {p} {field} @{epoch}\n" for p in paths for field in EXT4_TIMES)


def debugfs_argv(fs_file: Path, script: Path, epoch: int) -> list[str]:
    return [*ext4_env(epoch), "debugfs", "-w", "-f", str(script), str(fs_file)]


def ext4_paths(tree: Path) -> list[str]:
    """Every inode path mkfs.ext4 -d makes from ``tree``, as debugfs names them, sorted: the
    root, lost+found and the tree's entries."""
    found = ["/", "/lost+found"]
    for top, dirs, files in os.walk(tree):
        rel = Path(top).relative_to(tree)
        for name in sorted(dirs + files):
            found.append("/" + (rel / name).as_posix())
    return sorted(found)


def sfdisk_argv(image: Path) -> list[str]:
    return ["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", str(image)]


# --- the runner ---------------------------------------------------------------------

def _stage_file(src: Path, dest: Path) -> None:
    """Put ``src`` at ``dest``: a hard link when possible (same file system), else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def write_at(image: Path, offset: int, fs_file: Path) -> None:
    """Copy ``fs_file`` into ``image`` at ``offset`` (dd conv=notrunc), skipping zero blocks
    so the image stays sparse."""
    zero = bytes(MIB)
    with open(fs_file, "rb") as src, open(image, "r+b") as dst:
        pos = offset
        while True:
            block = src.read(MIB)
            if not block:
                break
            if block != zero[:len(block)]:
                dst.seek(pos)
                dst.write(block)
            pos += len(block)


def rpi_boot_files(work: Path, device: str, kernel: Path, initrd: Path, firmware: list[Path],
                   dtbs: list[Path], live: bool = False) -> dict[str, Path]:
    """FAT path -> source file for a Raspberry Pi firmware partition (writes the two text files)."""
    (work / "config.txt").write_text(config_txt(device))
    (work / CMDLINE_NAME).write_text(cmdline_txt(device, live))
    files = {f.name: f for f in [*firmware, *dtbs]}
    files.update({KERNEL_NAME: kernel, INITRD_NAME: initrd, "config.txt": work / "config.txt",
                  CMDLINE_NAME: work / CMDLINE_NAME})
    return files


def efi_boot_files(work: Path, arch: str, kernel: Path, initrd: Path, live: bool = False, *,
                   epoch: int) -> dict[str, Path]:
    """FAT path -> source file for an EFI system partition with a standalone GRUB (grub-mkimage
    with a memdisk holding grub.cfg and the modules, dated ``epoch``)."""
    if arch not in GRUB_EFI:
        raise KairosError(f"the native raw builder makes generic raw images for {', '.join(GRUB_EFI)} only "
                          f"(GRUB for {arch} EFI is not available on this host)")
    cfg = work / "grub.cfg"
    cfg.write_text(grub_cfg(live))
    loader, memdisk = work / GRUB_EFI[arch][1], work / "memdisk.tar"
    grub_memdisk(arch, cfg, memdisk, epoch)
    run(grub_mkimage_argv(arch, loader, memdisk), what="grub-mkimage (EFI loader)")
    return {f"EFI/BOOT/{loader.name}": loader, KERNEL_NAME: kernel, INITRD_NAME: initrd}


def fat_dirs(paths: list[str]) -> list[str]:
    """Directories to create in the FAT file system for ``paths``, parents first (pure)."""
    out: list[str] = []
    for p in paths:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in out:
                out.append(d)
    return out


def make_fat(fat: Path, size: int, label: str, volume_id: str, files: dict[str, Path], staging: Path,
             epoch: int) -> Path:
    """A FAT32 file system of ``size`` bytes at ``fat`` holding ``files`` (FAT path -> source),
    made with mkfs.vfat and filled with mtools (no mount), everything dated at ``epoch``;
    ``staging`` holds the files under their FAT names meanwhile (hard links where possible)."""
    env = {"MTOOLS_SKIP_CHECK": "1"}
    with open(fat, "wb") as fh:
        fh.truncate(size)
    run(mkfs_vfat_argv(fat, label, volume_id, epoch=epoch), what=f"mkfs.vfat {label}")
    for rel, src in files.items():
        _stage_file(src, staging / rel)
    dirs = fat_dirs(list(files))
    if dirs:
        run(mmd_argv(fat, dirs, epoch=epoch), env=env, what=f"mmd in {label}")
    by_dir: dict[str, list[Path]] = {}
    for rel in files:
        by_dir.setdefault(posixpath.dirname(rel), []).append(staging / rel)
    for d, group in by_dir.items():
        run(mcopy_argv(fat, group, d + "/" if d else "", epoch=epoch), env=env, what=f"mcopy files into {label}")
    return fat


def make_ext4(fs_file: Path, label: str, fs_uuid: str, tree: Path, size: int, epoch: int) -> None:
    """An ext4 file system of ``size`` bytes at ``fs_file`` holding ``tree``, every time ``epoch``."""
    run(mkfs_ext4_argv(fs_file, label, fs_uuid, tree, size, epoch=epoch), what=f"mkfs.ext4 {label}")
    script = fs_file.with_name(fs_file.name + ".debugfs")
    script.write_text(ext4_times_script(ext4_paths(tree), epoch))
    said = run(debugfs_argv(fs_file, script, epoch), capture=True, what=f"date the files of {label}")
    # debugfs exits 0 when a command fails: it prints the command and then the error
    wrong = [line for line in said.splitlines() if line.strip() and not line.startswith("debugfs")]
    if wrong:
        raise KairosError(f"debugfs could not date the files of {label}: {'; '.join(wrong[:3])}")


def build_disk(out: Path, work: Path, seed: str, boot: dict[str, Path], squashfs: Path,
               boot_type: str = "c", oem: dict[str, Path] | None = None, *, epoch: int) -> Plan:
    """Assemble the raw disk image at ``out``; ``boot`` maps FAT paths to files, ``oem`` the
    files of COS_OEM (e.g. the cloud-config), ``work`` is scratch. Ids come from ``seed`` (`ids`)
    and every time stamp is ``epoch``: the same inputs give the same bytes."""
    ident = ids(seed)
    boot_content = sum(f.stat().st_size for f in boot.values())
    sq = squashfs.stat().st_size
    p = plan(boot_content, sq, sq, ident["label_id"], boot_type)
    sizes = ", ".join(f"{x.label} {x.size // MIB} MiB" for x in p.partitions)
    say(f"    raw layout (MBR, {p.disk_size // MIB} MiB): {sizes}")

    by_label = {x.label: x for x in p.partitions}
    fs_files: dict[str, Path] = {}

    # firmware/boot partition: FAT32 on a file, filled with mtools under the planned names
    fs_files["COS_GRUB"] = make_fat(work / "COS_GRUB.vfat", by_label["COS_GRUB"].size, "COS_GRUB", ident["vfat"],
                                    boot, work / "COS_GRUB.d", epoch)

    # Kairos partitions: ext4 filled from directories
    trees = {"COS_OEM": dict(oem or {}), "COS_RECOVERY": {RECOVERY_IMAGE: squashfs}, "COS_STATE": {STATE_IMAGE: squashfs},
             "COS_PERSISTENT": {}}
    for label, files in trees.items():
        tree = work / f"{label}.d"
        tree.mkdir()
        for rel, src in files.items():
            _stage_file(src, tree / rel)
        fs_file = work / f"{label}.ext4"
        say(f"    mkfs.ext4 {label} ({by_label[label].size // MIB} MiB)")
        make_ext4(fs_file, label, ident[label], tree, by_label[label].size, epoch)
        fs_files[label] = fs_file

    # the disk: sparse file, partition table, file systems at their offsets
    with open(out, "wb") as fh:
        fh.truncate(p.disk_size)
    run(sfdisk_argv(out), feed=[sfdisk_script(p).encode()], what="sfdisk (partition table)")
    for x in p.partitions:
        if fs_files[x.label].stat().st_size != x.size:
            raise KairosError(f"{x.label}: file system is {fs_files[x.label].stat().st_size} bytes, "
                              f"the partition {x.size}")
        write_at(out, x.start, fs_files[x.label])
    return p
