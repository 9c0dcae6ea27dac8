"""raw: the raw disk image `<stem>.img` (+ `.img.sha256`) for rpi3/rpi4 builds (and generic
amd64 builds of flavors with `raw_generic: true`: EFI system partition with a standalone GRUB).

Inputs are the extracted artifacts only: `<stem>-kernel`, `<stem>-initrd` and `<stem>.squashfs`
(the task depends on their small `.sha256` files). The Raspberry Pi firmware and the kernel's
device trees are taken out of the squashfs with unsquashfs (the builtin converter installs
raspi-firmware for rpi devices). The disk is built without loop mounts or privileges by
tasks/builders/native_raw.py, which documents the partition layout.

With `builder: auroraboot` the AuroraBoot container builds the disk from the converted image
instead (tasks/builders/auroraboot.py); that task depends on the image digest files.
"""
from __future__ import annotations

import json
from pathlib import Path


from ..builders import auroraboot, native_raw
from ..epoch import build_epoch
from ..graph import Context, action, refused_task, task
from ..matrix import Build
from ..run import run, say
from ..state import Paths, atomic_path, checksum_path, scratch_dir, write_checksum
from ..tools import docker
from .push import ensure_image

STAGE_VERSION = 2  # 2: every time stamp is the build's epoch; GRUB from grub-mkimage
RPI_DEVICES = ("rpi3", "rpi4")


def unsquashfs_list_argv(squashfs: Path) -> list[str]:
    return ["unsquashfs", "-lc", "-d", "", str(squashfs)]


def unsquashfs_extract_argv(squashfs: Path, dest: Path, list_file: Path) -> list[str]:
    return ["unsquashfs", "-f", "-no-progress", "-no-xattrs", "-d", str(dest), "-ef", str(list_file),
            str(squashfs)]


def parse_listing(text: str) -> list[str]:
    """`unsquashfs -lc -d ""` output -> paths relative to / (pure)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("/"):
            out.append(line.lstrip("/"))
    return out


def firmware_from_squashfs(squashfs: Path, device: str, dest: Path) -> tuple[list[Path], list[Path]]:
    listing = parse_listing(run(unsquashfs_list_argv(squashfs), capture=True, what="list the squashfs"))
    firmware, dtbs = native_raw.pick_firmware(listing, device)
    list_file = dest.with_name(dest.name + ".list")
    list_file.write_text("".join(f"/{p}\n" for p in firmware + dtbs))
    run(unsquashfs_extract_argv(squashfs, dest, list_file), what="extract firmware from the squashfs")
    say(f"    firmware: {', '.join(Path(p).name for p in firmware)}; device trees: "
        f"{', '.join(Path(p).name for p in dtbs)} (from /{Path(dtbs[0]).parent})")
    return [dest / p for p in firmware], [dest / p for p in dtbs]


OEM_CLOUD_CONFIG = "90_custom.yaml"  # Kairos reads cloud-configs from the OEM partition


def oem_files(b: Build) -> dict[str, Path]:
    return {OEM_CLOUD_CONFIG: b.flavor.cloud_config} if b.flavor.cloud_config else {}


def live_root(b: Build) -> bool:
    """Builtin images boot their root with dracut's live module; kairos-init images with immucore."""
    return b.flavor.converter == "builtin"


def build_raw(paths: Paths, b: Build, out: Path) -> None:
    kernel, initrd, squashfs = paths.boot_files(b)
    with scratch_dir(paths.tmp_dir(), f"{b.stem}-raw") as work:
        if b.device in RPI_DEVICES:
            firmware, dtbs = firmware_from_squashfs(squashfs, b.device, work / "rootfs")
            boot = native_raw.rpi_boot_files(work, b.device, kernel, initrd, firmware, dtbs, live_root(b))
            boot_type = "c"
        else:
            boot = native_raw.efi_boot_files(work, b.arch, kernel, initrd, live_root(b), epoch=build_epoch(b.flavor))
            boot_type = "ef"
        with atomic_path(out) as tmp:
            native_raw.build_disk(tmp, work, b.stem, boot, squashfs, boot_type, oem_files(b),
                                  epoch=build_epoch(b.flavor))
    write_checksum(out)
    say(f"    {out.name}: {out.stat().st_size} bytes")


def build_auroraboot(paths: Paths, b: Build, out: Path) -> None:
    image = ensure_image(paths, b)
    docker.tag(image, b.image)  # the tag AuroraBoot reads must be the recorded image
    auroraboot.build_raw(b.flavor.auroraboot_image, b.image, b.arch, out)  # writes out + .sha256


def problem(b: Build) -> str | None:
    """Why the raw image of ``b`` cannot be built (pure), or None."""
    if b.flavor.builder == "auroraboot":
        return None
    if b.device not in RPI_DEVICES and b.arch not in native_raw.GRUB_EFI:
        return (f"the native raw builder makes generic raw images for {', '.join(native_raw.GRUB_EFI)} only "
                f"(GRUB for {b.arch} EFI is an {b.arch}-only Debian package); {b.stem}: remove raw_generic "
                "or use the iso artifact")
    return None


def key(b: Build) -> str:
    """Every option that changes the image, for config_changed (pure)."""
    if b.flavor.builder == "auroraboot":
        return json.dumps({"builder": "auroraboot",
                           "argv": auroraboot.raw_argv(b.flavor.auroraboot_image, b.image, Path("OUT"), b.arch),
                           "stage": STAGE_VERSION}, sort_keys=True)
    return json.dumps({
        "builder": b.flavor.builder, "device": b.device, "arch": b.arch,
        "config": native_raw.config_txt(b.device) if b.device in RPI_DEVICES else native_raw.grub_cfg(live_root(b)),
        "grub": native_raw.GRUB_MODULES if b.device not in RPI_DEVICES else None,
        "cmdline": native_raw.cmdline_txt(b.device, live_root(b)), "firmware": native_raw.FIRMWARE.get(b.device),
        "dtbs": native_raw.DTBS.get(b.device), "oem": native_raw.OEM_SIZE,
        "persistent": native_raw.PERSISTENT_SIZE, "oem_files": sorted(oem_files(b)), "stage": STAGE_VERSION,
        "epoch": build_epoch(b.flavor),
    }, sort_keys=True)


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        out, = ctx.paths.outputs_of(b, kind)
        why = problem(b)
        if why:
            yield refused_task(b.stem, out.name, why)
            continue
        if b.flavor.builder == "auroraboot":
            deps = [ctx.paths.image_id(b), ctx.paths.pushed(b)]
            act, how = action(build_auroraboot, ctx.paths, b, out), "AuroraBoot"
        else:
            deps = [checksum_path(p) for p in ctx.paths.boot_files(b)] + list(oem_files(b).values())
            act = action(build_raw, ctx.paths, b, out)
            how = "MBR: " + ("firmware FAT" if b.device in RPI_DEVICES else "EFI system partition") + \
                " + Kairos partitions"
        yield task(b.stem, f"{out.name}: {b.device} raw disk image ({how})", act, file_dep=deps,
                   targets=ctx.paths.targets_of(b, kind), key=key(b))
