"""xz: the compressed raw disk image `<stem>.img.xz` (+ `.img.xz.sha256`), for flavors with
`raw_compression: xz` (the default): what releases publish and what the `-img` carrier image
holds (`build/<stem>.img.xz`, as upstream Kairos). The uncompressed `<stem>.img` stays an output.

Multi-threaded and reproducible: the same `.img` gives the same `.img.xz` bytes on any machine
with the same xz. xz's single-threaded mode (`-T1`, or xz 5.2 on one core) writes other bytes
than its multi-threaded mode, and the multi-threaded mode's blocks follow the block size, not the
number of threads; so the argv pins the multi-threaded mode on all cores (`--threads=0`, which
xz >= 5.4 keeps even on one core), a fixed `--block-size` (xz -6's own default, 3 x the 8 MiB
dictionary, whatever the preset), the preset (the flavor's `raw_xz_level`, 6 unless set) and
the check, and `--no-adjust` stops xz from leaving the multi-threaded mode to meet its memory
limit (it may only run fewer threads, which changes nothing in the output). xz writes no names or times into the file.

Before the file gets its final name, `xz --test` decompresses it and checks every block's CRC64.
The task depends on the small `<stem>.img.sha256` only.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..graph import Context, action, task
from ..matrix import Build
from ..run import run, say
from ..state import Paths, atomic_path, checksum_path, write_checksum

STAGE_VERSION = 1
BLOCK_SIZE = "24MiB"      # fixed: the multi-threaded output depends on it (xz -6 default: 3 x 8 MiB dictionary)


def compress_argv(src: Path, level: int) -> list[str]:
    """`xz` at preset ``level`` writing the .xz of ``src`` to its standard output (pure)."""
    return ["xz", "--compress", "--stdout", "--format=xz", "--check=crc64", f"-{level}", f"--block-size={BLOCK_SIZE}",
            "--threads=0", "--no-adjust", "--", str(src)]


def check_argv(path: Path) -> list[str]:
    """`xz --test`: decompress ``path`` (multi-threaded) and check its integrity, writing nothing (pure)."""
    return ["xz", "--test", "--threads=0", "--", str(path)]


def check(path: Path) -> None:
    """Raise CommandError unless ``path`` is an intact .xz file."""
    run(check_argv(path), what=f"check {Path(path).name} (xz --test)")


def compress(paths: Paths, b: Build) -> None:
    img, = paths.outputs_of(b, "raw")
    out, = paths.outputs_of(b, "xz")
    level = b.flavor.raw_xz_level
    say(f"    {img.name} -> {out.name} (xz -{level}, {BLOCK_SIZE} blocks, all cores)")
    with atomic_path(out) as tmp:
        run(compress_argv(img, level), stdout=tmp, what=f"xz {img.name}")
        check(tmp)  # before the final name: a broken file is never published
    write_checksum(out)
    size, packed = img.stat().st_size, out.stat().st_size
    say(f"    {out.name}: {packed} bytes ({packed / size:.1%} of {size})")


def key(b: Build) -> str:
    """Everything that changes the compressed bytes (pure)."""
    argv = compress_argv(Path("IMG"), b.flavor.raw_xz_level)
    return json.dumps({"argv": argv, "stage": STAGE_VERSION}, sort_keys=True)


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        img, = ctx.paths.outputs_of(b, "raw")
        out, = ctx.paths.outputs_of(b, kind)
        level = b.flavor.raw_xz_level
        yield task(b.stem, f"{out.name}: xz -{level} of {img.name} ({BLOCK_SIZE} blocks, all cores, xz --test)",
                   action(compress, ctx.paths, b), file_dep=[checksum_path(img)],
                   targets=ctx.paths.targets_of(b, kind), key=key(b))
