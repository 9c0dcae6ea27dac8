"""Native iPXE boot media (Debian tools, no loop mounts, no privileges).

Both media boot Debian's `ipxe.lkrn` (package ipxe) through GRUB for BIOS, handing it the
iPXE script as its initrd: iPXE runs an initrd that starts with `#!ipxe` as its script.

- `<stem>-ipxe.iso`: `grub-mkrescue` for i386-pc only (a hybrid image: it boots from a CD
  and, written to a stick, as a disk) holding /ipxe.lkrn, /kairos.ipxe and a grub.cfg
  that runs `linux16 /ipxe.lkrn` + `initrd16 /kairos.ipxe` at once.
- `<stem>-ipxe-usb.img`: a raw disk: MBR partition table written by sfdisk into a file,
  one FAT16 partition made by `mkfs.vfat --offset` in that file and filled with mcopy
  (the script stays editable on the stick), and GRUB installed the way grub-bios-setup
  lays it out without needing a block device: `boot.img` (first 440 bytes) in the MBR,
  a `grub-mkimage` core image in the sectors after it (its first sector is where boot.img
  looks by default, and grub-mkimage records the core's length in it). The core image
  carries an early config that loads iPXE and the script from the FAT partition.

BIOS only: Debian's iPXE 1.0.0+git-20190125 EFI binary cannot take an embedded script
from a boot loader, so these media do not boot on UEFI-only machines.

Pure builders (grub configs, sfdisk script, sizes, argv) are unit-tested by tables;
`build_iso` and `build_usb` run them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..epoch import epoch_env, frozen_clock_argv
from ..needs import IPXE_LKRN, PROGRAMS
from ..run import KairosError, UsageError, run
from .native_iso import iso_date

SECTOR = 512
MIB = 1 << 20
PART_START = MIB                 # the FAT partition starts at 1 MiB; the gap before it holds GRUB
MIN_PART_SIZE = 7 * MIB          # FAT16 needs >= 4085 clusters: 7 MiB of 512-byte clusters is 14336
PART_SLACK = 4 * MIB             # room to edit the script or add files on the stick
PART_TYPE = "e"                  # W95 FAT16 (LBA)
FAT_LABEL = "KAIROSIPXE"
MBR_CODE_SIZE = 440              # boot code area of the MBR; disk id and partition table follow

LKRN_NAME = "ipxe.lkrn"          # names on the media
SCRIPT_NAME = "kairos.ipxe"

# Debian's ipxe package ships the same file under both names (one is a symlink)
IPXE_LKRN_CANDIDATES = tuple(Path(p) for p in PROGRAMS[IPXE_LKRN].files)
GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
# modules the ISO needs besides what grub-mkrescue always embeds (iso9660, biosdisk)
ISO_MODULES = ("normal", "linux16", "serial", "terminal", "echo")
# modules of the USB core image: read the MBR + FAT partition, load a 16-bit Linux image
USB_MODULES = ("biosdisk", "part_msdos", "fat", "linux16", "boot")


# --- finding the inputs -----------------------------------------------------------

def find_ipxe_lkrn(candidates: tuple[Path, ...] = IPXE_LKRN_CANDIDATES) -> Path:
    """The first existing ipxe.lkrn, or a UsageError naming the Debian package."""
    for path in candidates:
        if path.is_file():
            return path
    raise UsageError(f"cannot find {LKRN_NAME} (looked at {', '.join(str(p) for p in candidates)}), "
                     "needed to build the iPXE ISO and USB image; install Debian package ipxe")


def check_grub_pc(grub_dir: Path = GRUB_PC_DIR) -> None:
    if not (grub_dir / "boot.img").is_file() or not (grub_dir / "linux16.mod").is_file():
        raise UsageError(f"cannot find GRUB's BIOS images in {grub_dir}, needed to build the iPXE ISO "
                         "and USB image; install Debian package grub-pc-bin")


# --- ISO --------------------------------------------------------------------------

def iso_grub_cfg(title: str, lkrn: str = LKRN_NAME, script: str = SCRIPT_NAME) -> str:
    """grub.cfg of the iPXE ISO: no menu delay, messages on screen and serial port."""
    safe_title = title.replace("\\", "\\\\").replace("'", "'\\''")
    return (
        "serial --unit=0\n"
        "terminal_input console serial\n"
        "terminal_output console serial\n"
        "set timeout=0\n"
        "set default=0\n"
        f"menuentry '{safe_title}' {{\n"
        "    echo 'Loading iPXE with the embedded Kairos netboot script'\n"
        f"    linux16 /{lkrn}\n"
        f"    initrd16 /{script}\n"
        "}\n"
    )


def mkrescue_argv(out: Path, tree: Path, grub_dir: Path = GRUB_PC_DIR, *, epoch: int) -> list[str]:
    """grub-mkrescue for BIOS only, with just the modules the config uses, dated at ``epoch`` as
    the Kairos ISO is (`native_iso.mkrescue_argv`: clock stopped at the epoch, SOURCE_DATE_EPOCH for
    xorriso, every file dated at the epoch)."""
    return frozen_clock_argv(epoch, [
        "grub-mkrescue", "-d", str(grub_dir), "--install-modules=" + " ".join(ISO_MODULES),
        "--fonts=", "--locales=", "--themes=", "-o", str(out), "--set_all_file_dates", iso_date(epoch),
        str(tree)], epoch_env(epoch))


# --- USB disk image ---------------------------------------------------------------

def usb_core_cfg(lkrn: str = LKRN_NAME, script: str = SCRIPT_NAME) -> str:
    """Early config embedded in the core image. GRUB runs it with its rescue parser
    (plain commands only); root is the FAT partition of the boot disk (the prefix)."""
    return f"linux16 /{lkrn}\ninitrd16 /{script}\nboot\n"


def usb_prefix() -> str:
    """GRUB prefix: partition 1 of the disk the BIOS booted from."""
    return "(,msdos1)/"


def round_up(value: int, unit: int = MIB) -> int:
    return -(-value // unit) * unit


def usb_sizes(payload: int) -> tuple[int, int]:
    """(partition size, image size) in bytes for ``payload`` bytes of files (pure)."""
    part = max(MIN_PART_SIZE, round_up(payload + PART_SLACK))
    return part, PART_START + part


def disk_ids(seed: str) -> tuple[str, str]:
    """Stable MBR disk id and FAT volume id derived from ``seed`` (pure)."""
    digest = hashlib.sha256(seed.encode()).hexdigest()
    return "0x" + digest[:8], digest[8:16].upper()


def sfdisk_script(part_size: int, label_id: str) -> str:
    return ("label: dos\n"
            f"label-id: {label_id}\n"
            "unit: sectors\n"
            "\n"
            f"start={PART_START // SECTOR}, size={part_size // SECTOR}, type={PART_TYPE}, bootable\n")


def sfdisk_argv(image: Path) -> list[str]:
    return ["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe", "always", str(image)]


def mkfs_vfat_argv(image: Path, part_size: int, volume_id: str, label: str = FAT_LABEL, *, epoch: int) -> list[str]:
    """FAT16 written straight into the partition of the disk image file; its times (volume label
    entry) from the clock, stopped at ``epoch``."""
    return frozen_clock_argv(epoch, [
        "mkfs.vfat", "-F", "16", "-s", "1", "-n", label, "-i", volume_id,
        "-h", str(PART_START // SECTOR), "--offset", str(PART_START // SECTOR), str(image), str(part_size // 1024)])


def mcopy_argv(image: Path, source: Path, name: str, *, epoch: int) -> list[str]:
    """mcopy dates the copy with the clock (stopped at ``epoch``), not with the source's time (no -m)."""
    return frozen_clock_argv(epoch, ["mcopy", "-i", f"{image}@@{PART_START}", "-o", str(source), f"::{name}"])


def mkimage_argv(out: Path, config: Path, grub_dir: Path = GRUB_PC_DIR) -> list[str]:
    return ["grub-mkimage", "-O", "i386-pc", "-d", str(grub_dir), "-o", str(out), "-p", usb_prefix(),
            "-c", str(config), *USB_MODULES]


def boot_sectors(boot_img: bytes, core_img: bytes) -> tuple[bytes, bytes]:
    """What goes to offset 0 (MBR boot code) and SECTOR (core image) of the disk (pure).

    boot.img reads the core image from sector 1 by default (its kernel sector field at
    0x5c), which is where the core goes; the core must fit before the partition.
    """
    if len(boot_img) != SECTOR or boot_img[510:512] != b"\x55\xaa":
        raise KairosError(f"GRUB boot.img is not a 512-byte boot sector ({len(boot_img)} bytes)")
    kernel_sector = int.from_bytes(boot_img[0x5c:0x64], "little")
    if kernel_sector != 1:
        raise KairosError(f"GRUB boot.img loads its core from sector {kernel_sector}, expected 1")
    if len(core_img) > PART_START - SECTOR:
        raise KairosError(f"GRUB core image is {len(core_img)} bytes; only {PART_START - SECTOR} fit "
                          "before the partition")
    return boot_img[:MBR_CODE_SIZE], core_img


def write_boot_code(image: Path, boot_img: bytes, core_img: bytes) -> None:
    mbr_code, core = boot_sectors(boot_img, core_img)
    with open(image, "r+b") as fh:
        fh.seek(0)
        fh.write(mbr_code)          # keeps the disk id and partition table written by sfdisk
        fh.seek(SECTOR)
        fh.write(core)


# --- running them -----------------------------------------------------------------

def build_iso(out: Path, work: Path, script: Path, lkrn: Path, title: str,
              grub_dir: Path = GRUB_PC_DIR, *, epoch: int) -> None:
    """``out``: a BIOS-bootable hybrid ISO booting iPXE with ``script``, dated at ``epoch``."""
    tree = work / "iso"
    (tree / "boot" / "grub").mkdir(parents=True)
    (tree / LKRN_NAME).write_bytes(lkrn.read_bytes())
    (tree / SCRIPT_NAME).write_bytes(script.read_bytes())
    (tree / "boot" / "grub" / "grub.cfg").write_text(iso_grub_cfg(title))
    run(mkrescue_argv(out, tree, grub_dir, epoch=epoch), what="grub-mkrescue (iPXE ISO)")


def build_usb(out: Path, work: Path, script: Path, lkrn: Path, seed: str,
              grub_dir: Path = GRUB_PC_DIR, *, epoch: int) -> None:
    """``out``: a raw disk image (MBR, FAT16 partition) booting iPXE with ``script``, dated at
    ``epoch`` (the disk and volume ids come from ``seed``)."""
    part_size, image_size = usb_sizes(lkrn.stat().st_size + script.stat().st_size)
    label_id, volume_id = disk_ids(seed)
    with open(out, "wb") as fh:
        fh.truncate(image_size)
    run(sfdisk_argv(out), feed=[sfdisk_script(part_size, label_id).encode()], what="sfdisk (iPXE USB image)")
    run(mkfs_vfat_argv(out, part_size, volume_id, epoch=epoch), what="mkfs.vfat (iPXE USB image)")
    run(mcopy_argv(out, lkrn, LKRN_NAME, epoch=epoch), what="mcopy ipxe.lkrn")
    run(mcopy_argv(out, script, SCRIPT_NAME, epoch=epoch), what="mcopy the iPXE script")
    config = work / "usb-core.cfg"
    config.write_text(usb_core_cfg())
    core = work / "core.img"
    run(mkimage_argv(core, config, grub_dir), what="grub-mkimage (iPXE USB boot loader)")
    write_boot_code(out, (grub_dir / "boot.img").read_bytes(), core.read_bytes())
