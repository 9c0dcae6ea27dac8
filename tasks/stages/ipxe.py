"""ipxe: netboot artifacts of a generic build.

- `<stem>.ipxe`: the iPXE script. It fetches `<netboot_url>/<stem>-kernel` and
  `<stem>-initrd` and boots the Kairos netboot command line, whose live root is
  `<netboot_url>/<stem>.squashfs`; serve outputs/<version>/ at netboot_url.
  `config_url=${config}` is an iPXE variable: set `config` before chaining the script
  (`set config http://.../cloud-config.yaml` then `chain .../<stem>.ipxe`); when unset the
  script uses `<netboot_url>/config.yaml`.
- `<stem>-ipxe.iso`, `<stem>-ipxe-usb.img`: Debian's iPXE (ipxe.lkrn) with that script,
  booted by GRUB for BIOS (tasks/builders/native_ipxe.py).

The script names the kernel, initrd and squashfs, so the task depends on their
`.sha256` files: a new kernel also rebuilds the netboot files. Each output gets
`<file>.sha256`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..builders import native_ipxe
from ..epoch import build_epoch
from ..graph import Context, action, refused_task, task
from ..matrix import Build
from ..run import say
from ..state import Paths, atomic_path, checksum_path, scratch_dir, write_checksum

STAGE_VERSION = 1
DEFAULT_CONFIG_NAME = "config.yaml"


def kernel_cmdline(url: str, stem: str) -> str:
    """The Kairos netboot kernel command line (pure); `${config}` is left to iPXE."""
    return (f"root=live:{url}/{stem}.squashfs initrd={stem}-initrd rd.neednet=1 ip=dhcp rd.cos.disable "
            "netboot install-mode config_url=${config} console=tty1 console=ttyS0 rd.live.overlay.overlayfs")


def ipxe_script(url: str, stem: str, default_config: str | None = None) -> str:
    """The iPXE script text (pure). ``url`` has no trailing slash."""
    url = url.rstrip("/")
    config = default_config or f"{url}/{DEFAULT_CONFIG_NAME}"
    return (
        "#!ipxe\n"
        f"# Kairos netboot: {stem}\n"
        f"# serve {stem}-kernel, {stem}-initrd and {stem}.squashfs at {url}/\n"
        "# the cloud config: set config <url> before chaining this script to override\n"
        "dhcp\n"
        f"isset ${{config}} || set config {config}\n"
        f"kernel {url}/{stem}-kernel {kernel_cmdline(url, stem)}\n"
        f"initrd {url}/{stem}-initrd\n"
        "boot\n"
    )


def problem(b: Build) -> str | None:
    """Why the netboot files of ``b`` cannot be built (pure), or None.

    The matrix already limits ipxe to amd64 generic builds, pulls in the kernel,
    initrd and squashfs, and config requires netboot_url."""
    if "${" in b.flavor.netboot_url:
        return (f"netboot_url {b.flavor.netboot_url!r} holds '${{', which iPXE would expand as a variable; "
                "use a URL without it")
    return None


def key(b: Build) -> str:
    """Every option that changes the outputs, for config_changed (pure)."""
    placeholder, epoch = Path("{out}"), build_epoch(b.flavor)
    return json.dumps({
        "script": ipxe_script(b.flavor.netboot_url or "", b.stem),
        "iso_cfg": native_ipxe.iso_grub_cfg(b.stem),
        "iso": native_ipxe.mkrescue_argv(placeholder, Path("{tree}"), epoch=epoch),
        "usb_cfg": native_ipxe.usb_core_cfg(),
        "usb": [native_ipxe.mkimage_argv(Path("{core}"), Path("{cfg}")),
                native_ipxe.sfdisk_script(native_ipxe.MIN_PART_SIZE, "{id}"),
                native_ipxe.mkfs_vfat_argv(placeholder, native_ipxe.MIN_PART_SIZE, "{vol}", epoch=epoch),
                native_ipxe.mcopy_argv(placeholder, Path("{src}"), "{name}", epoch=epoch)],
        "lkrn": [str(p) for p in native_ipxe.IPXE_LKRN_CANDIDATES],
        "stage": STAGE_VERSION,
    }, sort_keys=True)


def build(paths: Paths, b: Build) -> None:
    script_out, iso_out, usb_out = paths.outputs_of(b, "ipxe")
    lkrn = native_ipxe.find_ipxe_lkrn()
    native_ipxe.check_grub_pc()
    text = ipxe_script(b.flavor.netboot_url, b.stem)
    with atomic_path(script_out) as tmp:
        tmp.write_text(text)
    write_checksum(script_out)
    say(f"    {script_out.name}: kernel, initrd and squashfs from {b.flavor.netboot_url}/")
    with scratch_dir(paths.tmp_dir(), f"{b.stem}-ipxe") as work:
        say(f"    grub-mkrescue -> {iso_out.name}")
        with atomic_path(iso_out) as tmp:
            native_ipxe.build_iso(tmp, work, script_out, lkrn, f"Kairos netboot (iPXE): {b.stem}",
                                  epoch=build_epoch(b.flavor))
        write_checksum(iso_out)
        say(f"    {iso_out.name}: {iso_out.stat().st_size} bytes")
        say(f"    sfdisk + mkfs.vfat + mcopy + grub-mkimage -> {usb_out.name}")
        with atomic_path(usb_out) as tmp:
            native_ipxe.build_usb(tmp, work, script_out, lkrn, b.stem, epoch=build_epoch(b.flavor))
        write_checksum(usb_out)
        say(f"    {usb_out.name}: {usb_out.stat().st_size} bytes")


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        outs = ctx.paths.outputs_of(b, kind)
        why = problem(b)
        if why:
            yield refused_task(b.stem, f"{outs[0].name} and iPXE media", why)
            continue
        deps = [checksum_path(p) for p in ctx.paths.boot_files(b)]
        # Debian's ipxe.lkrn is small: an ipxe package upgrade rebuilds the media
        deps += [p for p in native_ipxe.IPXE_LKRN_CANDIDATES if p.is_file()][:1]
        yield task(b.stem, f"{', '.join(o.name for o in outs)}: iPXE netboot from {b.flavor.netboot_url}",
                   action(build, ctx.paths, b), file_dep=deps, targets=ctx.paths.targets_of(b, kind), key=key(b))
