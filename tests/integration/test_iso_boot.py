"""The native ISO stage end to end: a Debian bookworm flavor (the session's bookworm
minbase base, builtin converter) -> kernel, initrd, squashfs -> `<stem>.iso`; its layout, checksum and volume
id; qemu boots it with BIOS (SeaBIOS) and with EFI (OVMF) to the login prompt of the
operating system in the squashfs (dracut's live root; /etc/issue names the build); a second
run builds nothing.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tasks.tools import qemu
from tests.harness import LZ4, Workspace, builtin_doc, write_flavor

pytestmark = pytest.mark.integration

STEM = "kairos-debian-12-core-amd64-generic-v3.1.0"
AB_STEM = "kairos-debianab-12-core-amd64-generic-v3.1.0"
BOOT_TIMEOUT = 300
# the login prompt of the booted system, under the /etc/issue line naming this very build
LOGGED_IN = (f"Kairos {STEM} (ttyS0)", qemu.LOGIN)


@pytest.fixture(scope="module")
def iso_ws(tmp_path_factory, ns, bases) -> Workspace:
    ws = Workspace(root=tmp_path_factory.mktemp("iso"), ns=ns)
    write_flavor(ws.flavors / "debian-iso.yaml", builtin_doc(
        "debian", bases["b"], f"{ns}/kairos", ["kernel", "initrd", "squashfs", "iso"], squashfs=LZ4))
    # the same image through the AuroraBoot back end, with an AuroraBoot image that does not
    # exist in the local registry: the runtime path must fail with a clear pull error
    write_flavor(ws.flavors / "debian-ab.yaml", builtin_doc(
        "debianab", bases["b"], f"{ns}/kairos", ["iso"], builder="auroraboot",
        auroraboot_image=f"{ns}/no-such-auroraboot:v0"))
    return ws


@pytest.fixture(scope="module")
def built(iso_ws):
    started = time.monotonic()
    result = iso_ws.doit(f"iso:{STEM}")
    print(f"first doit iso:{STEM}: {time.monotonic() - started:.0f}s")
    assert result.rc == 0, result.err
    assert f"iso:{STEM}" in result.executed
    return result


@pytest.fixture(scope="module")
def iso(iso_ws, built) -> Path:
    return iso_ws.outputs / "v3.1.0" / f"{STEM}.iso"


def xorriso(*args: str) -> str:
    proc = subprocess.run(["xorriso", *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_iso_and_checksum(iso):
    assert iso.is_file() and iso.stat().st_size > 10 << 20
    sums = iso.with_name(iso.name + ".sha256").read_text()
    digest = hashlib.sha256(iso.read_bytes()).hexdigest()
    assert sums == f"{digest}  {iso.name}\n"
    check = subprocess.run(["sha256sum", "-c", iso.name + ".sha256"], cwd=iso.parent,
                           capture_output=True, text=True)
    assert check.returncode == 0 and f"{iso.name}: OK" in check.stdout
    leftovers = [p.name for p in iso.parent.iterdir() if ".partial-" in p.name]
    assert leftovers == []


def test_iso_layout(iso, tmp_path):
    listing = xorriso("-indev", str(iso), "-find", "/", "-maxdepth", "3")
    paths = {line.strip().strip("'") for line in listing.splitlines() if line.startswith("'")}
    for wanted in ("/rootfs.squashfs", "/boot/kernel", "/boot/initrd", "/boot/grub/grub.cfg",
                   "/boot/grub/i386-pc", "/boot/grub/x86_64-efi", "/efi.img"):
        assert wanted in paths, f"{wanted} not in the ISO: {sorted(paths)}"
    # the files in the ISO are exactly the stage's inputs
    out = iso.parent
    for inside, outside in (("/boot/kernel", f"{STEM}-kernel"), ("/boot/initrd", f"{STEM}-initrd"),
                            ("/rootfs.squashfs", f"{STEM}.squashfs")):
        dest = tmp_path / Path(inside).name
        xorriso("-osirrox", "on", "-indev", str(iso), "-extract", inside, str(dest))
        assert dest.read_bytes() == (out / outside).read_bytes(), inside
    cfg = tmp_path / "grub.cfg"
    xorriso("-osirrox", "on", "-indev", str(iso), "-extract", "/boot/grub/grub.cfg", str(cfg))
    text = cfg.read_text()
    assert "root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs" in text
    assert "console=ttyS0" in text and "terminal_output console serial" in text


def test_volume_id_and_boot_records(iso):
    pvd = xorriso("-indev", str(iso), "-pvd_info")
    assert "Volume Id    : COS_LIVE" in pvd
    torito = xorriso("-indev", str(iso), "-report_el_torito", "plain")
    platforms = [line.split(":", 1)[1].split()[1] for line in torito.splitlines()
                 if line.startswith("El Torito boot img :")]
    assert "BIOS" in platforms and "UEFI" in platforms, torito


# --- qemu boots ---------------------------------------------------------------------

def _probe_seconds(accel: str, workdir: Path) -> float | None:
    """Seconds SeaBIOS needs, under ``accel``, to finish POST with no boot device (None: failed)."""
    log = workdir / f"probe-{accel}.log"
    log.unlink(missing_ok=True)
    proc = subprocess.Popen(["qemu-system-x86_64", "-accel", accel, "-M", "pc", "-m", "64", "-display", "none",
                             "-nodefaults", "-no-reboot", "-debugcon", f"file:{log}",
                             "-global", "isa-debugcon.iobase=0x402"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    try:
        while time.monotonic() - started < 15:
            if proc.poll() is not None:
                return None
            if log.exists() and b"No bootable device" in log.read_bytes():
                return time.monotonic() - started
            time.sleep(0.05)
        return None
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def accel(tmp_path_factory) -> str:
    """kvm when /dev/kvm works AND is not slower than TCG (nested virtualisation can make
    every VM exit so slow that a KVM boot never gets past grub), else tcg."""
    forced = os.environ.get("KAIROS_TEST_QEMU_ACCEL")
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    workdir = tmp_path_factory.mktemp("accel")
    kvm, tcg = _probe_seconds("kvm", workdir), _probe_seconds("tcg", workdir)
    chosen = "kvm" if kvm is not None and (tcg is None or kvm <= max(1.0, 2 * tcg)) else "tcg"
    print(f"qemu accel probe: kvm {kvm}, tcg {tcg} -> {chosen}")
    return chosen


def boot(iso: Path, workdir: Path, accel: str, uefi: bool = False) -> qemu.Boot:
    """Boot ``iso`` until the serial console shows this build's login prompt."""
    log = workdir / "serial.log"
    argv = qemu.x86_argv(log, accel=accel, cdrom=iso, uefi_vars=qemu.fresh_vars(workdir) if uefi else None)
    result = qemu.boot(argv, log, LOGGED_IN, BOOT_TIMEOUT)
    print(f"qemu ({accel}, {'UEFI' if uefi else 'BIOS'}): {'login prompt' if result.passed else 'no login'} "
          f"after {result.seconds:.0f}s")
    return result


def _assert_logged_in(result: qemu.Boot) -> None:
    text = result.serial
    lines = text.splitlines()
    around = next((i for i, l in enumerate(lines) if qemu.LOGIN in l), len(lines))
    print("serial lines around the login prompt:\n  " + "\n  ".join(lines[max(0, around - 6):around + 1]))
    assert "Linux version" in text, f"no kernel start in the serial log; tail:\n{result.tail()}"
    assert "root=live:CDLABEL=COS_LIVE" in text, "kernel command line of the ISO's grub.cfg not seen"
    assert result.passed, f"no login prompt of {STEM} within {BOOT_TIMEOUT}s; tail:\n{result.tail()}"
    assert "Reached target" in text and "(initramfs)" not in text


def test_boot_bios(iso, accel, tmp_path):
    result = boot(iso, tmp_path, accel)
    assert "GNU GRUB" in result.serial, f"grub menu not on the serial console; tail:\n{result.tail()}"
    _assert_logged_in(result)


def test_boot_efi(iso, accel, tmp_path):
    assert qemu.OVMF_CODE.exists() and qemu.OVMF_VARS.exists(), "OVMF firmware not found; install Debian package ovmf"
    result = boot(iso, tmp_path, accel, uefi=True)
    _assert_logged_in(result)
    assert "efi: EFI v" in result.serial, "the kernel did not report booting through EFI firmware"


def test_second_run_builds_nothing(iso_ws, iso):
    before = (iso.stat().st_mtime_ns, iso.with_name(iso.name + ".sha256").read_text())
    result = iso_ws.doit(f"iso:{STEM}")
    assert result.rc == 0, result.err
    assert result.build_actions == set(), result.out
    assert (iso.stat().st_mtime_ns, iso.with_name(iso.name + ".sha256").read_text()) == before


def test_auroraboot_without_its_image_fails_clearly(iso_ws, built, ns):
    result = iso_ws.doit(f"iso:{AB_STEM}")
    assert result.rc == 2, result.out
    assert f"error: iso:{AB_STEM}: cannot pull the AuroraBoot image {ns}/no-such-auroraboot:v0" in result.err
    assert "use `builder: native`" in result.err
    version_dir = iso_ws.outputs / "v3.1.0"
    assert not (version_dir / f"{AB_STEM}.iso").exists()
    assert [p.name for p in version_dir.iterdir() if p.name.startswith(f".{AB_STEM}")] == []
