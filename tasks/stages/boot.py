"""boot: a bootable artifact is only done when it boots. Each one of a build is booted in
qemu until the serial console shows the login prompt under the `/etc/issue` line naming the
build's stem (`Kairos <stem> (<tty>)`), or the build fails with the last serial lines.

What boots how (`plan()`; the flavor's `boot: {timeout, firmware, memory}`):
- `<stem>.iso` (amd64): from CD-ROM under each of `boot.firmware` (`bios`: SeaBIOS, `uefi`: OVMF);
- `<stem>.iso` (arm64): from a virtio-scsi CD-ROM on qemu's `virt` machine under AAVMF (UEFI only);
- `<stem>.img`, generic amd64: as a virtio disk under OVMF;
- `<stem>-uki.iso`: under OVMF's Secure Boot build (q35 with SMM) with the flavor's PK, KEK and
  db enrolled (virt-fw-vars) and a fresh software TPM 2.0 (swtpm), into whose PCR 11 the
  stub and systemd measure; the kernel must also print `Secure boot enabled`; 4 GiB at least;
- `<stem>.img`, rpi3/rpi4: qemu's `virt` machine has no Raspberry Pi firmware, so the kernel,
  initrd and `cmdline.txt` are read from the image's own boot partition (console moved to
  virt's serial port) and the image is the disk: the root comes from its COS_STATE partition;
- `<stem>-ipxe.iso`: with user networking, when `netboot_url` is `http://10.0.2.2:PORT` (qemu's
  address of this machine): an HTTP server on 127.0.0.1:PORT serves outputs/<version>/ while it
  boots. Any other netboot_url is served elsewhere: that boot is recorded as skipped.
amd64 guests run under KVM when it works here, else under TCG (`qemu.accelerator()`; on the
machines this is tested on /dev/kvm opens but fails, so TCG); arm64 guests under TCG.

Writes `<stem>-boot.json` (per boot: artifact, firmware, passed, seconds to the login prompt,
the qemu command line, the last serial lines; skipped boots with the reason) and
`<stem>-boot.log` (every serial log). The first failed boot fails the task (a boot stops early
when the console shows a failure such as `dracut: FATAL` or a kernel panic); nothing is then
written to outputs, the serial logs stay under the state directory and the message names them.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..builders import native_raw
from ..graph import Context, action, task
from ..matrix import Build
from ..run import KairosError, UsageError, run, say
from ..state import Paths, atomic_path, checksum_path
from ..tools import qemu

STAGE_VERSION = 1
QEMU_HOST = "10.0.2.2"  # this machine as qemu's user network sees it
SERIAL_TAIL = 25


@dataclass(frozen=True)
class Step:
    """One boot: which artifact (kind and file suffix), under what, or why it is skipped."""

    kind: str
    suffix: str
    how: str                  # bios, uefi, virt (rpi: direct kernel boot), netboot
    skip: str | None = None

    @property
    def name(self) -> str:
        return f"{self.suffix.lstrip('.-')}-{self.how}"


def netboot_port(url: str | None) -> int | None:
    """The port of an `http://10.0.2.2:PORT` netboot_url (pure), else None."""
    m = re.fullmatch(rf"http://{re.escape(QEMU_HOST)}:(\d+)(/.*)?", url or "")
    return int(m[1]) if m and not (m[2] or "").strip("/") else None


def plan(b: Build) -> list[Step]:
    """Every boot of ``b`` (pure), in order."""
    steps = []
    if "iso" in b.kinds:
        if b.arch == "amd64":
            steps += [Step("iso", ".iso", fw) for fw in b.flavor.boot.firmware]
        else:  # arm64 ISOs are EFI only
            steps.append(Step("iso", ".iso", "uefi"))
    if "raw" in b.kinds:
        if b.device != "generic":
            steps.append(Step("raw", ".img", "virt"))
        elif b.arch == "amd64":
            steps.append(Step("raw", ".img", "uefi"))
        else:
            steps.append(Step("raw", ".img", "uefi", skip=f"booting generic {b.arch} raw images is not supported yet"))
    if "uki" in b.kinds:  # the owner's keys enrolled, Secure Boot on: only what db signed may start
        steps.append(Step("uki", "-uki.iso", "secureboot"))
    if "ipxe" in b.kinds:
        skip = None if netboot_port(b.flavor.netboot_url) else \
            (f"netboot_url {b.flavor.netboot_url} is not http://{QEMU_HOST}:PORT, qemu's address of this machine: "
             "the netboot files are served elsewhere")
        steps.append(Step("ipxe", "-ipxe.iso", "netboot", skip=skip))
    return steps


UKI_MEMORY = 4096  # MiB at least for a UKI: its initrd is the whole root file system, unpacked into RAM


def login_markers(b: Build, step: Step | None = None) -> tuple[str, ...]:
    """The serial lines of a successful boot (pure): this build's /etc/issue line, then the prompt;
    under Secure Boot also the kernel's word that the firmware enforced it."""
    markers = (f"Kairos {b.stem} ({qemu.SERIAL[b.arch]})", qemu.LOGIN)
    return (qemu.SECURE_BOOT_ON, *markers) if step is not None and step.how == "secureboot" else markers


def inputs(paths: Paths, b: Build) -> list[Path]:
    """The checksum files of every artifact booted: a changed artifact boots again."""
    return [checksum_path(paths.artifact(b, s.suffix)) for s in plan(b) if not s.skip]


def key(b: Build) -> str:
    opts = b.flavor.boot
    return json.dumps({"plan": [[s.kind, s.how, s.skip] for s in plan(b)], "timeout": opts.timeout,
                       "memory": opts.memory, "markers": login_markers(b), "netboot_url": b.flavor.netboot_url,
                       "stage": STAGE_VERSION}, sort_keys=True)


# --- actions --------------------------------------------------------------------------

def rpi_boot_files(img: Path, work: Path) -> tuple[Path, Path, str]:
    """Kernel, initrd and command line from the first (FAT) partition of a Raspberry Pi image."""
    table = json.loads(run(["sfdisk", "-J", str(img)], capture=True, what=f"read the partitions of {img.name}"))
    start = table["partitiontable"]["partitions"][0]["start"] * 512
    files = {}
    for name in (native_raw.KERNEL_NAME, native_raw.INITRD_NAME, native_raw.CMDLINE_NAME):
        files[name] = work / name
        run(["mcopy", "-n", "-i", f"{img}@@{start}", f"::/{name}", str(files[name])],
            what=f"read {name} from {img.name}")
    kernel, initrd, cmdline = files.values()
    return kernel, initrd, cmdline.read_text()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, fmt, *args):
        pass


@contextmanager
def serving(directory: Path, port: int):
    """An HTTP server on 127.0.0.1:``port`` serving ``directory`` (for netboots)."""
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_Quiet, directory=str(directory)))
    except OSError as exc:
        raise UsageError(f"cannot serve the netboot files on 127.0.0.1:{port} ({exc.strerror}); "
                         "free that port or change netboot_url") from None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        yield
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def argv_for(paths: Paths, b: Build, step: Step, log: Path, work: Path, tpm: Path | None = None) -> list[str]:
    """qemu's argv for one boot step; ``tpm``: swtpm's control socket (secureboot)."""
    memory = b.flavor.boot.memory
    artifact = paths.artifact(b, step.suffix)
    media = {"cdrom": artifact} if step.kind in ("iso", "ipxe", "uki") else {"disk": artifact}
    if step.how == "virt":
        kernel, initrd, cmdline = rpi_boot_files(artifact, work)
        return qemu.virt_arm64_argv(log, kernel, initrd, qemu.serial_cmdline(cmdline, b.arch), disk=artifact,
                                    memory=memory)
    if b.arch == "arm64":
        return qemu.uefi_arm64_argv(log, qemu.fresh_vars(work, qemu.AAVMF_VARS), memory=memory, **media)
    if step.how == "secureboot":
        keys = b.flavor.trusted_boot.keys
        enrolled = work / "OVMF_VARS.enrolled.fd"
        run(qemu.enrol_argv(enrolled, (keys / "GUID.txt").read_text().strip(), keys / "PK.crt", keys / "KEK.crt",
                            keys / "db.crt"), what="enrol the Secure Boot keys into OVMF's variables")
        return qemu.x86_argv(log, accel=qemu.accelerator(b.arch), memory=max(memory, UKI_MEMORY), uefi_vars=enrolled,
                             secure_boot=True, tpm=tpm, **media)
    uefi = qemu.fresh_vars(work) if step.how == "uefi" else None
    return qemu.x86_argv(log, accel=qemu.accelerator(b.arch), memory=memory, uefi_vars=uefi,
                         net=step.how == "netboot", **media)


def boot_one(paths: Paths, b: Build, step: Step, work: Path) -> qemu.Boot:
    log = work / f"{step.name}.log"
    with contextlib.ExitStack() as stack:
        tpm = stack.enter_context(qemu.software_tpm(work)) if step.how == "secureboot" else None
        argv = argv_for(paths, b, step, log, work, tpm)
        say(f"    booting {paths.artifact(b, step.suffix).name} ({step.how}); waiting up to "
            f"{b.flavor.boot.timeout}s for the login prompt")
        if step.how == "netboot":
            stack.enter_context(serving(paths.version_dir(b.flavor.version), netboot_port(b.flavor.netboot_url)))
        result = qemu.boot(argv, log, login_markers(b, step), b.flavor.boot.timeout)
    say(f"    {step.name}: {'login prompt' if result.passed else 'NO login prompt'} after {result.seconds:.0f}s")
    return result


def record(paths: Paths, b: Build, step: Step, result: qemu.Boot | None) -> dict:
    out = {"artifact": paths.artifact(b, step.suffix).name, "firmware": step.how}
    if result is None:
        return dict(out, passed=None, skipped=step.skip)
    accel = result.argv[result.argv.index("-accel") + 1]
    return dict(out, passed=result.passed, seconds=round(result.seconds, 1), accel=accel, qemu=" ".join(result.argv),
                last_serial_lines=result.tail(SERIAL_TAIL).splitlines())


def boot(paths: Paths, b: Build) -> None:
    work = paths.boot_logs(b)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    records, logs = [], []
    for step in plan(b):
        if step.skip:
            say(f"    {step.name}: skipped: {step.skip}")
            records.append(record(paths, b, step, None))
            continue
        result = boot_one(paths, b, step, work)
        records.append(record(paths, b, step, result))
        logs.append(f"===== {step.name}: {' '.join(result.argv)}\n{result.serial}")
        if not result.passed:  # the first failure fails the build: no need to boot the rest
            why = f"stopped before the login prompt of {b.stem}" \
                if any(f in result.serial for f in qemu.FAILURES + qemu.STOPPED) \
                else f"did not reach the login prompt of {b.stem} within {b.flavor.boot.timeout}s"
            if "-accel kvm" in " ".join(result.argv):
                why += f" under KVM (if KVM misbehaves here, {qemu.ACCEL_ENV}=tcg boots under TCG)"
            raise KairosError(f"{paths.artifact(b, step.suffix).name} ({step.how}) {why} (serial logs in {work}); "
                              "last serial lines:\n" + "\n".join("    " + l for l in result.tail(SERIAL_TAIL).splitlines()))
    report, serial = paths.outputs_of(b, "boot")
    with atomic_path(serial) as tmp:
        tmp.write_text("\n".join(logs))
    with atomic_path(report) as tmp:
        tmp.write_text(json.dumps({"stem": b.stem, "boots": records}, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def results(paths: Paths, b: Build) -> list[dict]:
    """The boots recorded in `<stem>-boot.json` (for the manifest)."""
    report, _ = paths.outputs_of(b, "boot")
    return json.loads(report.read_text())["boots"]


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        steps = ", ".join(f"{s.name}{' (skipped)' if s.skip else ''}" for s in plan(b))
        yield task(b.stem, f"boot {b.stem} to its login prompt: {steps}", action(boot, ctx.paths, b),
                   file_dep=inputs(ctx.paths, b), targets=ctx.paths.targets_of(b, kind), key=key(b))
