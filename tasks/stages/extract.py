"""kernel, initrd, squashfs: files taken out of the converted image.

- `<stem>-kernel` / `<stem>-initrd`: from the image's /boot (Kairos layout
  /boot/vmlinuz and /boot/initrd first, then versioned names), symlinks followed;
- `<stem>.squashfs`: the image's root filesystem (docker export -> tar -> mksquashfs), dated at
  the build's SOURCE_DATE_EPOCH (tasks/epoch.py): the same image gives the same bytes.
Each also writes `<file>.sha256`. Outputs are renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import re
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path

from ..epoch import build_epoch, epoch_env
from ..model import SquashfsOptions
from ..graph import Context, action, task
from ..matrix import Build
from ..run import KairosError, run, say
from ..state import Paths, atomic_path, clean_partials, partial_name, write_checksum
from ..tools import docker
from .push import ensure_image

KERNEL_NAMES = ("vmlinuz", "kernel", "Image", "bzImage")
KERNEL_GLOBS = (r"vmlinuz-.+", r"Image-.+", r"vmlinux-.+", r"kernel-.+")
INITRD_NAMES = ("initrd", "initrd.img", "initramfs.img", "initramfs")
INITRD_GLOBS = (r"initrd\.img-.+", r"initramfs-.+\.img", r"initrd-.+", r"initramfs-.+")


def _version_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def pick_boot_file(entries: dict[str, tuple[str, str]], kind: str) -> str | None:
    """Choose the kernel or initrd among /boot entries (pure).

    ``entries`` maps a name relative to /boot to (type, link target) with type
    "file", "link" or "dir". Returns the resolved regular file name or None.
    """
    names, globs = (KERNEL_NAMES, KERNEL_GLOBS) if kind == "kernel" else (INITRD_NAMES, INITRD_GLOBS)
    candidates = [n for n in names if n in entries]
    for pattern in globs:
        matched = sorted((n for n in entries if re.fullmatch(pattern, n) and "/" not in n),
                         key=_version_key, reverse=True)
        candidates += [m for m in matched if m not in candidates]
    for name in candidates:
        resolved = _resolve(entries, name)
        if resolved is not None and not (kind == "kernel" and resolved.startswith("initrd")):
            return resolved
    return None


def _resolve(entries: dict[str, tuple[str, str]], name: str) -> str | None:
    for _ in range(10):
        kind, target = entries.get(name, ("missing", ""))
        if kind == "file":
            return name
        if kind != "link":
            return None
        if target.startswith("/"):
            target = target[len("/boot/"):] if target.startswith("/boot/") else "\0"
        else:
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        name = target
    return None


def _boot_entries(tar: tarfile.TarFile) -> dict[str, tuple[str, str]]:
    entries = {}
    for m in tar.getmembers():
        parts = m.name.split("/", 1)
        if len(parts) != 2 or parts[0] != "boot" or not parts[1]:
            continue
        kind = "file" if m.isfile() else "link" if m.issym() else "dir" if m.isdir() else "other"
        entries[parts[1]] = (kind, m.linkname)
    return entries


def state_tag(paths: Paths) -> str:
    """A short id of the state directory: the last field of its extraction containers' labels."""
    return hashlib.sha256(str(paths.state).encode()).hexdigest()[:12]


def container_owner(paths: Paths, b: Build, purpose: str) -> str:
    """Label value of the extraction containers of one build and purpose in one state dir."""
    return f"{purpose}:{b.stem}:{state_tag(paths)}"


def extract_boot_file(paths: Paths, b: Build, kind: str, out: Path) -> None:
    image = ensure_image(paths, b)
    container = docker.extract_container(image, container_owner(paths, b, kind))
    # per kind: kernel and initrd may run at once (-n 2); what a killed attempt left here goes when
    # the next run takes the state lock (state.clean_scratch)
    tmp_tar = partial_name(paths.tmp_dir() / f"{b.stem}-{kind}-boot.tar")
    tmp_tar.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            stream, _ = container.get_archive("/boot")
        except Exception as exc:  # noqa: BLE001 - docker.errors.NotFound and friends
            raise KairosError(f"image {b.image} has no /boot: {exc}") from None
        with open(tmp_tar, "wb") as fh:
            for chunk in stream:
                fh.write(chunk)
        with tarfile.open(tmp_tar) as tar:
            entries = _boot_entries(tar)
            name = pick_boot_file(entries, kind)
            if name is None:
                wanted = ", ".join((KERNEL_NAMES if kind == "kernel" else INITRD_NAMES)[:3])
                listing = ", ".join(sorted(entries)) or "nothing"
                raise KairosError(f"no {kind} in /boot of {b.image} (looked for {wanted} and versioned "
                                  f"names; /boot holds: {listing})")
            member = tar.getmember(f"boot/{name}")
            with atomic_path(out) as tmp, tar.extractfile(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        say(f"    {kind}: /boot/{name} -> {out.name} ({out.stat().st_size} bytes)")
        write_checksum(out)
    finally:
        tmp_tar.unlink(missing_ok=True)
        container.remove(force=True)


def mksquashfs_argv(source: Path, out: Path, opts: SquashfsOptions, arch: str) -> list[str]:
    """mksquashfs command (pure): Kairos ISOs use a 1024k block size. `-reproducible` (4.5.1's
    default, said anyway) keeps the output order independent of the compressor threads; the
    times come from SOURCE_DATE_EPOCH in the environment, see `mksquashfs_env`."""
    argv = ["mksquashfs", str(source), str(out), "-noappend", "-no-xattrs", "-reproducible",
            "-comp", opts.compression, "-b", opts.block_size]
    if opts.compression == "xz" and arch == "amd64":
        argv += ["-Xbcj", "x86"]
    return argv


def mksquashfs_env(epoch: int) -> dict[str, str]:
    """mksquashfs's environment (pure): SOURCE_DATE_EPOCH. mksquashfs 4.5.1 then writes the epoch
    as the file system's creation time and clamps every file time newer than it to it, so two
    exports of one image (unpacked at different times) give the same bytes while older times
    (the image's own) stay. `-mkfs-time`/`-all-time` cannot clamp (-all-time flattens every
    time) and mksquashfs refuses them together with SOURCE_DATE_EPOCH, so they are not used."""
    return epoch_env(epoch)


def make_squashfs(source: Path, out: Path, opts: SquashfsOptions, arch: str, epoch: int) -> None:
    """The squashfs of the tree ``source`` at ``out``, dated ``epoch`` (same tree, same bytes)."""
    run(mksquashfs_argv(source, out, opts, arch), env=mksquashfs_env(epoch), what=f"mksquashfs {out.name}")


def squashfs_key(b: Build) -> str:
    """Everything besides the image that changes the squashfs, for config_changed (pure)."""
    return json.dumps({"argv": mksquashfs_argv(Path("ROOT"), Path("OUT"), b.flavor.squashfs, b.arch),
                       "env": mksquashfs_env(build_epoch(b.flavor))}, sort_keys=True)


@contextmanager
def exported_rootfs(paths: Paths, b: Build, purpose: str):
    """The root file system of ``b``'s image unpacked into a scratch directory (docker export |
    tar, owners and modes kept), removed afterwards."""
    image = ensure_image(paths, b)
    base = paths.tmp_dir() / f"{b.stem}-{purpose}-rootfs"
    rootfs = partial_name(base)
    clean_partials(base)
    rootfs.mkdir(parents=True)
    container = docker.extract_container(image, container_owner(paths, b, purpose))
    try:
        say(f"    exporting the root filesystem of {b.image}")
        run(["tar", "-x", "--numeric-owner", "-p", "-C", str(rootfs), "-f", "-"],
            feed=container.export(chunk_size=1 << 20), what=f"unpack {b.image}")
        (rootfs / ".dockerenv").unlink(missing_ok=True)
        yield rootfs
    finally:  # a killed run leaves the container; the next extract_container of this owner removes it
        container.remove(force=True)
        shutil.rmtree(rootfs, ignore_errors=True)


def squashfs(paths: Paths, b: Build, out: Path) -> None:
    with exported_rootfs(paths, b, "squashfs") as rootfs:
        say(f"    mksquashfs ({b.flavor.squashfs.compression}) -> {out.name}")
        with atomic_path(out) as tmp:
            make_squashfs(rootfs, tmp, b.flavor.squashfs, b.arch, build_epoch(b.flavor))
        write_checksum(out)
        say(f"    {out.name}: {out.stat().st_size} bytes")


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        out, = ctx.paths.outputs_of(b, kind)
        act = action(squashfs, ctx.paths, b, out) if kind == "squashfs" else \
            action(extract_boot_file, ctx.paths, b, kind, out)
        yield task(b.stem, f"{out.name} from {b.image}", act,
                   file_dep=[ctx.paths.image_id(b), ctx.paths.pushed(b)], targets=ctx.paths.targets_of(b, kind),
                   key=squashfs_key(b) if kind == "squashfs" else None)
