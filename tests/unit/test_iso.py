"""The iso stage and the native ISO builder: grub.cfg text, grub-mkrescue argv, task shape."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.builders import native_iso
from tasks.builders.native_iso import (check_arch, graft, grub_cfg, kernel_cmdline, mkrescue_argv)
from tasks.graph import Context
from tasks.kinds import KINDS
from tasks.run import UsageError, run
from tasks.stages import iso, preflight
from tasks.state import Paths

STEM = "kairos-ubuntu-24.04-core-amd64-generic-v3.1.0"
LIVE = ("root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs "
        "console=tty1 console=ttyS0 rd.cos.disable")


@pytest.mark.parametrize("volume, extra, expected", [
    ("COS_LIVE", (), LIVE),
    ("MY_LIVE", (), LIVE.replace("COS_LIVE", "MY_LIVE")),
    ("COS_LIVE", ("rd.debug", "quiet"), LIVE + " rd.debug quiet"),
])
def test_kernel_cmdline(volume, extra, expected):
    assert kernel_cmdline(volume, extra) == expected


def test_kernel_cmdline_arm64_uses_the_pl011_console():
    assert kernel_cmdline(arch="arm64") == LIVE.replace("console=ttyS0", "console=ttyAMA0")


def test_serial_console_is_last_so_it_is_dev_console():
    args = kernel_cmdline().split()
    consoles = [a for a in args if a.startswith("console=")]
    assert consoles[-1] == "console=ttyS0"


GRUB_CASES = [
    # title, timeout, speed -> lines that must be present, in order
    ("Kairos ubuntu 24.04 core v3.1.0", 3, 115200, [
        "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1",
        "terminal_input console serial",
        "terminal_output console serial",
        "set default=0",
        "set timeout=3",
        "menuentry 'Kairos ubuntu 24.04 core v3.1.0' --class os {",
        f"    linux /boot/kernel {LIVE}",
        "    initrd /boot/initrd",
        "}",
    ]),
    ("it's quoted", 10, 9600, [
        "serial --unit=0 --speed=9600 --word=8 --parity=no --stop=1",
        "set timeout=10",
        "menuentry 'its quoted' --class os {",
    ]),
]


@pytest.mark.parametrize("title, timeout, speed, lines", GRUB_CASES)
def test_grub_cfg(title, timeout, speed, lines):
    text = grub_cfg(title, LIVE, timeout, speed)
    got = text.splitlines()
    positions = [got.index(line) for line in lines]
    assert positions == sorted(positions)
    assert text.endswith("\n")
    # terminals are set up before the menu so the serial console shows it
    menu = next(i for i, line in enumerate(got) if line.startswith("menuentry"))
    assert got.index("terminal_output console serial") < menu


def test_grub_cfg_without_serial_for_arm64():
    """arm64 EFI firmware mirrors its console to the serial port: no grub serial terminal."""
    text = native_iso.config("t", "arm64")
    assert "serial" not in text.replace("console=ttyAMA0", "")
    assert f"    linux /boot/kernel {kernel_cmdline(arch='arm64')}" in text.splitlines()
    assert native_iso.config("t", "amd64") == grub_cfg("t", LIVE)


def test_grub_cfg_does_not_search_other_disks():
    # grub-mkrescue's embedded config already set root to the ISO by filesystem UUID
    assert "search" not in grub_cfg("t", LIVE)


@pytest.mark.parametrize("iso_path, source, expected", [
    ("/boot/kernel", "/out/v3.1.0/k-kernel", "/boot/kernel=/out/v3.1.0/k-kernel"),
    ("/rootfs.squashfs", "/a=b/x+y.squashfs", "/rootfs.squashfs=/a\\=b/x+y.squashfs"),
    ("/boot/initrd", "/we\\ird/i", "/boot/initrd=/we\\\\ird/i"),
])
def test_graft(iso_path, source, expected):
    assert graft(iso_path, source) == expected


CLOCK = ["env", "TZ=UTC", "SOURCE_DATE_EPOCH=1700000000", "faketime", "-f", "2023-11-14 22:13:20"]


@pytest.mark.parametrize("epoch, clock, date", [
    (1700000000, CLOCK, "2023111422132000"),
    (0, ["env", "TZ=UTC", "SOURCE_DATE_EPOCH=0", "faketime", "-f", "1970-01-01 00:00:00"], "1970010100000000"),
])
def test_mkrescue_argv(epoch, clock, date):
    argv = mkrescue_argv(Path("/o/.x.iso.partial-1"), Path("/t/grub.cfg"), Path("/o/s-kernel"), Path("/o/s-initrd"),
                         Path("/o/s.squashfs"), epoch=epoch)
    assert argv == [*clock, "grub-mkrescue", "--output", "/o/.x.iso.partial-1", "-volid", "COS_LIVE",
                    "--set_all_file_dates", date, "-graft-points",
                    "/boot/grub/grub.cfg=/t/grub.cfg", "/boot/kernel=/o/s-kernel", "/boot/initrd=/o/s-initrd",
                    "/rootfs.squashfs=/o/s.squashfs"]


def test_mkrescue_argv_for_one_platform_directory():
    argv = mkrescue_argv(Path("o"), Path("c"), Path("k"), Path("i"), Path("s"), modules=Path("/w/arm64-efi"),
                         epoch=1700000000)
    assert argv[:len(CLOCK) + 5] == [*CLOCK, "grub-mkrescue", "--directory", "/w/arm64-efi", "--output", "o"]


def test_mkrescue_argv_volume_id():
    argv = mkrescue_argv(Path("o"), Path("c"), Path("k"), Path("i"), Path("s"), volume_id="OTHER", epoch=0)
    assert argv[argv.index("-volid") + 1] == "OTHER"


def test_check_arch(tmp_path):
    with pytest.raises(UsageError, match=r"native ISO builder does not support riscv64 ISOs"):
        check_arch("riscv64", tmp_path)
    check_arch("arm64", tmp_path)  # the modules come from the image, not from the host


def _squashfs(tmp_path: Path, files: dict[str, bytes]) -> Path:
    root = tmp_path / "root"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    root.mkdir(exist_ok=True)
    out = tmp_path / "s.squashfs"
    run(["mksquashfs", str(root), str(out), "-noappend", "-quiet", "-no-progress"])
    return out


def test_image_grub_modules_come_out_of_the_squashfs(tmp_path):
    squashfs = _squashfs(tmp_path, {"usr/lib/grub/arm64-efi/normal.mod": b"mod", "usr/lib/grub/arm64-efi/x.lst": b"",
                                    "etc/hostname": b"h"})
    modules = native_iso.image_grub_modules(squashfs, "arm64", tmp_path / "w")
    assert modules == tmp_path / "w" / "image-grub" / "usr/lib/grub/arm64-efi"
    assert (modules / "normal.mod").read_bytes() == b"mod"
    assert not (tmp_path / "w" / "image-grub" / "etc").exists()  # only the modules are unpacked


def test_image_without_grub_modules_names_the_package(tmp_path):
    squashfs = _squashfs(tmp_path, {"etc/hostname": b"h"})
    with pytest.raises(UsageError, match=r"s\.squashfs has no grub modules in /usr/lib/grub/arm64-efi.*"
                                         r"install Debian package grub-efi-arm64-bin"):
        native_iso.image_grub_modules(squashfs, "arm64", tmp_path / "w")


@pytest.mark.parametrize("present, missing_pkg", [
    ((), "grub-pc-bin, grub-efi-amd64-bin"),
    (("i386-pc",), "grub-efi-amd64-bin"),
    (("x86_64-efi",), "grub-pc-bin"),
    (("i386-pc", "x86_64-efi"), None),
])
def test_check_arch_needs_both_grub_platforms(tmp_path, present, missing_pkg):
    for name in present:
        (tmp_path / name).mkdir()
    if missing_pkg is None:
        check_arch("amd64", tmp_path)
    else:
        with pytest.raises(UsageError, match=f"install Debian package\\(s\\) {missing_pkg}$"):
            check_arch("amd64", tmp_path)


# --- the stage ---------------------------------------------------------------------

PATHS = Paths(Path("/state"), Path("/out"))


def test_tools_by_builder(make_build):
    assert set(KINDS["iso"].tools_for(make_build())) == {"grub-mkrescue", "xorriso", "mformat", "faketime"}
    assert set(KINDS["iso"].tools_for(make_build(builder="auroraboot"))) == {"docker"}


def test_preflight_asks_for_the_iso_tools(make_build):
    need = preflight.tools_needed((make_build(artifacts=("kernel", "initrd", "squashfs", "iso")),))
    assert {"grub-mkrescue", "xorriso", "mformat"} <= set(need)
    need = preflight.tools_needed((make_build(artifacts=("kernel",)),))
    assert "grub-mkrescue" not in need


def test_file_dep_native_is_the_three_checksums(make_build):
    b = make_build()
    assert iso.file_dep(PATHS, b) == [f"/out/v3.1.0/{STEM}-kernel.sha256", f"/out/v3.1.0/{STEM}-initrd.sha256",
                                      f"/out/v3.1.0/{STEM}.squashfs.sha256"]


def test_file_dep_auroraboot_is_the_image(make_build):
    b = make_build(builder="auroraboot")
    assert iso.file_dep(PATHS, b) == [f"/state/image/{STEM}.digest", f"/state/pushed/{STEM}.digest"]


def test_key_is_path_independent_and_tracks_options(make_build):
    b = make_build()
    key = json.loads(iso.key(b))
    assert key["stage"] == iso.STAGE_VERSION
    assert key["argv"][len(CLOCK):len(CLOCK) + 3] == ["grub-mkrescue", "--output", f"{STEM}.iso"]
    assert f"/boot/kernel={STEM}-kernel" in key["argv"]
    assert LIVE in key["grub.cfg"]
    assert iso.key(make_build(release="22.04")) != iso.key(b)          # title changes
    assert iso.key(make_build(source_date_epoch=1650000000)) != iso.key(b)
    assert iso.key(make_build(builder="auroraboot")) != iso.key(b)
    assert iso.key(make_build(builder="auroraboot", auroraboot_image="quay.io/kairos/auroraboot:v0.20.0")) != \
        iso.key(make_build(builder="auroraboot"))


def test_title(make_build):
    assert iso.title(make_build("standard", "v1.28.2+k3s1")) == "Kairos ubuntu 24.04 standard v3.1.0-k3sv1.28.2+k3s1"


def test_tasks(make_build, make_flavor):
    generic = make_build(artifacts=("kernel", "initrd", "squashfs", "iso"))
    rpi = make_build(arch="arm64", device="rpi4", artifacts=("iso", "raw"))
    ctx = Context(root=Path("/r"), paths=PATHS, flavors=(generic.flavor, rpi.flavor), builds=(generic, rpi))
    tasks = list(iso.tasks(ctx, "iso"))
    assert [t["name"] for t in tasks] == [STEM]       # ISOs for generic devices only
    t = tasks[0]
    assert t["targets"] == [f"/out/v3.1.0/{STEM}.iso", f"/out/v3.1.0/{STEM}.iso.sha256"]
    assert t["file_dep"] == iso.file_dep(PATHS, generic)
    assert t["clean"] is True
    assert [type(u).__name__ for u in t["uptodate"]] == ["config_changed", "targets_unchanged"]
    assert "verbosity" not in t  # DOIT_CONFIG's verbosity 2 applies to every task
    assert "COS_LIVE" in t["doc"]


def test_native_arm64_is_an_efi_iso_of_the_image_grub(make_build):
    b = make_build(arch="arm64", artifacts=("kernel", "initrd", "squashfs", "iso"))
    assert iso.file_dep(PATHS, b) == [f"/out/v3.1.0/{b.stem}-kernel.sha256", f"/out/v3.1.0/{b.stem}-initrd.sha256",
                                      f"/out/v3.1.0/{b.stem}.squashfs.sha256"]
    ctx = Context(root=Path("/r"), paths=PATHS, flavors=(b.flavor,), builds=(b,))
    (t,) = iso.tasks(ctx, "iso")
    assert "(grub-mkrescue, EFI, volume COS_LIVE)" in t["doc"]
    key = json.loads(iso.key(b))
    assert key["argv"][len(CLOCK):len(CLOCK) + 3] == ["grub-mkrescue", "--directory", "image-grub"]
    assert "console=ttyAMA0" in key["grub.cfg"]
    assert "unsquashfs" in KINDS["iso"].tools_for(b) and "unsquashfs" not in KINDS["iso"].tools_for(make_build())
    b = make_build(arch="arm64", builder="auroraboot", artifacts=("iso",))
    assert iso.file_dep(PATHS, b) == [f"/state/image/{b.stem}.digest", f"/state/pushed/{b.stem}.digest"]


def test_native_arm64_without_inputs_fails_clearly(make_build, tmp_path):
    b = make_build(arch="arm64", artifacts=("iso",))
    paths = Paths(tmp_path / "state", tmp_path / "out")
    with pytest.raises(UsageError, match=f"ISO input .*{b.stem}-kernel is missing"):
        iso.build(paths, b, paths.artifact(b, ".iso"))
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_volume_id_is_kairos():
    assert native_iso.VOLUME_ID == "COS_LIVE"
