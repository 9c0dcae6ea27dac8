"""qemu: boot an artifact with its serial console in a file and watch it for the login prompt.

Pure argv builders (one per way of booting) and one runner, `boot()`, which starts qemu,
polls the serial log until every wanted marker is there (a boot is the login prompt and the
build's own stem from /etc/issue, never "the kernel started"), or qemu exits, or the timeout
passes, and always kills qemu.

The accelerator (`accelerator()`): KVM for amd64 guests when /dev/kvm works, else TCG. "Works"
is measured, not assumed: on nested machines /dev/kvm opens but OVMF stops with `KVM internal
error` and iPXE's option ROM hangs, so two short probe boots (OVMF to its boot manager, SeaBIOS
through iPXE to `No bootable device`) must pass under KVM first. `KAIROS_BOOT_ACCEL=kvm|tcg`
overrides the probe.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..run import UsageError, require_tool, say

LOGIN = "login:"
# serial output after which no login prompt will come: stop waiting at once
FAILURES = ("Kernel panic", "Entering emergency mode", "emergency shell", "(initramfs)", "Could not boot",
            "dracut: FATAL", "reboot: System halted", "reboot: Power down",
            "Access Denied", "Security Violation")  # the last two: Secure Boot refused the binary
# qemu stopped the guest: nothing more will come on the serial console
STOPPED = ("KVM internal error",)
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")    # Debian package ovmf
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
OVMF_SECBOOT_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")  # needs SMM: q35,smm=on
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")    # Debian package qemu-efi-aarch64
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
FIRMWARE_PACKAGES = {OVMF_CODE: "ovmf", OVMF_SECBOOT_CODE: "ovmf", AAVMF_CODE: "qemu-efi-aarch64"}
SECURE_BOOT_ON = "Secure boot enabled"    # the kernel's line when the firmware enforced Secure Boot
SERIAL = {"amd64": "ttyS0", "arm64": "ttyAMA0"}  # the emulated machines' serial consoles
POLL_SECONDS = 1.0
ACCEL_ENV = "KAIROS_BOOT_ACCEL"
ACCELS = ("kvm", "tcg")
PROBE_SECONDS = 20


@dataclass(frozen=True)
class Boot:
    """What one boot showed."""

    passed: bool
    seconds: float
    serial: str          # the whole serial log (\r removed)
    argv: tuple[str, ...]

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.serial.rstrip().splitlines()[-lines:])


def _common(accel: str, memory: int, log: Path) -> list[str]:
    return ["-accel", accel, "-m", str(memory), "-display", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{log}"]


def x86_argv(log: Path, *, accel: str = "tcg", memory: int = 2048, cdrom: Path | None = None,
             disk: Path | None = None, uefi_vars: Path | None = None, ovmf_code: Path = OVMF_CODE,
             net: bool = False, secure_boot: bool = False, tpm: Path | None = None) -> list[str]:
    """qemu-system-x86_64 booting a CD-ROM or a raw disk (pure); BIOS unless ``uefi_vars`` (a
    writable copy of OVMF's VARS) is given; ``secure_boot``: OVMF's Secure Boot build, which
    needs SMM (q35) and a flash that only SMM code may write; ``tpm``: the control socket of a
    software TPM 2.0 (`software_tpm`) as the machine's TIS TPM. Disks are opened with
    snapshot=on: a boot never writes into the artifact."""
    argv = ["qemu-system-x86_64", *_common(accel, memory, log)]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if secure_boot:
        argv += ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on"]
        ovmf_code = OVMF_SECBOOT_CODE
    if uefi_vars is not None:
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf_code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={uefi_vars}"]
    if cdrom is not None:
        argv += ["-cdrom", str(cdrom), "-boot", "d"]
    if disk is not None:
        argv += ["-drive", f"file={disk},format=raw,if=virtio,snapshot=on"]
    if tpm is not None:
        argv += ["-chardev", f"socket,id=chrtpm,path={tpm}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", "tpm-tis,tpmdev=tpm0"]
    argv += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"] if net else ["-nic", "none"]
    return argv


def swtpm_argv(state: Path, socket: Path) -> list[str]:
    """swtpm as a TPM 2.0 for one qemu (pure): state in ``state``, control on the unix socket
    ``socket``, gone when qemu disconnects."""
    return ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl", f"type=unixio,path={socket}",
            "--terminate"]


@contextlib.contextmanager
def software_tpm(work: Path, wait: float = 10.0):
    """A fresh software TPM (swtpm, Debian package swtpm) for one boot; yields its control socket
    (for `x86_argv(tpm=socket)`). Its state and log go to ``work`` (`swtpm.state/`, `swtpm.log`);
    the socket to a new directory under /tmp, because a unix socket's path may not exceed 107
    bytes and ``work`` can be deeper. Always stopped (and the socket directory removed) afterwards."""
    require_tool("swtpm", "give the Secure Boot machine a TPM 2.0 (Debian package swtpm)")
    state, log = Path(work) / "swtpm.state", Path(work) / "swtpm.log"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    folder = Path(tempfile.mkdtemp(prefix="kairos-swtpm-", dir="/tmp"))
    socket = folder / "swtpm.sock"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(swtpm_argv(state, socket), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + wait
            while not socket.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if not socket.exists():
                raise UsageError(f"swtpm did not start: {_read(log).strip()[-500:] or 'no output'}")
            yield socket
        finally:
            proc.kill()
            proc.wait(timeout=30)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _virt(log: Path, memory: int) -> list[str]:
    return ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", *_common("tcg", memory, log)]


def virt_arm64_argv(log: Path, kernel: Path, initrd: Path, append: str, *, disk: Path | None = None,
                    memory: int = 2048) -> list[str]:
    """qemu-system-aarch64 -M virt with a direct kernel boot (pure): the kernel, initrd and command
    line taken from an image's boot partition, the image itself as the virtio disk."""
    argv = [*_virt(log, memory), "-kernel", str(kernel), "-initrd", str(initrd), "-append", append, "-nic", "none"]
    if disk is not None:
        argv += ["-drive", f"file={disk},format=raw,if=virtio,snapshot=on"]
    return argv


def uefi_arm64_argv(log: Path, uefi_vars: Path, *, cdrom: Path | None = None, disk: Path | None = None,
                    memory: int = 2048, aavmf_code: Path = AAVMF_CODE) -> list[str]:
    """qemu-system-aarch64 -M virt booting a CD-ROM (virtio-scsi) or a raw disk under AAVMF, the
    arm64 UEFI firmware (pure); ``uefi_vars`` is a writable copy of AAVMF's VARS."""
    argv = [*_virt(log, memory),
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={aavmf_code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={uefi_vars}"]
    if cdrom is not None:
        argv += ["-device", "virtio-scsi-pci,id=scsi0",
                 "-drive", f"if=none,id=cd0,media=cdrom,readonly=on,format=raw,file={cdrom}",
                 "-device", "scsi-cd,bus=scsi0.0,drive=cd0"]
    if disk is not None:
        argv += ["-drive", f"file={disk},format=raw,if=virtio,snapshot=on"]
    return argv + ["-nic", "none"]


def serial_cmdline(cmdline: str, arch: str) -> str:
    """``cmdline`` with its console= arguments replaced by the emulated machine's serial console
    (pure): a Raspberry Pi's mini UART (ttyS1) is not there on qemu's virt machine."""
    args = [a for a in cmdline.split() if not a.startswith("console=")]
    return " ".join([*args, f"console={SERIAL[arch]}"])


def fresh_vars(workdir: Path, template: Path = OVMF_VARS) -> Path:
    """A writable copy of a UEFI firmware's variable store (OVMF's unless ``template``) for one boot."""
    code = {OVMF_VARS: OVMF_CODE, AAVMF_VARS: AAVMF_CODE}.get(template)
    if code is not None and not (code.is_file() and template.is_file()):
        raise UsageError(f"cannot find the UEFI firmware {code}; install Debian package {FIRMWARE_PACKAGES[code]}")
    copy = Path(workdir) / template.name
    shutil.copyfile(template, copy)
    return copy


def enrol_argv(out: Path, guid: str, pk: Path, kek: Path, db: Path, template: Path = OVMF_VARS) -> list[str]:
    """virt-fw-vars writing a copy of OVMF's VARS with PK, KEK and db enrolled and Secure Boot
    on (pure): the state of a machine whose owner has enrolled these keys."""
    return ["virt-fw-vars", "--input", str(template), "--output", str(out), "--set-pk", guid, str(pk),
            "--add-kek", guid, str(kek), "--add-db", guid, str(db), "--secure-boot"]


# --- the accelerator -----------------------------------------------------------------------

def probe_argvs(workdir: Path) -> list[tuple[list[str], Path, str]]:
    """The KVM probes (pure but for the paths): (argv, log, what the log shows when the probe passed).
    OVMF reaching its boot manager, and SeaBIOS running virtio-net's iPXE ROM to its end."""
    vars_copy = workdir / OVMF_VARS.name
    ovmf = ["qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-display", "none", "-monitor", "none",
            "-no-reboot", "-nodefaults", "-serial", f"file:{workdir / 'ovmf.log'}",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    ipxe = ["qemu-system-x86_64", "-accel", "kvm", "-m", "256", "-display", "none", "-monitor", "none",
            "-no-reboot", "-nodefaults", "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0", "-boot", "n",
            "-chardev", f"file,id=dbg,path={workdir / 'seabios.log'}", "-device", "isa-debugcon,iobase=0x402,chardev=dbg"]
    return [(ovmf, workdir / "ovmf.log", "BdsDxe"), (ipxe, workdir / "seabios.log", "No bootable device")]


def _probe(argv: list[str], log: Path, wanted: str, timeout: float) -> bool:
    err = log.with_suffix(".err")
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout and proc.poll() is None:
            time.sleep(0.25)
            if wanted in _read(log):
                return not any(s in _read(err) for s in STOPPED)
            if any(s in _read(err) for s in STOPPED):
                return False
        return False
    finally:
        proc.kill()
        proc.wait(timeout=30)


def kvm_works(timeout: float = PROBE_SECONDS) -> bool:
    """Whether amd64 guests run under KVM here: /dev/kvm opens read-write and both probes pass."""
    if platform.machine() != "x86_64" or not os.access("/dev/kvm", os.R_OK | os.W_OK) \
            or not shutil.which("qemu-system-x86_64") or not OVMF_CODE.is_file():
        return False
    with tempfile.TemporaryDirectory(prefix="kairos-kvm-probe-") as tmp:
        work = Path(tmp)
        shutil.copyfile(OVMF_VARS, work / OVMF_VARS.name)
        return all(_probe(argv, log, wanted, timeout) for argv, log, wanted in probe_argvs(work))


@functools.cache
def _kvm_works() -> bool:
    works = kvm_works()
    say(f"    /dev/kvm: {'KVM works' if works else 'KVM unusable here (probe boots failed)'}; amd64 boots use "
        f"{'kvm' if works else 'tcg'} (set {ACCEL_ENV}=kvm|tcg to choose)")
    return works


def accelerator(arch: str, environ=os.environ) -> str:
    """kvm or tcg for a guest of ``arch`` on this machine (the probe runs once per process)."""
    chosen = environ.get(ACCEL_ENV, "").strip()
    if chosen:
        if chosen not in ACCELS:
            raise UsageError(f"{ACCEL_ENV}={chosen}: expected one of {', '.join(ACCELS)}")
        if chosen == "kvm" and arch != "amd64":
            raise UsageError(f"{ACCEL_ENV}=kvm: {arch} guests cannot use KVM on this amd64 host; unset it or use tcg")
        return chosen
    return "kvm" if arch == "amd64" and _kvm_works() else "tcg"


def _read(log: Path) -> str:
    try:
        return log.read_bytes().decode("utf-8", "replace").replace("\r", "")
    except FileNotFoundError:
        return ""


def boot(argv: list[str], log: Path, wanted: tuple[str, ...], timeout: float,
         failures: tuple[str, ...] = FAILURES) -> Boot:
    """Run ``argv`` until the serial log ``log`` holds every string of ``wanted`` (passed), or one
    of ``failures``, or qemu exits, or ``timeout`` seconds pass; qemu is killed in every case."""
    require_tool(argv[0], "boot the artifact in an emulator")
    log = Path(log)
    log.unlink(missing_ok=True)
    err = log.with_name(log.name + ".stderr")
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    started = time.monotonic()
    passed = False
    try:
        while time.monotonic() - started < timeout:
            time.sleep(POLL_SECONDS)
            text = _read(log)
            if all(w in text for w in wanted):
                passed = True
                break
            if proc.poll() is not None or any(f in text for f in failures) or any(s in _read(err) for s in STOPPED):
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    serial, qemu_err = _read(log), _read(err).strip()
    if qemu_err and not passed:  # qemu's own complaint (bad option, KVM error) ends the log
        serial += "\n[qemu] " + "\n[qemu] ".join(qemu_err.splitlines()[-5:])
    return Boot(passed, time.monotonic() - started, serial, tuple(argv))
