"""The boot stage's pure parts: what boots how, markers, netboot URLs, matrix rule, config."""
from __future__ import annotations

import subprocess

import pytest

from pathlib import Path

from tasks.model import BootOptions, TrustedBoot
from tasks.stages import boot
from tasks.stages.manifest import release_notes

URL = "http://10.0.2.2:8080"


@pytest.mark.parametrize("fields, steps", [
    (dict(artifacts=("iso", "boot")), [("iso", "bios", None), ("iso", "uefi", None)]),
    (dict(artifacts=("iso", "boot"), boot=BootOptions(firmware=("uefi",))), [("iso", "uefi", None)]),
    (dict(artifacts=("raw", "boot"), arch="arm64", device="rpi4"), [("raw", "virt", None)]),
    (dict(artifacts=("raw", "boot"), raw_generic=True), [("raw", "uefi", None)]),
    (dict(artifacts=("ipxe", "boot"), netboot_url=URL), [("ipxe", "netboot", None)]),
    (dict(artifacts=("ipxe", "boot"), netboot_url="https://boot.example.com/kairos"),
     [("ipxe", "netboot", "netboot_url https://boot.example.com/kairos is not http://10.0.2.2:PORT, qemu's "
       "address of this machine: the netboot files are served elsewhere")]),
    (dict(artifacts=("iso", "boot"), arch="arm64"), [("iso", "uefi", None)]),      # AAVMF: arm64 ISOs are EFI only
    (dict(artifacts=("iso", "uki", "boot"), trusted_boot=TrustedBoot(keys=Path("/k"))),
     [("iso", "bios", None), ("iso", "uefi", None), ("uki", "secureboot", None)]),
    (dict(artifacts=("iso", "boot"), arch="arm64", boot=BootOptions(firmware=("bios",))), [("iso", "uefi", None)]),
])
def test_plan(make_build, fields, steps):
    assert [(s.kind, s.how, s.skip) for s in boot.plan(make_build(**fields))] == steps


def test_boot_only_with_something_bootable(make_build):
    assert make_build(artifacts=("kernel", "boot")).kinds == ("kernel",)
    assert make_build(artifacts=("iso", "boot")).kinds == ("iso", "kernel", "initrd", "squashfs", "boot")
    assert make_build(arch="arm64", device="rpi4", artifacts=("iso", "boot", "sbom")).kinds == ("sbom",)


@pytest.mark.parametrize("url, port", [
    ("http://10.0.2.2:8080", 8080), ("http://10.0.2.2:8080/", 8080), ("http://10.0.2.2:80/sub", None),
    ("http://10.0.2.20:8080", None), ("https://10.0.2.2:8443", None), (None, None),
])
def test_netboot_port(url, port):
    assert boot.netboot_port(url) == port


def test_markers_and_inputs(make_build, tmp_path):
    from tasks.state import Paths
    b = make_build(artifacts=("iso", "raw", "boot"), raw_generic=True)
    assert boot.login_markers(b) == (f"Kairos {b.stem} (ttyS0)", "login:")
    arm = make_build(arch="arm64", device="rpi4", artifacts=("raw", "boot"))
    assert boot.login_markers(arm)[0] == f"Kairos {arm.stem} (ttyAMA0)"
    paths = Paths(tmp_path / "s", tmp_path / "o")
    assert [p.name for p in boot.inputs(paths, b)] == [f"{b.stem}.iso.sha256", f"{b.stem}.iso.sha256",
                                                        f"{b.stem}.img.sha256"]


def test_arm64_iso_boots_from_a_scsi_cdrom_under_aavmf(make_build, tmp_path):
    from tasks.state import Paths
    from tasks.tools import qemu
    b = make_build(arch="arm64", artifacts=("iso", "boot"))
    paths = Paths(tmp_path / "s", tmp_path / "o")
    (step,) = boot.plan(b)
    argv = boot.argv_for(paths, b, step, tmp_path / "serial.log", tmp_path)
    assert argv[:5] == ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57"]
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.AAVMF_CODE}" in argv
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'AAVMF_VARS.fd'}" in argv
    assert (tmp_path / "AAVMF_VARS.fd").read_bytes() == qemu.AAVMF_VARS.read_bytes()  # a fresh copy per boot
    assert f"if=none,id=cd0,media=cdrom,readonly=on,format=raw,file={paths.artifact(b, '.iso')}" in argv


def test_secure_boot_markers_and_argv(make_build, tmp_path):
    """The -uki.iso boots with the flavor's keys enrolled and Secure Boot on; the kernel must say so."""
    from tasks.keys import generate
    from tasks.state import Paths
    from tasks.tools import qemu
    keys = tmp_path / "keys"
    generate(keys)
    b = make_build(artifacts=("uki", "boot"), trusted_boot=TrustedBoot(keys=keys))
    (step,) = boot.plan(b)
    assert boot.login_markers(b, step) == ("Secure boot enabled", f"Kairos {b.stem} (ttyS0)", "login:")
    argv = boot.argv_for(Paths(tmp_path / "s", tmp_path / "o"), b, step, tmp_path / "serial.log", tmp_path)
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.OVMF_SECBOOT_CODE}" in argv
    assert argv[argv.index("-m") + 1] == "4096" and argv[argv.index("-cdrom") + 1].endswith("-uki.iso")
    # the variables really hold the keys: virt-fw-vars prints the enrolled certificates
    listing = subprocess.run(["virt-fw-vars", "-i", str(tmp_path / "OVMF_VARS.enrolled.fd"), "--print", "-v"],
                             capture_output=True, text=True, check=True).stdout
    assert all(f"subject CN=Kairos {var}" in listing for var in ("PK", "KEK", "db"))
    assert "name=SecureBootEnable guid=guid:EfiSecureBootEnableDisable size=1\n  bool: ON" in listing


def test_key_changes_with_the_options(make_build):
    b = make_build(artifacts=("iso", "boot"))
    keys = {boot.key(b), boot.key(make_build(artifacts=("iso", "boot"), boot=BootOptions(timeout=60))),
            boot.key(make_build(artifacts=("iso", "boot"), boot=BootOptions(memory=4096))),
            boot.key(make_build(artifacts=("iso", "boot"), boot=BootOptions(firmware=("bios",))))}
    assert len(keys) == 4


def test_release_notes_list_the_boots(make_build):
    b = make_build(artifacts=("iso", "boot"))
    record = {"stem": b.stem, "image_digest": "sha256:" + "a" * 64, "outputs": [],
              "boot": [{"artifact": f"{b.stem}.iso", "firmware": "bios", "passed": True, "seconds": 71.6},
                       {"artifact": f"{b.stem}-ipxe.iso", "firmware": "netboot", "passed": None,
                        "skipped": "served elsewhere"}]}
    text = release_notes("v3.1.0", [b], [record], {})
    assert f"| `{b.stem}.iso` | bios | login prompt after 72 s |" in text
    assert f"| `{b.stem}-ipxe.iso` | netboot | skipped: served elsewhere |" in text


def test_serving_outputs_for_a_netboot_on_localhost(tmp_path):
    import socket
    import urllib.request
    from tasks.run import UsageError
    (tmp_path / "x-kernel").write_bytes(b"KERNEL")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with boot.serving(tmp_path, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/x-kernel", timeout=5) as reply:
            assert reply.read() == b"KERNEL"
        with pytest.raises(UsageError, match=f"cannot serve the netboot files on 127.0.0.1:{port}"):
            with boot.serving(tmp_path, port):  # the port is taken by the first server
                pass
