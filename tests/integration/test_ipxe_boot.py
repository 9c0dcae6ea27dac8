"""iPXE netboot on real tools: `doit ipxe:<stem>` builds the script, the iPXE ISO and the
USB disk image; qemu boots each with user networking, iPXE runs the embedded script and
fetches kernel and initrd from an HTTP server of this test on 127.0.0.1 (the guest sees
it as 10.0.2.2); from the ISO the system boots on to its login prompt (the initrd fetches the
squashfs from the same server), from the USB image as far as the kernel with the script's
command line.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from tasks.config import load_flavors
from tasks.matrix import expand

from tests.harness import LZ4, Workspace, builtin_doc, write_flavor

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 240
KVM_BUDGET = 30  # /dev/kvm may open yet fail (nested virt): no kernel by then -> TCG
SUFFIXES = (".ipxe", "-ipxe.iso", "-ipxe-usb.img")


class Recorder(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; remembers every request path (server.requests)."""

    def do_GET(self):  # noqa: N802 - http.server naming
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass


class Server:
    def __init__(self, directory: Path):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Recorder, directory=str(directory)))
        self.httpd.requests = []
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    def start(self):
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def netboot(tmp_path_factory, ns, bases):
    """A workspace with one builtin-converter flavor listing ipxe, built with `doit ipxe:<stem>`,
    and an HTTP server (127.0.0.1 only) serving its outputs/<version>/."""
    root = tmp_path_factory.mktemp("ipxe")
    ws = Workspace(root=root, ns=ns)
    served = ws.outputs / "v3.1.0"
    server = Server(served)  # bound first: its port goes into netboot_url
    write_flavor(ws.flavors / "netboot.yaml", builtin_doc(
        "debian", bases["b"], f"{ns}/kairos", ["kernel", "initrd", "squashfs", "ipxe"], squashfs=LZ4,
        netboot_url=f"http://10.0.2.2:{server.port}"))
    (b,) = expand(load_flavors([ws.flavors]))
    started = time.monotonic()
    result = ws.doit(f"ipxe:{b.stem}")
    assert result.rc == 0, result.err
    print(f"doit ipxe:{b.stem}: {time.monotonic() - started:.0f}s")
    server.start()
    try:
        yield ws, b, server, result
    finally:
        server.stop()


_ACCEL = {"kvm_broken": not os.access("/dev/kvm", os.R_OK | os.W_OK)}


def kernel_started(text: str) -> bool:
    return "Linux version" in text and "Command line:" in text.split("Linux version", 1)[1]


def logged_in(stem: str):
    """The booted system's login prompt under its /etc/issue line naming this build."""
    return lambda text: f"Kairos {stem} (ttyS0)" in text and "login:" in text.split(f"Kairos {stem} (ttyS0)", 1)[1]


def boot(media: list[str], log: Path, server: Server, stem: str, until=kernel_started) -> tuple[str, list[str], str]:
    """Boot qemu until ``until(serial log)`` holds; return (serial log, HTTP requests, accelerator).
    KVM first when usable, else (or when KVM fails) TCG. 2 GiB: dracut's livenet loads the whole
    squashfs into memory."""
    for accel in ("kvm", "tcg"):
        if accel == "kvm" and _ACCEL["kvm_broken"]:
            continue
        server.requests.clear()
        log.unlink(missing_ok=True)
        err = log.with_suffix(".qemu")
        argv = ["qemu-system-x86_64", "-accel", accel, "-m", "2048", "-display", "none", "-no-reboot",
                "-serial", f"file:{log}", "-monitor", "none", "-netdev", "user,id=n0",
                "-device", "e1000,netdev=n0", *media]
        print("+ " + " ".join(argv))
        with open(err, "wb") as err_fh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err_fh, stderr=subprocess.STDOUT)
        kvm_failed = False
        started = time.monotonic()
        budget = KVM_BUDGET if accel == "kvm" else BOOT_TIMEOUT
        try:
            while True:
                if time.monotonic() - started > budget:
                    kvm_failed = accel == "kvm"
                    break
                time.sleep(1)
                text = log.read_text(errors="replace") if log.exists() else ""
                if until(text):
                    break
                qemu_out = err.read_text(errors="replace")
                if accel == "kvm" and ("KVM internal error" in qemu_out or "failed to initialize kvm" in qemu_out
                                       or proc.poll() is not None):
                    kvm_failed = True
                    break
                if proc.poll() is not None:
                    break
        finally:
            proc.kill()
            proc.wait(timeout=30)
        if kvm_failed:
            why = err.read_text(errors="replace").strip()[:200] or f"no kernel within {KVM_BUDGET}s"
            print(f"KVM is not usable here ({why}); using TCG")
            _ACCEL["kvm_broken"] = True
            continue
        elapsed = time.monotonic() - started
        text = log.read_text(errors="replace") if log.exists() else ""
        print(f"{accel}: {elapsed:.0f}s; requests: {server.requests}")
        return text, list(server.requests), accel
    raise AssertionError("unreachable: TCG always runs")


def kernel_lines(text: str) -> list[str]:
    return [l.strip() for l in text.splitlines() if "Linux version" in l or "Command line:" in l]


def check_boot(text: str, requests: list[str], stem: str, port: int) -> None:
    assert f"/{stem}-kernel" in requests, f"iPXE did not fetch the kernel; requests: {requests}\n{text[-2000:]}"
    assert f"/{stem}-initrd" in requests, f"iPXE did not fetch the initrd; requests: {requests}"
    assert requests.index(f"/{stem}-kernel") < requests.index(f"/{stem}-initrd")
    lines = kernel_lines(text)
    print("\n".join(lines))
    assert any("Linux version" in l for l in lines), text[-3000:]
    # the kernel got the script's command line, with ${config} defaulted by the script
    cmdlines = [l.split("Command line:", 1)[1] for l in lines if "Command line:" in l]
    assert cmdlines, text[-3000:]
    cmdline = cmdlines[0]
    url = f"http://10.0.2.2:{port}"
    assert f"root=live:{url}/{stem}.squashfs" in cmdline
    assert f"config_url={url}/config.yaml" in cmdline
    assert "install-mode" in cmdline and "rd.live.overlay.overlayfs" in cmdline


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_and_checksums(netboot):
    ws, b, server, result = netboot
    out = ws.outputs / "v3.1.0"
    assert f"ipxe:{b.stem}" in result.executed
    for suffix in SUFFIXES:
        f = out / (b.stem + suffix)
        digest, name = (out / (f.name + ".sha256")).read_text().split()
        assert name == f.name and digest == sha256(f)
    assert not [p for p in out.iterdir() if ".partial-" in p.name]


def test_script_names_the_served_files(netboot):
    ws, b, server, _ = netboot
    url = f"http://10.0.2.2:{server.port}"
    text = (ws.outputs / "v3.1.0" / f"{b.stem}.ipxe").read_text()
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    assert text.startswith("#!ipxe\n")
    assert lines[0] == "dhcp"
    assert lines[1] == f"isset ${{config}} || set config {url}/config.yaml"
    assert lines[2].startswith(f"kernel {url}/{b.stem}-kernel root=live:{url}/{b.stem}.squashfs ")
    assert "config_url=${config}" in lines[2]
    assert lines[3:] == [f"initrd {url}/{b.stem}-initrd", "boot"]
    for suffix in ("-kernel", "-initrd", ".squashfs"):
        assert (ws.outputs / "v3.1.0" / f"{b.stem}{suffix}").is_file()


def test_usb_image_layout(netboot, tmp_path):
    ws, b, _, _ = netboot
    img = ws.outputs / "v3.1.0" / f"{b.stem}-ipxe-usb.img"
    table = json.loads(subprocess.run(["sfdisk", "-J", str(img)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["start"] == 2048 and part["type"] == "e" and part["bootable"] is True
    assert (part["start"] + part["size"]) * 512 == img.stat().st_size
    data = img.read_bytes()
    assert data[510:512] == b"\x55\xaa"
    assert data[:440] == Path("/usr/lib/grub/i386-pc/boot.img").read_bytes()[:440]
    fat = tmp_path / "fat.img"
    fat.write_bytes(data[part["start"] * 512:])
    fsck = subprocess.run(["fsck.vfat", "-n", str(fat)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run(["mdir", "-b", "-i", str(fat), "::"], capture_output=True, text=True,
                             check=True).stdout.split()
    assert sorted(listing) == ["::/ipxe.lkrn", "::/kairos.ipxe"]
    script = subprocess.run(["mtype", "-i", str(fat), "::kairos.ipxe"], capture_output=True, check=True).stdout
    assert script == (ws.outputs / "v3.1.0" / f"{b.stem}.ipxe").read_bytes()


def test_iso_holds_ipxe_and_the_script(netboot, tmp_path):
    ws, b, _, _ = netboot
    iso = ws.outputs / "v3.1.0" / f"{b.stem}-ipxe.iso"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/kairos.ipxe",
                    str(tmp_path / "s.ipxe"), "-extract", "/boot/grub/grub.cfg", str(tmp_path / "grub.cfg")],
                   capture_output=True, check=True)
    assert (tmp_path / "s.ipxe").read_bytes() == (ws.outputs / "v3.1.0" / f"{b.stem}.ipxe").read_bytes()
    assert "linux16 /ipxe.lkrn" in (tmp_path / "grub.cfg").read_text()


def test_ipxe_iso_netboots_to_the_login_prompt(netboot, tmp_path):
    """iPXE fetches kernel and initrd, dracut's livenet fetches the squashfs over HTTP, and the
    system in it reaches its login prompt."""
    ws, b, server, _ = netboot
    iso = ws.outputs / "v3.1.0" / f"{b.stem}-ipxe.iso"
    text, requests, accel = boot(["-cdrom", str(iso), "-boot", "d"], tmp_path / "iso-serial.log", server, b.stem,
                                 until=logged_in(b.stem))
    check_boot(text, requests, b.stem, server.port)
    assert f"/{b.stem}.squashfs" in requests, f"the initrd did not fetch the live root; requests: {requests}"
    lines = text.splitlines()
    at = next((i for i, l in enumerate(lines) if f"Kairos {b.stem} (ttyS0)" in l), None)
    assert at is not None and logged_in(b.stem)(text), f"no login prompt of {b.stem}; tail:\n{text[-3000:]}"
    print("serial lines around the login prompt:\n  " + "\n  ".join(lines[max(0, at - 5):at + 3]))


def test_ipxe_usb_image_netboots_the_kernel(netboot, tmp_path):
    """The USB image runs the same script as the ISO (which boots to the login prompt above):
    booting it as far as the kernel with the script's command line proves its own part."""
    ws, b, server, _ = netboot
    img = ws.outputs / "v3.1.0" / f"{b.stem}-ipxe-usb.img"
    before = sha256(img)
    text, requests, accel = boot(["-drive", f"file={img},format=raw,snapshot=on"], tmp_path / "usb-serial.log",
                                 server, b.stem)
    check_boot(text, requests, b.stem, server.port)
    assert sha256(img) == before  # booting did not change the artifact


def test_second_run_builds_nothing(netboot):
    ws, b, _, _ = netboot
    out = ws.outputs / "v3.1.0"
    mtimes = {s: (out / (b.stem + s)).stat().st_mtime_ns for s in SUFFIXES}
    again = ws.doit(f"ipxe:{b.stem}")
    assert again.rc == 0, again.err
    assert again.build_actions == set(), f"expected nothing to rebuild, ran {again.build_actions}"
    assert {s: (out / (b.stem + s)).stat().st_mtime_ns for s in SUFFIXES} == mtimes
