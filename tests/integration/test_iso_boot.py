"""The native ISO stage end to end: a Debian bookworm flavor (the session's bookworm
minbase base, builtin converter) -> kernel, initrd, squashfs -> `<stem>.iso`; its layout, checksum and volume
id; the boot stage (`doit boot:<stem>`) boots it in qemu with BIOS (SeaBIOS) and with UEFI
(OVMF) to the login prompt of the operating system in the squashfs (dracut's live root;
/etc/issue names the build) and records both boots; a second run builds nothing; an ISO made
from a broken squashfs fails the boot stage with the last serial lines.
"""
from __future__ import annotations

import hashlib
import json
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
BOOT_TIMEOUT = 600  # a cap: ~105 s idle, ~180 s beside another test module; a hang still fails
# the login prompt of the booted system, under the /etc/issue line naming this very build
LOGGED_IN = (f"Kairos {STEM} (ttyS0)", qemu.LOGIN)


@pytest.fixture(scope="module")
def iso_ws(tmp_path_factory, ns, bases) -> Workspace:
    ws = Workspace(root=tmp_path_factory.mktemp("iso"), ns=ns)
    write_flavor(ws.flavors / "debian-iso.yaml", builtin_doc(
        "debian", bases["b"], f"{ns}/kairos", ["kernel", "initrd", "squashfs", "iso", "boot"], squashfs=LZ4,
        boot={"timeout": BOOT_TIMEOUT}))
    # the same image through the AuroraBoot back end, with an AuroraBoot image that does not
    # exist in the local registry: the runtime path must fail with a clear pull error
    write_flavor(ws.flavors / "debian-ab.yaml", builtin_doc(
        "debianab", bases["b"], f"{ns}/kairos", ["iso"], builder="auroraboot",
        auroraboot_image=f"{ns}/no-such-auroraboot:v0"))
    return ws


@pytest.fixture(scope="module")
def built(iso_ws):
    """`doit boot:<stem>`: builds the ISO and what it needs, then boots it under BIOS and UEFI."""
    started = time.monotonic()
    result = iso_ws.doit(f"boot:{STEM}")
    print(f"first doit boot:{STEM}: {time.monotonic() - started:.0f}s")
    assert result.rc == 0, result.out[-3000:] + result.err
    assert f"iso:{STEM}" in result.executed and f"boot:{STEM}" in result.executed
    return result


@pytest.fixture(scope="module")
def boots(iso_ws, built) -> dict[str, dict]:
    """firmware -> the boot stage's record, with its serial log from <stem>-boot.log."""
    out = iso_ws.outputs / "v3.1.0"
    report = json.loads((out / f"{STEM}-boot.json").read_text())
    assert report["stem"] == STEM
    logs = (out / f"{STEM}-boot.log").read_text().split("===== ")
    by_fw = {}
    for record in report["boots"]:
        (log,) = [l for l in logs if l.startswith(f"iso-{record['firmware']}: ")]
        by_fw[record["firmware"]] = dict(record, serial=log)
    return by_fw


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

def _assert_logged_in(record: dict) -> None:
    text = record["serial"]
    lines = text.splitlines()
    around = next((i for i, l in enumerate(lines) if qemu.LOGIN in l), len(lines))
    print(f"{record['firmware']}: login prompt after {record['seconds']} s; serial lines around it:\n  "
          + "\n  ".join(lines[max(0, around - 6):around + 1]))
    assert "Linux version" in text, f"no kernel start in the serial log; tail:\n{text[-3000:]}"
    assert "root=live:CDLABEL=COS_LIVE" in text, "kernel command line of the ISO's grub.cfg not seen"
    assert record["passed"] is True and record["seconds"] < BOOT_TIMEOUT
    issue = next(i for i, l in enumerate(lines) if l.strip() == f"Kairos {STEM} (ttyS0)")
    assert any(qemu.LOGIN in l for l in lines[issue:]), f"no login prompt after the issue line:\n{text[-2000:]}"
    assert "Reached target" in text and "emergency" not in text
    assert any(qemu.LOGIN in l for l in record["last_serial_lines"])


def test_boot_bios(boots):
    assert "GNU GRUB" in boots["bios"]["serial"], "grub menu not on the serial console"
    _assert_logged_in(boots["bios"])


def test_boot_efi(boots):
    _assert_logged_in(boots["uefi"])
    assert "efi: EFI v" in boots["uefi"]["serial"], "the kernel did not report booting through EFI firmware"
    assert "-drive if=pflash" in boots["uefi"]["qemu"] and "-drive if=pflash" not in boots["bios"]["qemu"]


def test_second_run_builds_nothing(iso_ws, iso, boots):
    before = (iso.stat().st_mtime_ns, iso.with_name(iso.name + ".sha256").read_text())
    result = iso_ws.doit(f"boot:{STEM}")
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


def test_iso_of_a_broken_squashfs_fails_the_boot_stage(iso_ws, iso, boots, tmp_path):
    """Runs last: the squashfs is swapped for garbage (with a matching .sha256), as if a build step
    had produced it: same sizes and modification times, so doit's check of the squashfs task's
    targets sees the files it recorded (a changed time would rebuild the good squashfs). `doit
    forget iso:` makes the ISO rebuild from it, and the boot stage must fail naming the serial
    output; afterwards the good files are put back."""
    out = iso_ws.outputs / "v3.1.0"
    squashfs, sha = out / f"{STEM}.squashfs", out / f"{STEM}.squashfs.sha256"
    report = out / f"{STEM}-boot.json"
    saved = {p: tmp_path / p.name for p in (squashfs, sha)}
    for p, keep in saved.items():
        os.link(p, keep)
    try:
        stats = {p: p.stat() for p in (squashfs, sha)}
        squashfs.unlink()
        with open(squashfs, "wb") as fh:
            for _ in range(stats[squashfs].st_size >> 20):
                fh.write(os.urandom(1 << 20))
            fh.write(os.urandom(stats[squashfs].st_size & ((1 << 20) - 1)))
        sha.unlink()
        sha.write_text(f"{hashlib.sha256(squashfs.read_bytes()).hexdigest()}  {squashfs.name}\n")
        for p, st in stats.items():
            assert p.stat().st_size == st.st_size
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert iso_ws.doit("forget", f"iso:{STEM}").rc == 0
        before = report.read_text()
        result = iso_ws.doit(f"boot:{STEM}")
        assert result.rc == 1, result.out[-2000:]
        assert f"iso:{STEM}" in result.executed and f"boot:{STEM}" in result.executed
        # dracut cannot mount the garbage as the live root: the boot stops at once, naming why
        assert f"error: boot:{STEM}: {STEM}.iso (bios) stopped before the login prompt of {STEM}" in result.err
        assert "dracut: FATAL" in result.err.split("last serial lines:", 1)[1]
        assert "booting" in result.out and "(uefi)" not in result.out  # the first failure ends the stage
        print(result.err[-1500:])
        assert report.read_text() == before  # a failed boot writes nothing to outputs
    finally:
        for p, keep in saved.items():
            p.unlink(missing_ok=True)
            os.link(keep, p)
    # the good files carry the very times the garbage had: doit's file_dep check cannot tell them apart
    assert iso_ws.doit("forget", f"iso:{STEM}").rc == 0
    again = iso_ws.doit(f"iso:{STEM}")
    assert again.rc == 0 and f"iso:{STEM}" in again.executed
