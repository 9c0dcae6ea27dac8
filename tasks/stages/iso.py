"""iso: `<stem>.iso` + `<stem>.iso.sha256` for generic devices.

Two back ends, chosen by the flavor's `builder`:
- native (default): grub-mkrescue/xorriso on the build's `-kernel`, `-initrd` and
  `.squashfs` (tasks/builders/native_iso.py). Depends on their small .sha256 files. amd64
  ISOs boot on BIOS and EFI, arm64 ISOs on EFI (grub modules from the image).
- auroraboot: the AuroraBoot container's build-iso on the converted image
  (tasks/builders/auroraboot.py). Depends on the image digest files.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..builders import auroraboot, native_iso
from ..epoch import build_epoch
from ..graph import Context, action, task
from ..kinds import KINDS, boot_file_names
from ..matrix import Build
from ..run import say
from ..state import Paths, atomic_path, checksum_path, scratch_dir, write_checksum
from ..tools import docker
from .push import ensure_image

STAGE_VERSION = 1


def title(b: Build) -> str:
    """Boot menu entry of the ISO (pure)."""
    f = b.flavor
    return f"Kairos {f.flavor} {f.release} {b.variant} {b.version}"


def native_supported(b: Build) -> bool:
    return b.flavor.builder != "native" or b.arch in native_iso.GRUB_PLATFORMS


def file_dep(paths: Paths, b: Build) -> list[str]:
    """Small files whose change rebuilds the ISO (pure). An arch the native builder
    cannot serve depends on nothing, so its task fails at once instead of first
    building the whole (cross-arch) input chain."""
    if b.flavor.builder == "auroraboot":
        return [str(paths.image_id(b)), str(paths.pushed(b))]
    if not native_supported(b):
        return []
    return [str(checksum_path(p)) for p in paths.boot_files(b)]


def key(b: Build) -> str:
    """Everything that changes the ISO besides its input files (pure, path independent)."""
    if b.flavor.builder == "auroraboot":
        return json.dumps({"builder": "auroraboot",
                           "argv": auroraboot.iso_argv(b.flavor.auroraboot_image, b.image, Path("OUT"),
                                                       Path("CC") if b.flavor.cloud_config else None),
                           "stage": STAGE_VERSION}, sort_keys=True)
    kernel, initrd, squashfs = (Path(name) for name in boot_file_names(b.stem))
    modules = Path("image-grub") if b.arch in native_iso.GRUB_FROM_IMAGE else None
    return json.dumps({"builder": "native",
                       "grub.cfg": native_iso.config(title(b), b.arch),
                       "argv": native_iso.mkrescue_argv(
                           Path(KINDS["iso"].files(b.stem)[0]), Path("grub.cfg"), kernel, initrd, squashfs,
                           cloud_config=Path("cloud-config.yaml") if b.flavor.cloud_config else None,
                           modules=modules, epoch=build_epoch(b.flavor)),
                       "stage": STAGE_VERSION}, sort_keys=True)


def build_native(paths: Paths, b: Build, out: Path) -> None:
    kernel, initrd, squashfs = paths.boot_files(b)
    native_iso.check_arch(b.arch)
    with scratch_dir(paths.tmp_dir(), f"{b.stem}-iso") as work, atomic_path(out) as tmp:
        native_iso.build_iso(tmp, kernel, initrd, squashfs, title(b), b.arch, work,
                             cloud_config=b.flavor.cloud_config, epoch=build_epoch(b.flavor))
    write_checksum(out)
    say(f"    {out.name}: {out.stat().st_size} bytes")


def build_auroraboot(paths: Paths, b: Build, out: Path) -> None:
    image = ensure_image(paths, b)
    docker.tag(image, b.image)  # the tag AuroraBoot reads must be the recorded image
    auroraboot.build_iso(b.flavor.auroraboot_image, b.image, out, b.flavor.cloud_config)


def build(paths: Paths, b: Build, out: Path) -> None:
    if b.flavor.builder == "auroraboot":
        build_auroraboot(paths, b, out)
    else:
        build_native(paths, b, out)


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        out, = ctx.paths.outputs_of(b, kind)
        source = "AuroraBoot" if b.flavor.builder == "auroraboot" else \
            "grub-mkrescue" if native_supported(b) else f"native builder: {b.arch} not supported yet"
        yield task(b.stem, f"{out.name} ({source}, {native_iso.firmware(b.arch)}, volume {native_iso.VOLUME_ID})",
                   action(build, ctx.paths, b, out),
                   file_dep=file_dep(ctx.paths, b) + ([b.flavor.cloud_config] if b.flavor.cloud_config else []),
                   targets=ctx.paths.targets_of(b, kind), key=key(b))
