"""iso: `<stem>.iso` + `<stem>.iso.sha256` for generic devices.

Two back ends, chosen by the flavor's `builder`:
- native (default): grub-mkrescue/xorriso on the build's `-kernel`, `-initrd` and
  `.squashfs` (tasks/builders/native_iso.py). Depends on their small .sha256 files.
- auroraboot: the AuroraBoot container's build-iso on the converted image
  (tasks/builders/auroraboot.py). Depends on the image digest files.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from doit.tools import config_changed

from ..builders import auroraboot, native_iso
from ..graph import Context, action
from ..matrix import Build
from ..run import say
from ..state import Paths, atomic_path, clean_partials, partial_name, write_checksum
from ..tools import docker
from .push import ensure_image

STAGE_VERSION = 1
INPUTS = ("-kernel", "-initrd", ".squashfs")


def title(b: Build) -> str:
    """Boot menu entry of the ISO (pure)."""
    f = b.flavor
    return f"Kairos {f.flavor} {f.release} {b.variant} {b.version}"


def tools(b: Build) -> dict[str, str]:
    """Programs the iso stage needs for ``b`` (preflight checks them)."""
    if b.flavor.builder == "auroraboot":
        return {"docker": "run the AuroraBoot container (builder: auroraboot)"}
    return {
        "grub-mkrescue": "build the BIOS+EFI bootable ISO",
        "xorriso": "write the ISO image (grub-mkrescue calls it)",
        "mformat": "build the ISO's EFI system image (grub-mkrescue calls it)",
    }


def inputs(paths: Paths, b: Build) -> list[Path]:
    return [paths.artifact(b, s) for s in INPUTS]


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
    return [str(p) + ".sha256" for p in inputs(paths, b)]


def key(b: Build) -> str:
    """Everything that changes the ISO besides its input files (pure, path independent)."""
    if b.flavor.builder == "auroraboot":
        return json.dumps({"builder": "auroraboot",
                           "argv": auroraboot.iso_argv(b.flavor.auroraboot_image, b.image, Path("OUT"),
                                                       Path("CC") if b.flavor.cloud_config else None),
                           "stage": STAGE_VERSION}, sort_keys=True)
    kernel, initrd, squashfs = (Path(b.stem + s) for s in INPUTS)
    return json.dumps({"builder": "native",
                       "grub.cfg": native_iso.grub_cfg(title(b), native_iso.kernel_cmdline()),
                       "argv": native_iso.mkrescue_argv(
                           Path(b.stem + ".iso"), Path("grub.cfg"), kernel, initrd, squashfs,
                           cloud_config=Path("cloud-config.yaml") if b.flavor.cloud_config else None),
                       "stage": STAGE_VERSION}, sort_keys=True)


def build_native(paths: Paths, b: Build, out: Path) -> None:
    kernel, initrd, squashfs = inputs(paths, b)
    native_iso.check_arch(b.arch)
    work = paths.tmp_dir() / f"{b.stem}-iso"
    clean_partials(work)
    work = partial_name(work)
    try:
        with atomic_path(out) as tmp:
            native_iso.build_iso(tmp, kernel, initrd, squashfs, title(b), b.arch, work,
                                 cloud_config=b.flavor.cloud_config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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


def output(paths: Paths, b: Build) -> Path:
    return paths.artifact(b, ".iso")


def tasks(ctx: Context):
    for b in ctx.builds:
        if "iso" not in b.kinds:
            continue
        out = output(ctx.paths, b)
        source = "AuroraBoot" if b.flavor.builder == "auroraboot" else \
            "grub-mkrescue" if native_supported(b) else f"native builder: {b.arch} not supported yet"
        yield {
            "name": b.stem,
            "doc": f"{out.name} ({source}, BIOS+EFI, volume {native_iso.VOLUME_ID})",
            "actions": [action(build, ctx.paths, b, out)],
            "file_dep": file_dep(ctx.paths, b) + ([str(b.flavor.cloud_config)] if b.flavor.cloud_config else []),
            "targets": [str(out), str(out) + ".sha256"],
            "uptodate": [config_changed(key(b))],
            "clean": True,
            "verbosity": 2,
        }
