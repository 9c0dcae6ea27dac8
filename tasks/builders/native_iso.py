"""Native ISO builder: kernel + initrd + squashfs -> a hybrid BIOS/EFI live ISO.

Debian packages only: grub-mkrescue (grub-common, grub-pc-bin, grub-efi-amd64-bin)
writes the El Torito BIOS image and the EFI system image (built with mtools'
mformat/mcopy) and calls xorriso, which grafts our files into the ISO without
copying them into a staging directory first. The layout follows Kairos ISOs:

    /rootfs.squashfs        the root filesystem
    /boot/kernel            the kernel
    /boot/initrd            the initrd
    /boot/grub/grub.cfg     the menu (serial console enabled)
    /boot/grub/i386-pc/, /boot/grub/x86_64-efi/, /efi.img ...  written by grub-mkrescue

with volume id COS_LIVE and the Kairos live kernel command line
(`root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs ...`).
The same inputs and SOURCE_DATE_EPOCH give the same ISO bytes (see `mkrescue_argv`).

arm64 ISOs are EFI only (`arm64-efi`). Debian ships grub's arm64-efi modules in an arm64
package (grub-efi-arm64-bin) that does not install on an amd64 host, but the host's
grub-mkrescue builds for any platform from a module directory: the modules are read from
the build's own squashfs (`usr/lib/grub/arm64-efi`; the builtin converter installs
grub-efi-arm64-bin into arm64 generic images), so the boot loader matches the image's grub.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..epoch import epoch_env, frozen_clock_argv
from ..run import UsageError, run, say
from ..tools.qemu import SERIAL

VOLUME_ID = "COS_LIVE"
SQUASHFS_NAME = "rootfs.squashfs"
KERNEL_PATH = "/boot/kernel"
INITRD_PATH = "/boot/initrd"
GRUB_CFG_PATH = "/boot/grub/grub.cfg"
SERIAL_SPEED = 115200
MENU_TIMEOUT = 3
# grub platforms grub-mkrescue needs per arch (directories under /usr/lib/grub)
GRUB_PLATFORMS = {"amd64": ("i386-pc", "x86_64-efi"), "arm64": ("arm64-efi",)}
GRUB_LIB = Path("/usr/lib/grub")
# arches whose grub modules come from the image itself: arch -> the Debian package holding them
GRUB_FROM_IMAGE = {"arm64": "grub-efi-arm64-bin"}


def kernel_cmdline(volume_id: str = VOLUME_ID, extra: tuple[str, ...] = (), arch: str = "amd64") -> str:
    """Kairos live-ISO kernel command line (pure). The serial console comes last so
    it is /dev/console (initramfs output goes there)."""
    args = [f"root=live:CDLABEL={volume_id}", "rd.live.dir=/", f"rd.live.squashimg={SQUASHFS_NAME}",
            "console=tty1", f"console={SERIAL[arch]}", "rd.cos.disable", *extra]
    return " ".join(args)


def _grub_quote(text: str) -> str:
    """A grub word in single quotes (grub cannot escape a quote inside them: drop it)."""
    return "'" + text.replace("'", "") + "'"


def grub_cfg(title: str, cmdline: str, timeout: int = MENU_TIMEOUT, serial_speed: int = SERIAL_SPEED,
             serial: bool = True) -> str:
    """/boot/grub/grub.cfg of the ISO (pure).

    The root device is already the ISO (grub-mkrescue's embedded config finds it
    by filesystem UUID), so no `search` that could pick another disk. With ``serial``
    (PCs) output goes to both the screen and the first serial port, so `qemu -serial`
    shows the menu; arm64 EFI firmware already mirrors its console to the serial port.
    """
    terminal = [
        f"serial --unit=0 --speed={serial_speed} --word=8 --parity=no --stop=1",
        "terminal_input console serial",
        "terminal_output console serial",
    ] if serial else []
    return "\n".join([
        *terminal,
        "set default=0",
        f"set timeout={timeout}",
        "set timeout_style=menu",
        "",
        f"menuentry {_grub_quote(title)} --class os {{",
        "    echo 'Loading kernel...'",
        f"    linux {KERNEL_PATH} {cmdline}",
        "    echo 'Loading initrd...'",
        f"    initrd {INITRD_PATH}",
        "}",
        "",
    ])


def graft(iso_path: str, source: Path | str) -> str:
    """An xorriso -graft-points pathspec `iso_path=source`, '\\' and '=' escaped (pure)."""
    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("=", "\\=")
    return f"{esc(iso_path)}={esc(str(source))}"


CLOUD_CONFIG_PATH = "/config.yaml"  # where Kairos installers look for a cloud-config on the ISO


def iso_date(epoch: int) -> str:
    """``epoch`` as xorrisofs's 16-digit time string YYYYMMDDhhmmsscc (UTC, pure)."""
    return time.strftime("%Y%m%d%H%M%S00", time.gmtime(epoch))


def mkrescue_argv(out: Path, cfg: Path, kernel: Path, initrd: Path, squashfs: Path,
                  volume_id: str = VOLUME_ID, cloud_config: Path | None = None,
                  modules: Path | None = None, *, epoch: int) -> list[str]:
    """grub-mkrescue command (pure). Options after the output are xorriso's
    mkisofs options; the inputs are grafted into place, not copied first. ``modules``:
    one grub platform directory to build for (else every platform installed on the host).

    Dated at ``epoch``, so the same inputs give the same ISO bytes:
    - grub-mkrescue 2.06 takes the ISO's volume date and UUID from the clock (its
      `--modification-date=`, which its boot images' `search --fs-uuid` also holds, so it cannot
      be overridden afterwards) and builds the EFI image with mformat/mcopy at the current time:
      it runs under faketime with the clock stopped at ``epoch``;
    - SOURCE_DATE_EPOCH makes xorriso 1.5.4 derive the GPT disk GUID from that date and use the
      epoch for nodes without a source file;
    - `--set_all_file_dates` dates every file of the ISO at ``epoch``: the grafted kernel, initrd
      and squashfs are this build's outputs (dated when written) and grub.cfg is written just
      before, so no file time in the ISO carries information; xorriso cannot clamp.
    """
    extra = [graft(CLOUD_CONFIG_PATH, cloud_config)] if cloud_config is not None else []
    platform = ["--directory", str(modules)] if modules is not None else []
    return frozen_clock_argv(epoch, [
        "grub-mkrescue", *platform, "--output", str(out),
        "-volid", volume_id,
        "--set_all_file_dates", iso_date(epoch),
        "-graft-points",
        graft(GRUB_CFG_PATH, cfg),
        graft(KERNEL_PATH, kernel),
        graft(INITRD_PATH, initrd),
        graft("/" + SQUASHFS_NAME, squashfs),
    ] + extra, epoch_env(epoch))


def check_arch(arch: str, grub_lib: Path = GRUB_LIB) -> None:
    """Refuse what the native builder cannot build, before any work."""
    if arch not in GRUB_PLATFORMS:
        raise UsageError(f"the native ISO builder does not support {arch} ISOs; drop 'iso' from the "
                         f"artifacts of {arch} builds or use `builder: auroraboot`")
    if arch in GRUB_FROM_IMAGE:
        return  # the modules come from the image (image_grub_modules)
    missing = [p for p in GRUB_PLATFORMS[arch] if not (grub_lib / p).is_dir()]
    if missing:
        pkgs = {"i386-pc": "grub-pc-bin", "x86_64-efi": "grub-efi-amd64-bin"}
        raise UsageError(f"grub modules for {', '.join(missing)} are missing under {grub_lib}, needed for a "
                         f"BIOS+EFI ISO; install Debian package(s) {', '.join(pkgs[m] for m in missing)}")


def config(title: str, arch: str) -> str:
    """The ISO's grub.cfg for ``arch`` (pure)."""
    return grub_cfg(title, kernel_cmdline(arch=arch), serial=arch not in GRUB_FROM_IMAGE)


def firmware(arch: str) -> str:
    """What the ISO of ``arch`` boots on (pure), for messages and task lists."""
    return "EFI" if arch in GRUB_FROM_IMAGE else "BIOS + EFI"


def image_grub_modules(squashfs: Path, arch: str, workdir: Path) -> Path:
    """The grub platform directory of ``arch`` taken out of the image's ``squashfs``."""
    platform, = GRUB_PLATFORMS[arch]
    inner = f"usr/lib/grub/{platform}"
    dest = workdir / "image-grub"
    workdir.mkdir(parents=True, exist_ok=True)
    run(["unsquashfs", "-no-progress", "-quiet", "-n", "-d", str(dest), str(squashfs), inner],
        capture=True, what=f"read {inner} from {Path(squashfs).name}")
    modules = dest / inner
    if not (modules / "normal.mod").is_file():
        raise UsageError(f"{Path(squashfs).name} has no grub modules in /{inner}, needed for an {arch} ISO: "
                         f"install Debian package {GRUB_FROM_IMAGE[arch]} in the image (the builtin converter "
                         f"does for {arch} generic builds; with kairos-init add it through the overlay or the base)")
    return modules


def build_iso(out: Path, kernel: Path, initrd: Path, squashfs: Path, title: str, arch: str,
              workdir: Path, cloud_config: Path | None = None, *, epoch: int) -> None:
    """Write the ISO to ``out`` (the caller renames it into place), dated at ``epoch``.

    ``workdir`` holds grub.cfg (and an arch's image grub modules) while grub-mkrescue runs;
    it is removed by the caller.
    """
    check_arch(arch)
    for path in (kernel, initrd, squashfs):
        if not Path(path).is_file():
            raise UsageError(f"ISO input {path} is missing; rebuild it (doit forget the kernel/initrd/"
                             "squashfs task of this build)")
    workdir.mkdir(parents=True, exist_ok=True)
    modules = image_grub_modules(squashfs, arch, workdir) if arch in GRUB_FROM_IMAGE else None
    cfg = workdir / "grub.cfg"
    cfg.write_text(config(title, arch))
    say(f"    grub-mkrescue ({firmware(arch)}, volume {VOLUME_ID}) -> {Path(out).name}")
    run(mkrescue_argv(out, cfg, kernel, initrd, squashfs, cloud_config=cloud_config, modules=modules, epoch=epoch),
        what=f"grub-mkrescue {Path(out).name}")
