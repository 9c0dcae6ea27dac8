"""qemu argv builders (pure). The boot watcher runs against real qemu in tests/integration."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.tools import qemu

LOG = Path("/w/serial.log")


@pytest.mark.parametrize("kwargs, tail", [
    (dict(cdrom=Path("/o/x.iso")), ["-cdrom", "/o/x.iso", "-boot", "d", "-nic", "none"]),
    (dict(cdrom=Path("/o/x.iso"), uefi_vars=Path("/w/VARS.fd")),
     ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.OVMF_CODE}",
      "-drive", "if=pflash,format=raw,unit=1,file=/w/VARS.fd", "-cdrom", "/o/x.iso", "-boot", "d", "-nic", "none"]),
    (dict(disk=Path("/o/x.img"), uefi_vars=Path("/w/V.fd"), net=True),
     ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.OVMF_CODE}",
      "-drive", "if=pflash,format=raw,unit=1,file=/w/V.fd", "-drive", "file=/o/x.img,format=raw,if=virtio,snapshot=on",
      "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]),
])
def test_x86_argv(kwargs, tail):
    argv = qemu.x86_argv(LOG, **kwargs)
    assert argv[:12] == ["qemu-system-x86_64", "-accel", "tcg", "-m", "2048", "-display", "none", "-monitor", "none",
                         "-no-reboot", "-serial", "file:/w/serial.log"]
    assert argv[12:] == tail


def test_x86_argv_kvm_uses_the_host_cpu():
    argv = qemu.x86_argv(LOG, accel="kvm", memory=1024, cdrom=Path("/x.iso"))
    assert argv[1:5] == ["-accel", "kvm", "-m", "1024"] and argv[12:14] == ["-cpu", "host"]


def test_virt_arm64_argv():
    argv = qemu.virt_arm64_argv(LOG, Path("/f/vmlinuz"), Path("/f/initrd.img"), "root=live:LABEL=COS_STATE",
                                disk=Path("/o/x.img"))
    assert argv[:5] == ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57"]
    assert argv[-10:] == ["-kernel", "/f/vmlinuz", "-initrd", "/f/initrd.img", "-append", "root=live:LABEL=COS_STATE",
                          "-nic", "none", "-drive", "file=/o/x.img,format=raw,if=virtio,snapshot=on"]


@pytest.mark.parametrize("cmdline, arch, expected", [
    ("console=tty1 console=ttyS1,115200 root=live:LABEL=COS_STATE rootwait\n", "arm64",
     "root=live:LABEL=COS_STATE rootwait console=ttyAMA0"),
    ("root=x console=ttyS0", "amd64", "root=x console=ttyS0"),
])
def test_serial_cmdline(cmdline, arch, expected):
    assert qemu.serial_cmdline(cmdline, arch) == expected
