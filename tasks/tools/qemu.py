"""qemu: boot an artifact with its serial console in a file and watch it for the login prompt.

Pure argv builders (one per way of booting) and one runner, `boot()`, which starts qemu,
polls the serial log until every wanted marker is there (a boot is the login prompt and the
build's own stem from /etc/issue, never "the kernel started"), or qemu exits, or the timeout
passes, and always kills qemu. The accelerator is the caller's (KVM opens but fails on the
machines this is tested on: tcg there).
"""
from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..run import require_tool

LOGIN = "login:"
# serial output after which no login prompt will come: stop waiting at once
FAILURES = ("Kernel panic", "Entering emergency mode", "emergency shell", "(initramfs)", "Could not boot",
            "dracut: FATAL", "reboot: System halted", "reboot: Power down")
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SERIAL = {"amd64": "ttyS0", "arm64": "ttyAMA0"}  # the emulated machines' serial consoles
POLL_SECONDS = 1.0


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
             net: bool = False) -> list[str]:
    """qemu-system-x86_64 booting a CD-ROM or a raw disk (pure); BIOS unless ``uefi_vars`` (a
    writable copy of OVMF's VARS) is given. Disks are opened with snapshot=on: a boot never
    writes into the artifact."""
    argv = ["qemu-system-x86_64", *_common(accel, memory, log)]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if uefi_vars is not None:
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf_code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={uefi_vars}"]
    if cdrom is not None:
        argv += ["-cdrom", str(cdrom), "-boot", "d"]
    if disk is not None:
        argv += ["-drive", f"file={disk},format=raw,if=virtio,snapshot=on"]
    argv += ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"] if net else ["-nic", "none"]
    return argv


def virt_arm64_argv(log: Path, kernel: Path, initrd: Path, append: str, *, disk: Path | None = None,
                    memory: int = 2048) -> list[str]:
    """qemu-system-aarch64 -M virt with a direct kernel boot (pure): the kernel, initrd and command
    line taken from an image's boot partition, the image itself as the virtio disk."""
    argv = ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57", *_common("tcg", memory, log),
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append, "-nic", "none"]
    if disk is not None:
        argv += ["-drive", f"file={disk},format=raw,if=virtio,snapshot=on"]
    return argv


def serial_cmdline(cmdline: str, arch: str) -> str:
    """``cmdline`` with its console= arguments replaced by the emulated machine's serial console
    (pure): a Raspberry Pi's mini UART (ttyS1) is not there on qemu's virt machine."""
    args = [a for a in cmdline.split() if not a.startswith("console=")]
    return " ".join([*args, f"console={SERIAL[arch]}"])


def fresh_vars(workdir: Path, template: Path = OVMF_VARS) -> Path:
    """A writable copy of OVMF's variable store for one boot."""
    copy = Path(workdir) / "OVMF_VARS.fd"
    shutil.copyfile(template, copy)
    return copy


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
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    passed = False
    try:
        while time.monotonic() - started < timeout:
            time.sleep(POLL_SECONDS)
            text = _read(log)
            if all(w in text for w in wanted):
                passed = True
                break
            if proc.poll() is not None or any(f in text for f in failures):
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return Boot(passed, time.monotonic() - started, _read(log), tuple(argv))
