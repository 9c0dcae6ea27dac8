"""ipxe stage and native iPXE builder: script text, grub configs, sizes, argv (pure tables)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.builders import native_ipxe as nx
from tasks.graph import Context
from tasks.run import KairosError, UsageError
from tasks.stages import ipxe
from tasks.state import Paths

URL = "http://10.0.2.2:8080"
STEM = "kairos-debian-12-core-amd64-generic-v3.1.0"
K3S_STEM = "kairos-ubuntu-24.04-standard-amd64-generic-v3.1.0-k3sv1.28.2+k3s1"
ANCHOR_CMDLINE = ("root=live:{url}/{stem}.squashfs initrd={stem}-initrd rd.neednet=1 ip=dhcp rd.cos.disable "
                  "netboot install-mode config_url=${{config}} console=tty1 console=ttyS0 "
                  "rd.live.overlay.overlayfs")

# --- the script -------------------------------------------------------------------


def test_script_exact_text():
    assert ipxe.ipxe_script(URL, STEM) == (
        "#!ipxe\n"
        f"# Kairos netboot: {STEM}\n"
        f"# serve {STEM}-kernel, {STEM}-initrd and {STEM}.squashfs at {URL}/\n"
        "# the cloud config: set config <url> before chaining this script to override\n"
        "dhcp\n"
        f"isset ${{config}} || set config {URL}/config.yaml\n"
        f"kernel {URL}/{STEM}-kernel root=live:{URL}/{STEM}.squashfs initrd={STEM}-initrd rd.neednet=1 "
        "ip=dhcp rd.cos.disable netboot install-mode config_url=${config} console=tty1 console=ttyS0 "
        "rd.live.overlay.overlayfs\n"
        f"initrd {URL}/{STEM}-initrd\n"
        "boot\n"
    )


SCRIPT_CASES = [
    # url, stem, default config -> expected kernel URL, squashfs URL, config default
    (URL, STEM, None, f"{URL}/{STEM}-kernel", f"{URL}/{STEM}.squashfs", f"{URL}/config.yaml"),
    ("https://boot.example.com/kairos/v3", K3S_STEM, None, f"https://boot.example.com/kairos/v3/{K3S_STEM}-kernel",
     f"https://boot.example.com/kairos/v3/{K3S_STEM}.squashfs", "https://boot.example.com/kairos/v3/config.yaml"),
    ("https://boot.example.com/", STEM, "http://cfg/x.yaml", f"https://boot.example.com/{STEM}-kernel",
     f"https://boot.example.com/{STEM}.squashfs", "http://cfg/x.yaml"),
]


@pytest.mark.parametrize("url,stem,default,kernel_url,squashfs_url,config", SCRIPT_CASES)
def test_script_table(url, stem, default, kernel_url, squashfs_url, config):
    text = ipxe.ipxe_script(url, stem, default)
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert text.startswith("#!ipxe\n")
    base = url.rstrip("/")
    # order matters: network first, default the variable, then kernel, initrd, boot
    assert lines == ["dhcp", f"isset ${{config}} || set config {config}",
                     f"kernel {kernel_url} {ANCHOR_CMDLINE.format(url=base, stem=stem)}",
                     f"initrd {base}/{stem}-initrd", "boot"]
    assert f"root=live:{squashfs_url} " in text
    assert "//" not in text.replace("://", "")  # no doubled slashes from a trailing one


def test_cmdline_keeps_config_as_ipxe_variable():
    line = ipxe.kernel_cmdline(URL, STEM)
    assert "config_url=${config}" in line and line.count("${") == 1
    assert line.split() == ANCHOR_CMDLINE.format(url=URL, stem=STEM).split()


# --- stage rules ------------------------------------------------------------------

PROBLEM_CASES = [
    # flavor fields, arch -> message fragment or None
    (dict(artifacts=("ipxe", "kernel", "initrd", "squashfs"), netboot_url=URL), "amd64", None),
    (dict(artifacts=("ipxe",), netboot_url=URL), "amd64", None),  # kernel, initrd, squashfs are implied
    (dict(artifacts=("ipxe", "kernel", "initrd", "squashfs"), netboot_url="http://h/${x}"), "amd64",
     "iPXE would expand"),
]


@pytest.mark.parametrize("fields,arch,fragment", PROBLEM_CASES)
def test_problem_table(make_build, fields, arch, fragment):
    why = ipxe.problem(make_build(arch=arch, **fields))
    if fragment is None:
        assert why is None
    else:
        assert fragment in why


def test_key_changes_with_url_and_stem(make_build):
    arts = ("ipxe", "kernel", "initrd", "squashfs")
    a = ipxe.key(make_build(artifacts=arts, netboot_url=URL))
    assert a == ipxe.key(make_build(artifacts=arts, netboot_url=URL))
    assert a != ipxe.key(make_build(artifacts=arts, netboot_url=URL + "/other"))
    assert a != ipxe.key(make_build(artifacts=arts, netboot_url=URL, version="v3.2.0"))
    parsed = json.loads(a)
    assert parsed["stage"] == ipxe.STAGE_VERSION and "dhcp" in parsed["script"]


def test_tools_are_programs_with_known_providers(make_build):
    from tasks.kinds import KINDS, PROGRAMS
    need = KINDS["ipxe"].tools_for(make_build(artifacts=("ipxe",), netboot_url=URL))
    assert set(need) == {"grub-mkrescue", "xorriso", "grub-mkimage", "sfdisk", "mkfs.vfat", "mcopy", "ipxe.lkrn",
                         "faketime"}
    assert all(purpose for purpose in need.values())
    assert set(need) <= set(PROGRAMS)


def test_tasks_shape(make_build, tmp_path):
    arts = ("kernel", "initrd", "squashfs", "ipxe")
    good = make_build(artifacts=arts, netboot_url=URL)
    bad = make_build(artifacts=("ipxe", "kernel"), netboot_url="http://h/${x}", flavor="other")
    none = make_build(artifacts=("kernel",), flavor="third")
    paths = Paths(tmp_path / "state", tmp_path / "out")
    ctx = Context(root=tmp_path, paths=paths, flavors=(good.flavor, bad.flavor), builds=(good, bad, none))
    tasks = {t["name"]: t for t in ipxe.tasks(ctx, "ipxe")}
    assert set(tasks) == {good.stem, bad.stem}
    t = tasks[good.stem]
    out = tmp_path / "out" / "v3.1.0"
    assert t["targets"] == [str(out / f"{good.stem}{s}") for s in (".ipxe", "-ipxe.iso", "-ipxe-usb.img")] + \
        [str(out / f"{good.stem}{s}.sha256") for s in (".ipxe", "-ipxe.iso", "-ipxe-usb.img")]
    deps = t["file_dep"]
    assert deps[:3] == [str(out / f"{good.stem}{s}.sha256") for s in ("-kernel", "-initrd", ".squashfs")]
    assert all(Path(d).stat().st_size < 1 << 20 for d in deps[3:])  # only small files (ipxe.lkrn)
    assert t["clean"] is True and t["uptodate"]
    assert "targets" not in tasks[bad.stem]
    with pytest.raises(UsageError, match="iPXE would expand"):
        fn, args = tasks[bad.stem]["actions"][0]
        args[0](*args[1])


# --- native builder: ISO ----------------------------------------------------------

def test_iso_grub_cfg():
    cfg = nx.iso_grub_cfg("Kairos netboot (iPXE): a'b")
    assert "set timeout=0\n" in cfg
    assert "menuentry 'Kairos netboot (iPXE): a'\\''b' {\n" in cfg
    assert "    linux16 /ipxe.lkrn\n    initrd16 /kairos.ipxe\n}\n" in cfg
    assert cfg.startswith("serial --unit=0\n")


FROZEN = ["env", "TZ=UTC", "faketime", "-f", "2023-11-14 22:13:20"]  # the clock stopped at 1700000000


def test_mkrescue_argv():
    assert nx.mkrescue_argv(Path("/o/x.iso"), Path("/w/iso"), epoch=1700000000) == [
        "env", "TZ=UTC", "SOURCE_DATE_EPOCH=1700000000", "faketime", "-f", "2023-11-14 22:13:20",
        "grub-mkrescue", "-d", "/usr/lib/grub/i386-pc", "--install-modules=normal linux16 serial terminal echo",
        "--fonts=", "--locales=", "--themes=", "-o", "/o/x.iso", "--set_all_file_dates", "2023111422132000",
        "/w/iso"]


# --- native builder: USB image ----------------------------------------------------

MIB = 1 << 20
SIZE_CASES = [
    # payload bytes -> (partition, image)
    (0, (7 * MIB, 8 * MIB)),
    (306_521 + 600, (7 * MIB, 8 * MIB)),
    (3 * MIB, (7 * MIB, 8 * MIB)),
    (3 * MIB + 1, (8 * MIB, 9 * MIB)),
    (20 * MIB, (24 * MIB, 25 * MIB)),
]


@pytest.mark.parametrize("payload,expected", SIZE_CASES)
def test_usb_sizes(payload, expected):
    assert nx.usb_sizes(payload) == expected
    part, image = nx.usb_sizes(payload)
    assert part % MIB == 0 and part - payload >= nx.PART_SLACK - MIB


def test_disk_ids_are_stable_and_differ():
    a, b = nx.disk_ids("x"), nx.disk_ids("y")
    assert a == nx.disk_ids("x") and a != b
    assert a[0].startswith("0x") and len(a[0]) == 10 and len(a[1]) == 8
    int(a[0], 16), int(a[1], 16)


def test_sfdisk_script_and_argv():
    assert nx.sfdisk_script(7 * MIB, "0x12345678") == (
        "label: dos\nlabel-id: 0x12345678\nunit: sectors\n\nstart=2048, size=14336, type=e, bootable\n")
    assert nx.sfdisk_argv(Path("/w/u.img")) == ["sfdisk", "--no-reread", "--no-tell-kernel", "--wipe", "always",
                                                "/w/u.img"]


def test_mkfs_vfat_mcopy_mkimage_argv():
    assert nx.mkfs_vfat_argv(Path("/w/u.img"), 7 * MIB, "ABCD1234", epoch=1700000000) == FROZEN + [
        "mkfs.vfat", "-F", "16", "-s", "1", "-n", "KAIROSIPXE", "-i", "ABCD1234", "-h", "2048",
        "--offset", "2048", "/w/u.img", "7168"]
    assert nx.mcopy_argv(Path("/w/u.img"), Path("/x/s.ipxe"), "kairos.ipxe", epoch=1700000000) == FROZEN + [
        "mcopy", "-i", "/w/u.img@@1048576", "-o", "/x/s.ipxe", "::kairos.ipxe"]
    assert nx.mkimage_argv(Path("/w/core.img"), Path("/w/c.cfg")) == [
        "grub-mkimage", "-O", "i386-pc", "-d", "/usr/lib/grub/i386-pc", "-o", "/w/core.img", "-p", "(,msdos1)/",
        "-c", "/w/c.cfg", "biosdisk", "part_msdos", "fat", "linux16", "boot"]


def test_usb_core_cfg_uses_plain_commands_only():
    # the early config runs in GRUB's rescue parser: no menuentry, no blocks
    assert nx.usb_core_cfg() == "linux16 /ipxe.lkrn\ninitrd16 /kairos.ipxe\nboot\n"


def _boot_img(kernel_sector: int = 1) -> bytes:
    img = bytearray(512)
    img[0x5c:0x64] = kernel_sector.to_bytes(8, "little")
    img[510:512] = b"\x55\xaa"
    return bytes(img)


BOOT_CASES = [
    # boot.img, core size -> error fragment or None
    (_boot_img(), 100_000, None),
    (_boot_img(), nx.PART_START - 512, None),
    (_boot_img(), nx.PART_START - 511, "fit before the partition"),
    (_boot_img(2), 1000, "expected 1"),
    (_boot_img()[:510] + b"\0\0", 1000, "not a 512-byte boot sector"),
    (_boot_img()[:400], 1000, "not a 512-byte boot sector"),
]


@pytest.mark.parametrize("boot,core_size,fragment", BOOT_CASES)
def test_boot_sectors(boot, core_size, fragment):
    core = b"c" * core_size
    if fragment:
        with pytest.raises(KairosError, match=fragment):
            nx.boot_sectors(boot, core)
    else:
        mbr, out_core = nx.boot_sectors(boot, core)
        assert mbr == boot[:440] and out_core == core


def test_write_boot_code_keeps_partition_table(tmp_path):
    image = tmp_path / "d.img"
    table = bytes(range(256))[:72]  # disk id + 4 partition entries + signature area (0x1b8..0x200)
    image.write_bytes(b"\0" * 0x1b8 + table + b"\0" * (4 * MIB - 512))
    nx.write_boot_code(image, _boot_img(), b"CORE" * 100)
    data = image.read_bytes()
    assert data[:440] == _boot_img()[:440]
    assert data[0x1b8:0x200] == table
    assert data[512:912] == b"CORE" * 100


def test_find_ipxe_lkrn(tmp_path):
    present = tmp_path / "b.lkrn"
    present.write_bytes(b"x")
    assert nx.find_ipxe_lkrn((tmp_path / "a.lkrn", present)) == present
    with pytest.raises(UsageError, match="install Debian package ipxe"):
        nx.find_ipxe_lkrn((tmp_path / "a.lkrn",))
    with pytest.raises(UsageError, match="install Debian package grub-pc-bin"):
        nx.check_grub_pc(tmp_path)
