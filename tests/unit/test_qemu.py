"""qemu argv builders (pure), the accelerator choice, and the watcher and KVM probes against real
qemu (short runs; the boots themselves are in tests/integration)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.run import UsageError
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
    (dict(cdrom=Path("/o/u.iso"), uefi_vars=Path("/w/E.fd"), secure_boot=True, tpm=Path("/w/swtpm.sock")),
     ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on",
      "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.OVMF_SECBOOT_CODE}",
      "-drive", "if=pflash,format=raw,unit=1,file=/w/E.fd", "-cdrom", "/o/u.iso", "-boot", "d",
      "-chardev", "socket,id=chrtpm,path=/w/swtpm.sock", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
      "-device", "tpm-tis,tpmdev=tpm0", "-nic", "none"]),
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


@pytest.mark.parametrize("kwargs, tail", [
    (dict(cdrom=Path("/o/x.iso")), ["-device", "virtio-scsi-pci,id=scsi0",
                                    "-drive", "if=none,id=cd0,media=cdrom,readonly=on,format=raw,file=/o/x.iso",
                                    "-device", "scsi-cd,bus=scsi0.0,drive=cd0", "-nic", "none"]),
    (dict(disk=Path("/o/x.img")), ["-drive", "file=/o/x.img,format=raw,if=virtio,snapshot=on", "-nic", "none"]),
])
def test_uefi_arm64_argv(kwargs, tail):
    argv = qemu.uefi_arm64_argv(LOG, Path("/w/AAVMF_VARS.fd"), **kwargs)
    assert argv[:7] == ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", "-accel", "tcg"]
    assert argv[-len(tail) - 4:-len(tail)] == ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={qemu.AAVMF_CODE}",
                                               "-drive", "if=pflash,format=raw,unit=1,file=/w/AAVMF_VARS.fd"]
    assert argv[-len(tail):] == tail


def test_fresh_vars_copies_the_template(tmp_path):
    for template in (qemu.OVMF_VARS, qemu.AAVMF_VARS):
        copy = qemu.fresh_vars(tmp_path, template)
        assert copy.parent == tmp_path and copy.read_bytes() == template.read_bytes()


@pytest.mark.parametrize("env, arch, expected", [
    ({"KAIROS_BOOT_ACCEL": "tcg"}, "amd64", "tcg"),
    ({"KAIROS_BOOT_ACCEL": "kvm"}, "amd64", "kvm"),
    ({"KAIROS_BOOT_ACCEL": " tcg "}, "arm64", "tcg"),
    ({}, "arm64", "tcg"),                          # foreign guests never use KVM: no probe either
])
def test_accelerator_choice(env, arch, expected):
    assert qemu.accelerator(arch, env) == expected


@pytest.mark.parametrize("env, arch, message", [
    ({"KAIROS_BOOT_ACCEL": "hvf"}, "amd64", "KAIROS_BOOT_ACCEL=hvf: expected one of kvm, tcg"),
    ({"KAIROS_BOOT_ACCEL": "kvm"}, "arm64", "arm64 guests cannot use KVM"),
])
def test_accelerator_bad_choice(env, arch, message):
    with pytest.raises(UsageError, match=message):
        qemu.accelerator(arch, env)


def test_kvm_probes_pass_where_the_accelerator_works(tmp_path):
    """The probes' markers are right: under TCG (which works everywhere) both probe boots pass,
    so a failing probe under KVM means KVM, not the probe."""
    shutil.copyfile(qemu.OVMF_VARS, tmp_path / qemu.OVMF_VARS.name)
    for argv, log, wanted in qemu.probe_argvs(tmp_path):
        argv = [a if a != "kvm" else "tcg" for a in argv]
        assert qemu._probe(argv, log, wanted, 60), f"{wanted!r} not in {log.name}: {qemu._read(log)[-500:]}"


def test_a_probe_fails_when_qemu_exits(tmp_path):
    argv, log, wanted = qemu.probe_argvs(tmp_path)[0]
    argv = [a if a != "kvm" else "tcg" for a in argv] + ["-no-such-option"]
    assert not qemu._probe(argv, log, wanted, 60)


def test_qemus_own_error_ends_the_serial_log(tmp_path):
    log = tmp_path / "serial.log"
    result = qemu.boot([*qemu.x86_argv(log), "-no-such-option"], log, ("login:",), 30)
    assert not result.passed and result.seconds < 30
    assert "[qemu] qemu-system-x86_64: -no-such-option: invalid option" in result.serial


def test_software_tpm_runs_swtpm_while_in_use(tmp_path):
    """A real swtpm, for a work directory deeper than a unix socket's path may be (107 bytes): its
    control socket is there inside the block (under /tmp), its state and log in the work directory,
    and the process and the socket's directory are gone after."""
    assert qemu.swtpm_argv(tmp_path / "st", tmp_path / "s.sock") == [
        "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tmp_path / 'st'}", "--ctrl",
        f"type=unixio,path={tmp_path / 's.sock'}", "--terminate"]
    work = tmp_path / ("deep-" * 30) / "boot"
    work.mkdir(parents=True)
    assert len(str(work / "swtpm.sock")) > 107
    with qemu.software_tpm(work) as socket:
        assert socket.is_socket() and len(str(socket)) <= 107
        assert (work / "swtpm.state").is_dir() and (work / "swtpm.log").is_file()
        running = subprocess.run(["pgrep", "-f", f"path={socket}"], capture_output=True, text=True).stdout.split()
        assert len(running) == 1
    assert subprocess.run(["pgrep", "-f", f"path={socket}"], capture_output=True).returncode == 1
    assert not socket.parent.exists()