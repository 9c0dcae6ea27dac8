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

arm64: grub's arm64-efi modules (Debian grub-efi-arm64-bin) exist for arm64 hosts
only, so the native builder refuses arm64 ISOs with a UsageError (see check_arch).
"""
from __future__ import annotations

from pathlib import Path

from ..run import UsageError, run, say

VOLUME_ID = "COS_LIVE"
SQUASHFS_NAME = "rootfs.squashfs"
KERNEL_PATH = "/boot/kernel"
INITRD_PATH = "/boot/initrd"
GRUB_CFG_PATH = "/boot/grub/grub.cfg"
SERIAL_SPEED = 115200
MENU_TIMEOUT = 3
# grub platforms grub-mkrescue needs per arch (directories under /usr/lib/grub)
GRUB_PLATFORMS = {"amd64": ("i386-pc", "x86_64-efi")}
GRUB_LIB = Path("/usr/lib/grub")


def kernel_cmdline(volume_id: str = VOLUME_ID, extra: tuple[str, ...] = ()) -> str:
    """Kairos live-ISO kernel command line (pure). The serial console comes last so
    it is /dev/console (initramfs output goes there)."""
    args = [f"root=live:CDLABEL={volume_id}", "rd.live.dir=/", f"rd.live.squashimg={SQUASHFS_NAME}",
            "console=tty1", "console=ttyS0", "rd.cos.disable", *extra]
    return " ".join(args)


def _grub_quote(text: str) -> str:
    """A grub word in single quotes (grub cannot escape a quote inside them: drop it)."""
    return "'" + text.replace("'", "") + "'"


def grub_cfg(title: str, cmdline: str, timeout: int = MENU_TIMEOUT, serial_speed: int = SERIAL_SPEED) -> str:
    """/boot/grub/grub.cfg of the ISO (pure).

    The root device is already the ISO (grub-mkrescue's embedded config finds it
    by filesystem UUID), so no `search` that could pick another disk. Output goes
    to both the screen and the first serial port, so `qemu -serial` shows the menu.
    """
    return "\n".join([
        f"serial --unit=0 --speed={serial_speed} --word=8 --parity=no --stop=1",
        "terminal_input console serial",
        "terminal_output console serial",
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


def mkrescue_argv(out: Path, cfg: Path, kernel: Path, initrd: Path, squashfs: Path,
                  volume_id: str = VOLUME_ID, cloud_config: Path | None = None) -> list[str]:
    """grub-mkrescue command (pure). Options after the output are xorriso's
    mkisofs options; the inputs are grafted into place, not copied first."""
    extra = [graft(CLOUD_CONFIG_PATH, cloud_config)] if cloud_config is not None else []
    return [
        "grub-mkrescue", "--output", str(out),
        "-volid", volume_id,
        "-graft-points",
        graft(GRUB_CFG_PATH, cfg),
        graft(KERNEL_PATH, kernel),
        graft(INITRD_PATH, initrd),
        graft("/" + SQUASHFS_NAME, squashfs),
    ] + extra


def check_arch(arch: str, grub_lib: Path = GRUB_LIB) -> None:
    """Refuse what the native builder cannot build, before any work."""
    if arch not in GRUB_PLATFORMS:
        raise UsageError(f"the native ISO builder does not support {arch} ISOs yet (grub's arm64-efi "
                         "modules, Debian grub-efi-arm64-bin, install on arm64 hosts only); drop 'iso' from "
                         "the artifacts of arm64 generic builds or use `builder: auroraboot`")
    missing = [p for p in GRUB_PLATFORMS[arch] if not (grub_lib / p).is_dir()]
    if missing:
        pkgs = {"i386-pc": "grub-pc-bin", "x86_64-efi": "grub-efi-amd64-bin"}
        raise UsageError(f"grub modules for {', '.join(missing)} are missing under {grub_lib}, needed for a "
                         f"BIOS+EFI ISO; install Debian package(s) {', '.join(pkgs[m] for m in missing)}")


def build_iso(out: Path, kernel: Path, initrd: Path, squashfs: Path, title: str, arch: str,
              workdir: Path, cloud_config: Path | None = None) -> None:
    """Write the ISO to ``out`` (the caller renames it into place).

    ``workdir`` holds grub.cfg while grub-mkrescue runs; it is removed by the caller.
    """
    check_arch(arch)
    for path in (kernel, initrd, squashfs):
        if not Path(path).is_file():
            raise UsageError(f"ISO input {path} is missing; rebuild it (doit forget the kernel/initrd/"
                             "squashfs task of this build)")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "grub.cfg"
    cfg.write_text(grub_cfg(title, kernel_cmdline()))
    say(f"    grub-mkrescue (BIOS + EFI, volume {VOLUME_ID}) -> {Path(out).name}")
    run(mkrescue_argv(out, cfg, kernel, initrd, squashfs, cloud_config=cloud_config),
        what=f"grub-mkrescue {Path(out).name}")
