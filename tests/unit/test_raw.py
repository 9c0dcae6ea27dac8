"""raw stage and native raw builder: pure tables (plan, sfdisk script, config.txt, cmdline.txt,
firmware picking, argv), plus real-tool checks of the small pieces that need no Docker."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tasks.builders import native_raw as n
from tasks.kinds import KINDS
from tasks.run import KairosError, run
from tasks.stages import preflight, raw
from tasks.stages.convert import builtin_install_script

EPOCH = 1700000000

MIB = 1 << 20
RPI = dict(converter="builtin", kairos_init_image=None, flavor="debian", release="12",
           artifacts=("kernel", "initrd", "squashfs", "raw"))

# --- partition plan ----------------------------------------------------------------

PLAN_CASES = [
    # boot content, squashfs bytes -> (boot, recovery, state) sizes in MiB
    (0, 0, (64, 48, 48)),
    (10 * MIB, 100 * MIB, (64, 153, 153)),
    (60 * MIB, 300 * MIB, (82, 363, 363)),
    (200 * MIB, 1 * MIB + 1, (236, 50, 50)),
]


@pytest.mark.parametrize("boot, squash, sizes", PLAN_CASES)
def test_plan_sizes_and_offsets(boot, squash, sizes):
    p = n.plan(boot, squash, squash, "0x12345678")
    by = {x.label: x for x in p.partitions}
    assert [x.label for x in p.partitions] == ["COS_GRUB", "COS_OEM", "COS_RECOVERY", "COS_STATE",
                                               "COS_PERSISTENT"]
    assert [x.number for x in p.partitions] == [1, 2, 3, 5, 6]
    assert (by["COS_GRUB"].size // MIB, by["COS_RECOVERY"].size // MIB, by["COS_STATE"].size // MIB) == sizes
    assert by["COS_OEM"].size == by["COS_PERSISTENT"].size == 64 * MIB
    assert by["COS_GRUB"].start == MIB and by["COS_GRUB"].bootable and by["COS_GRUB"].mbr_type == "c"
    for x in p.partitions:
        assert x.start % MIB == 0 and x.size % MIB == 0
    # primaries back to back; the extended partition holds both logical ones, each after a 1 MiB EBR gap
    assert by["COS_OEM"].start == by["COS_GRUB"].end and by["COS_RECOVERY"].start == by["COS_OEM"].end
    ext_start, ext_size = p.extended
    assert ext_start == by["COS_RECOVERY"].end
    assert by["COS_STATE"].start == ext_start + MIB
    assert by["COS_PERSISTENT"].start == by["COS_STATE"].end + MIB
    assert ext_start + ext_size == p.disk_size == by["COS_PERSISTENT"].end


def test_plan_fits_contents():
    for content in (0, 1, MIB, 77 * MIB + 3, 2000 * MIB):
        assert n.boot_size(content) >= content + 16 * MIB
        assert n.ext4_size(content) >= content + 48 * MIB


def test_sfdisk_script_text():
    p = n.plan(10 * MIB, 100 * MIB, 100 * MIB, "0xdeadbeef")
    assert n.sfdisk_script(p) == (
        "label: dos\n"
        "label-id: 0xdeadbeef\n"
        "unit: sectors\n"
        "sector-size: 512\n"
        "\n"
        "start=2048, size=131072, type=c, bootable\n"
        "start=133120, size=131072, type=83\n"
        "start=264192, size=313344, type=83\n"
        "start=577536, size=448512, type=5\n"
        "start=579584, size=313344, type=83\n"
        "start=894976, size=131072, type=83\n")


@pytest.mark.parametrize("boot, squash", [(5 * MIB, 30 * MIB), (70 * MIB, 500 * MIB)])
def test_sfdisk_writes_the_planned_table(tmp_path, boot, squash):
    """Real sfdisk on a sparse file: `sfdisk -J` reads back exactly expected_table()."""
    p = n.plan(boot, squash, squash, "0x0badcafe")
    img = tmp_path / "disk.img"
    with open(img, "wb") as fh:
        fh.truncate(p.disk_size)
    run(n.sfdisk_argv(img), feed=[n.sfdisk_script(p).encode()])
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, check=True,
                                      text=True).stdout)["partitiontable"]
    assert table["label"] == "dos" and table["id"] == "0x0badcafe"
    got = [{"start": x["start"], "size": x["size"], "type": x["type"], "bootable": x.get("bootable", False)}
           for x in table["partitions"]]
    assert got == n.expected_table(p)


def test_ids_are_stable_and_distinct():
    a, b = n.ids("kairos-debian-12-core-arm64-rpi4-v3.1.0"), n.ids("kairos-debian-12-core-arm64-rpi3-v3.1.0")
    assert a == n.ids("kairos-debian-12-core-arm64-rpi4-v3.1.0")
    assert a != b
    assert a["label_id"].startswith("0x") and len(a["label_id"]) == 10
    assert len(a["vfat"]) == 8 and int(a["vfat"], 16) >= 0
    assert len({a[k] for k in ("COS_OEM", "COS_RECOVERY", "COS_STATE", "COS_PERSISTENT")}) == 4


# --- config.txt / cmdline.txt ---------------------------------------------------------

@pytest.mark.parametrize("device", ["rpi3", "rpi4"])
def test_config_txt(device):
    lines = [l for l in n.config_txt(device).splitlines() if l and not l.startswith("#")]
    assert lines == ["arm_64bit=1", "enable_uart=1", "upstream_kernel=1", "kernel=vmlinuz",
                     "initramfs initrd.img followkernel"]


@pytest.mark.parametrize("device", ["rpi3", "rpi4"])
def test_cmdline_txt_is_one_kairos_line(device):
    text = n.cmdline_txt(device)
    assert text.endswith("\n") and text.count("\n") == 1
    args = text.split()
    assert "root=LABEL=COS_STATE" in args and "cos-img/filename=/cOS/active.squashfs" in args
    assert "rd.cos.oemlabel=COS_OEM" in args and "console=ttyS1,115200" in args


@pytest.mark.parametrize("device", ["generic", "rpi4"])
def test_cmdline_txt_live_form_for_dracut(device):
    args = n.cmdline_txt(device, live=True).split()
    assert args[2:5] == ["root=live:LABEL=COS_STATE", "rd.live.dir=/cOS", "rd.live.squashimg=active.squashfs"]
    assert not any(a.startswith("cos-img/") for a in args)
    assert "root=live:LABEL=COS_STATE" in n.grub_cfg(live=True) and "cos-img" not in n.grub_cfg(live=True)


# --- firmware and device trees from the squashfs listing ----------------------------------

DEBIAN_LISTING = [
    "usr/lib/raspi-firmware/bootcode.bin", "usr/lib/raspi-firmware/start.elf", "usr/lib/raspi-firmware/fixup.dat",
    "usr/lib/raspi-firmware/start_x.elf", "usr/lib/raspi-firmware/fixup_x.dat",
    "usr/lib/raspi-firmware/start4.elf", "usr/lib/raspi-firmware/fixup4.dat",
    "usr/lib/raspi-firmware/start4x.elf", "usr/lib/raspi-firmware/fixup4x.dat",
    "usr/lib/linux-image-6.1.0-9-arm64/broadcom/bcm2711-rpi-4-b.dtb",
    "usr/lib/linux-image-6.1.0-27-arm64/broadcom/bcm2711-rpi-4-b.dtb",
    "usr/lib/linux-image-6.1.0-27-arm64/broadcom/bcm2711-rpi-400.dtb",
    "usr/lib/linux-image-6.1.0-27-arm64/broadcom/bcm2837-rpi-3-b.dtb",
    "usr/lib/linux-image-6.1.0-27-arm64/broadcom/bcm2837-rpi-3-b-plus.dtb",
    "usr/lib/linux-image-6.1.0-27-arm64/broadcom/bcm2835-rpi-a.dtb",
    "usr/lib/linux-image-6.1.0-27-arm64/amlogic/meson-gxbb-odroidc2.dtb",
    "etc/hostname",
]
FW = "usr/lib/raspi-firmware/"
DT = "usr/lib/linux-image-6.1.0-27-arm64/broadcom/"

PICK_CASES = [
    ("rpi4", DEBIAN_LISTING,
     [FW + "fixup4.dat", FW + "fixup4x.dat", FW + "start4.elf", FW + "start4x.elf"],
     [DT + "bcm2711-rpi-4-b.dtb", DT + "bcm2711-rpi-400.dtb"]),
    ("rpi3", DEBIAN_LISTING,
     [FW + "bootcode.bin", FW + "fixup.dat", FW + "fixup_x.dat", FW + "start.elf", FW + "start_x.elf"],
     [DT + "bcm2837-rpi-3-b-plus.dtb", DT + "bcm2837-rpi-3-b.dtb"]),
    ("rpi4", ["usr/lib/linux-firmware-raspi/start4.elf", "usr/lib/linux-firmware-raspi/fixup4.dat",
              "lib/firmware/6.8.0-1004-raspi/device-tree/broadcom/bcm2711-rpi-4-b.dtb"],
     ["usr/lib/linux-firmware-raspi/fixup4.dat", "usr/lib/linux-firmware-raspi/start4.elf"],
     ["lib/firmware/6.8.0-1004-raspi/device-tree/broadcom/bcm2711-rpi-4-b.dtb"]),
]


@pytest.mark.parametrize("device, listing, firmware, dtbs", PICK_CASES)
def test_pick_firmware(device, listing, firmware, dtbs):
    assert n.pick_firmware(listing, device) == (firmware, dtbs)


@pytest.mark.parametrize("device, listing, message", [
    ("rpi4", [p for p in DEBIAN_LISTING if not p.endswith("fixup4.dat")], "no Raspberry Pi firmware (start4.elf"),
    ("rpi3", [p for p in DEBIAN_LISTING if "bootcode" not in p], "non-free-firmware"),
    ("rpi4", [p for p in DEBIAN_LISTING if "bcm2711-rpi-4-b" not in p], "no bcm2711-rpi-4-b.dtb in the image"),
    ("rpi4", ["etc/hostname"], "no Raspberry Pi firmware"),
])
def test_pick_firmware_missing(device, listing, message):
    with pytest.raises(KairosError, match=message.replace("(", r"\(")):
        n.pick_firmware(listing, device)


def test_parse_listing():
    text = "Parallel unsquashfs: Using 2 processors\n4 inodes (4 blocks) to write\n\n/etc/hostname\n/usr/lib/x y\n"
    assert raw.parse_listing(text) == ["etc/hostname", "usr/lib/x y"]


# --- argv ------------------------------------------------------------------------------

def test_argv_builders():
    img, src = Path("/w/fs.img"), Path("/w/tree")
    clock = ["env", "TZ=UTC", "faketime", "-f", "2023-11-14 22:13:20"]
    assert n.mkfs_vfat_argv(img, "COS_GRUB", "ABCD1234", epoch=EPOCH) == [
        *clock, "mkfs.vfat", "-F", "32", "-n", "COS_GRUB", "-i", "ABCD1234", "/w/fs.img"]
    assert n.mkfs_ext4_argv(img, "COS_STATE", "u-u", src, 64 * MIB, epoch=EPOCH) == [
        "env", "E2FSPROGS_FAKE_TIME=1700000000",
        "mkfs.ext4", "-F", "-q", "-L", "COS_STATE", "-U", "u-u", "-E", "root_owner=0:0,hash_seed=u-u", "-m", "0",
        "-d", "/w/tree", "/w/fs.img", "65536k"]
    assert n.mcopy_argv(img, [Path("/a/start4.elf"), Path("/b/vmlinuz")], epoch=EPOCH) == [
        *clock, "mcopy", "-i", "/w/fs.img", "-o", "/a/start4.elf", "/b/vmlinuz", "::/"]
    assert n.mmd_argv(img, ["EFI", "EFI/BOOT"], epoch=0) == [
        "env", "TZ=UTC", "faketime", "-f", "1970-01-01 00:00:00", "mmd", "-i", "/w/fs.img", "::/EFI", "::/EFI/BOOT"]
    assert n.debugfs_argv(img, Path("/w/s"), EPOCH) == [
        "env", "E2FSPROGS_FAKE_TIME=1700000000", "debugfs", "-w", "-f", "/w/s", "/w/fs.img"]
    assert n.sfdisk_argv(img) == ["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", "/w/fs.img"]
    assert raw.unsquashfs_list_argv(Path("/o/x.squashfs")) == ["unsquashfs", "-lc", "-d", "", "/o/x.squashfs"]
    assert raw.unsquashfs_extract_argv(Path("/o/x.squashfs"), Path("/w/r"), Path("/w/l")) == [
        "unsquashfs", "-f", "-no-progress", "-no-xattrs", "-d", "/w/r", "-ef", "/w/l", "/o/x.squashfs"]


def test_write_at_keeps_other_bytes_and_sparseness(tmp_path):
    img, fs = tmp_path / "img", tmp_path / "fs"
    with open(img, "wb") as fh:
        fh.truncate(8 * MIB)
    fs.write_bytes(bytes(MIB) + b"\x01" * 10 + bytes(MIB - 10))
    n.write_at(img, 3 * MIB, fs)
    data = img.read_bytes()
    assert len(data) == 8 * MIB
    assert data[4 * MIB:4 * MIB + 10] == b"\x01" * 10
    assert data.count(b"\x01") == 10
    assert img.stat().st_blocks * 512 <= 2 * MIB  # zero blocks were skipped, not written


# --- stage: which builds, problems, tools, key ---------------------------------------------

def test_problem_messages(make_build):
    ok = make_build(arch="arm64", device="rpi4", **RPI)
    assert raw.problem(ok) is None
    only_raw = make_build(arch="arm64", device="rpi4", **{**RPI, "artifacts": ("raw",)})
    assert raw.problem(only_raw) is None and {"kernel", "initrd", "squashfs"} <= set(only_raw.kinds)
    aurora = make_build(arch="arm64", device="rpi4", builder="auroraboot", **{**RPI, "artifacts": ("raw",)})
    assert raw.problem(aurora) is None  # AuroraBoot builds from the image, not from the extracted files
    assert raw.problem(make_build(arch="amd64", device="generic", raw_generic=True, **RPI)) is None
    arm_generic = make_build(arch="arm64", device="generic", raw_generic=True, **RPI)
    assert "generic raw images for amd64 only" in raw.problem(arm_generic)


def test_tools_are_known_to_preflight(make_build):
    b = make_build(arch="arm64", device="rpi4", **RPI)
    need = preflight.tools_needed((b,))
    for tool in ("sfdisk", "mkfs.vfat", "mcopy", "mkfs.ext4", "unsquashfs"):
        assert tool in need
    assert "grub-mkimage" not in need and "faketime" in need
    assert KINDS["raw"].tools_for(make_build(arch="arm64", device="rpi4", builder="auroraboot", **RPI)) == {
        "docker": "run the AuroraBoot container (builder: auroraboot)"}
    generic = KINDS["raw"].tools_for(make_build(arch="amd64", device="generic", raw_generic=True, **RPI))
    assert "grub-mkimage" in generic and "unsquashfs" not in generic


def test_auroraboot_task_depends_on_the_image(make_build, tmp_path):
    from tasks.graph import Context
    from tasks.state import Paths
    b = make_build(arch="arm64", device="rpi4", builder="auroraboot", **RPI)
    ctx = Context(root=tmp_path, paths=Paths(tmp_path / "state", tmp_path / "out"), flavors=(b.flavor,), builds=(b,))
    (task,) = list(raw.tasks(ctx, "raw"))
    assert task["file_dep"] == [str(tmp_path / "state/image" / f"{b.stem}.digest"),
                                str(tmp_path / "state/pushed" / f"{b.stem}.digest")]
    assert task["targets"] == [str(tmp_path / "out/v3.1.0" / f"{b.stem}.img"),
                               str(tmp_path / "out/v3.1.0" / f"{b.stem}.img.sha256")]
    assert "disk.raw=true" in raw.key(b) and "arm64" in raw.key(b)
    native = make_build(arch="arm64", device="rpi4", **RPI)
    ctx = Context(root=tmp_path, paths=Paths(tmp_path / "state", tmp_path / "out"), flavors=(native.flavor,),
                  builds=(native,))
    (task,) = list(raw.tasks(ctx, "raw"))
    assert task["file_dep"] == [str(tmp_path / "out/v3.1.0" / f"{native.stem}{s}.sha256")
                                for s in ("-kernel", "-initrd", ".squashfs")]


def test_key_changes_with_device_not_with_version(make_build):
    r4 = make_build(arch="arm64", device="rpi4", **RPI)
    r3 = make_build(arch="arm64", device="rpi3", **RPI)
    assert raw.key(r4) != raw.key(r3)
    assert raw.key(r4) == raw.key(make_build(arch="arm64", device="rpi4", **{**RPI, "version": "v3.2.0"}))
    assert raw.key(r4) != raw.key(make_build(arch="arm64", device="rpi4", **{**RPI, "source_date_epoch": 0}))


# --- builtin converter: rpi firmware lines, generic unchanged ---------------------------------

@pytest.mark.parametrize("device", ["rpi3", "rpi4"])
def test_builtin_script_installs_rpi_firmware(make_build, device):
    b = make_build(arch="arm64", device=device, **RPI)
    generic = make_build(arch="arm64", device="generic", **RPI)
    script, plain = builtin_install_script(b), builtin_install_script(generic)
    run(["sh", "-n"], feed=[script.encode()])
    lines = script.splitlines()
    assert 'PATH="/tmp/kairos-chroot-bin:$PATH" apt-get install -y --no-install-recommends "$firmware"' in lines
    assert "raspi-firmware" in script and "non-free-firmware" in script
    # firmware comes after the kernel install and before the apt lists are removed
    kernel = next(i for i, l in enumerate(lines) if l.startswith('apt-get install -y --no-install-recommends "$kernel"'))
    assert kernel < lines.index('PATH="/tmp/kairos-chroot-bin:$PATH" apt-get install -y --no-install-recommends '
                                '"$firmware"') < lines.index("rm -rf /var/lib/apt/lists/*")
    # the generic script is the rpi script without the firmware lines (and with grub's arm64-efi modules)
    plain = plain.replace(" systemd-sysv grub-efi-arm64-bin", " systemd-sysv")
    start = next(i for i, l in enumerate(lines) if "firmware=raspi-firmware" in l)
    end = next(i for i, l in enumerate(lines) if l.startswith("if [ -d /boot/firmware ]"))
    assert start == kernel + 1
    assert lines[:start] + lines[end + 1:] == plain.splitlines()
    assert "firmware" not in plain


def test_fake_ischroot_says_chroot(tmp_path):
    """The printf line of the script writes a shell script that exits 0."""
    line = next(l for l in builtin_script_lines() if l.startswith("printf"))
    target = tmp_path / "ischroot"
    subprocess.run(["sh", "-c", line.replace("/tmp/kairos-chroot-bin/ischroot", str(target))], check=True)
    target.chmod(0o755)
    assert target.read_text() == "#!/bin/sh\nexit 0\n"
    assert subprocess.run([str(target)]).returncode == 0


def builtin_script_lines() -> list[str]:
    from tasks.model import Flavor
    from tasks.matrix import Build
    f = Flavor(path=Path("x.yaml"), flavor="debian", release="12", base_image="debian:12", version="v3.1.0",
               variants=("core",), k3s_versions=(), arches=("arm64",), devices=("rpi4",), converter="builtin",
               kairos_init_image=None, registry="r/k", artifacts=("raw",))
    return builtin_install_script(Build(f, "core", "arm64", "rpi4")).splitlines()


# --- generic (amd64 EFI) boot partition ------------------------------------------------------

def test_grub_cfg_boots_kernel_from_cos_grub():
    cfg = n.grub_cfg()
    assert "search --no-floppy --label COS_GRUB --set=root" in cfg
    assert f"  linux /vmlinuz {n.cmdline_txt('generic').strip()}" in cfg
    assert "  initrd /initrd.img" in cfg
    assert "console=ttyS0,115200" in n.cmdline_txt("generic")


def test_grub_mkimage_argv():
    argv = n.grub_mkimage_argv("amd64", Path("/w/BOOTX64.EFI"), Path("/w/memdisk.tar"))
    assert argv == ["grub-mkimage", "-O", "x86_64-efi", "-o", "/w/BOOTX64.EFI", "-p", "(memdisk)/boot/grub",
                    "-m", "/w/memdisk.tar", "memdisk", "tar", *n.GRUB_MODULES]
    assert "part_msdos" in argv and "linux" in argv


@pytest.mark.parametrize("moddep, wanted, closure", [
    ("a: b c\nb: c\nc:\nd: a\n", ("a",), ["a", "b", "c"]),
    ("a: b c\nb: c\nc:\nd: a\n", ("d", "c"), ["a", "b", "c", "d"]),
    ("x:\n", ("x", "unknown"), ["unknown", "x"]),
])
def test_module_closure(moddep, wanted, closure):
    assert n.module_closure(moddep, wanted) == closure


def test_ext4_times_script_dates_every_inode():
    script = n.ext4_times_script(["/", "/cOS", "/cOS/active.squashfs"], EPOCH)
    assert script.splitlines()[:4] == [f"set_inode_field / {f} @1700000000" for f in ("atime", "mtime", "ctime",
                                                                                        "crtime")]
    assert len(script.splitlines()) == 12


def test_ext4_paths(tmp_path):
    (tmp_path / "cOS").mkdir()
    (tmp_path / "cOS/active.squashfs").write_text("x")
    (tmp_path / "90_custom.yaml").write_text("x")
    assert n.ext4_paths(tmp_path) == ["/", "/90_custom.yaml", "/cOS", "/cOS/active.squashfs", "/lost+found"]


@pytest.mark.parametrize("paths, dirs", [
    (["vmlinuz", "config.txt"], []),
    (["EFI/BOOT/BOOTX64.EFI", "vmlinuz"], ["EFI", "EFI/BOOT"]),
    (["a/b/c", "a/d", "e/f"], ["a", "a/b", "e"]),
])
def test_fat_dirs(paths, dirs):
    assert n.fat_dirs(paths) == dirs


def _fake_inputs(tmp_path):
    kernel, initrd, squash = tmp_path / "k", tmp_path / "i", tmp_path / "s"
    kernel.write_bytes(b"K" * 300000)
    initrd.write_bytes(b"I" * 200000)
    squash.write_bytes(b"S" * 3 * MIB)
    return kernel, initrd, squash


def _fat_listing(fs: Path, path: str = "::/") -> str:
    return subprocess.run(["mdir", "-b", "-i", str(fs), path], capture_output=True, text=True, check=True,
                          env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}).stdout


def test_boot_stage_reads_kernel_initrd_and_cmdline_of_a_real_rpi_disk(tmp_path):
    """The boot stage's reader (sfdisk -J + mcopy at the FAT's offset) on a disk built by the real tools."""
    from tasks.stages import boot
    kernel, initrd, squash = _fake_inputs(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    fw = []
    for name in ("start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb"):
        (tmp_path / name).write_bytes(name.encode())
        fw.append(tmp_path / name)
    files = n.rpi_boot_files(work, "rpi4", kernel, initrd, fw[:2], fw[2:], live=True)
    img = tmp_path / "disk.img"
    n.build_disk(img, work, "seed", files, squash, "c", epoch=EPOCH)
    out = tmp_path / "read"
    out.mkdir()
    got_kernel, got_initrd, cmdline = boot.rpi_boot_files(img, out)
    assert got_kernel.read_bytes() == kernel.read_bytes() and got_initrd.read_bytes() == initrd.read_bytes()
    assert cmdline == n.cmdline_txt("rpi4", live=True)


@pytest.mark.parametrize("kind", ["rpi4", "generic"])
def test_build_disk_with_real_tools(tmp_path, kind):
    """build_disk end to end on small fake inputs: table as planned, clean file systems."""
    kernel, initrd, squash = _fake_inputs(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    if kind == "rpi4":
        fw = []
        for name in ("start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb"):
            (tmp_path / name).write_bytes(name.encode())
            fw.append(tmp_path / name)
        boot = n.rpi_boot_files(work, "rpi4", kernel, initrd, fw[:2], fw[2:])
        boot_type = "c"
    else:
        boot = n.efi_boot_files(work, "amd64", kernel, initrd, epoch=EPOCH)
        boot_type = "ef"
    img = tmp_path / "disk.img"
    p = n.build_disk(img, work, "seed", boot, squash, boot_type, epoch=EPOCH)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    got = [{"start": x["start"], "size": x["size"], "type": x["type"], "bootable": x.get("bootable", False)}
           for x in table["partitions"]]
    assert got == n.expected_table(p) and got[0]["type"] == boot_type
    data = img.read_bytes()
    for x in p.partitions:
        part = tmp_path / f"p{x.number}"
        part.write_bytes(data[x.start:x.end])
        check = ["fsck.vfat", "-n"] if x.fs == "vfat" else ["e2fsck", "-fn"]
        assert subprocess.run([*check, str(part)], capture_output=True).returncode == 0, x.label
        label = subprocess.run(["blkid", "-o", "value", "-s", "LABEL", str(part)], capture_output=True,
                               text=True).stdout.strip()
        assert label == x.label
    listing = _fat_listing(tmp_path / "p1", "::/")
    if kind == "rpi4":
        for name in ("start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "config.txt", "cmdline.txt", "vmlinuz",
                     "initrd.img"):
            assert f"::/{name}" in listing
    else:
        assert "::/vmlinuz" in listing and "::/initrd.img" in listing
        assert "::/EFI/BOOT/BOOTX64.EFI" in _fat_listing(tmp_path / "p1", "::/EFI/BOOT")
    state = subprocess.run(["debugfs", "-R", "ls -l /cOS", str(tmp_path / "p5")], capture_output=True,
                           text=True).stdout
    assert "active.squashfs" in state and str(3 * MIB) in state
