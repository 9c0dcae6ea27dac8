"""The UKI builder: pure parts as tables, then a real (small) UKI from Debian's systemd stub with
objcopy, signed with sbsign by a key set made by `python -m tasks genkey`, checked with sbverify,
and its ESP/ISO made with mtools and xorriso. The kernel and initrd here are placeholders (bytes
that only fill the sections); UKIs of real images are booted under Secure Boot elsewhere."""
from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tasks import keys
from tasks.builders import uki
from tasks.model import UKI_CMDLINE
from tasks.run import CommandError, UsageError, run

STUB = Path("/usr/lib/systemd/boot/efi") / uki.STUB["amd64"]
BOOT = Path("/usr/lib/systemd/boot/efi") / uki.BOOTLOADER["amd64"][0]
EPOCH = 1700000000

OBJDUMP_H = """
x.efi.stub:     file format pei-x86-64

Sections:
Idx Name          Size      VMA               LMA               File off  Algn
  0 .text         0000bff0  0000000000004000  0000000000004000  00000400  2**4
                  CONTENTS, ALLOC, LOAD, READONLY, CODE
  6 .sbat         000000e2  0000000000019000  0000000000019000  00011000  2**2
  7 .sdmagic      00000034  0000000000019100  0000000000019100  00011200  2**2
"""
OBJDUMP_P = "ImageBase\t\t0000000000000000\nSectionAlignment\t00000200\nFileAlignment\t\t00000200\n"


def test_parse_layout():
    assert uki.parse_layout(OBJDUMP_H, OBJDUMP_P) == uki.PeLayout(0x19134, 0x200)
    with pytest.raises(UsageError, match="is it a PE file"):
        uki.parse_layout("nothing", OBJDUMP_P)


@pytest.mark.parametrize("layout, sizes, expected", [
    (uki.PeLayout(0x19134, 0x200), [(".osrel", 10), (".cmdline", 0x200), (".linux", 1)],
     [(".osrel", 0x19200), (".cmdline", 0x19400), (".linux", 0x19600)]),
    (uki.PeLayout(0x1000, 0x1000), [(".a", 0x1001), (".b", 5)], [(".a", 0x1000), (".b", 0x3000)]),
])
def test_section_vmas(layout, sizes, expected):
    assert uki.section_vmas(layout, sizes) == expected


def test_pe_checksum_matches_the_stubs_own():
    """objcopy/the linker wrote the stub's CheckSum; ours gives the same number."""
    data = STUB.read_bytes()
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    at = pe + 24 + 64
    assert uki.pe_checksum(data, at) == struct.unpack_from("<I", data, at)[0] != 0


def test_assembled_at_other_times_is_the_same(tmp_path):
    """objcopy stamps the current time (and a checksum over it); assemble replaces both."""
    files = _sections(tmp_path)
    a, b = tmp_path / "a.efi", tmp_path / "b.efi"
    uki.assemble(STUB, files, a, EPOCH)
    time.sleep(1.1)
    uki.assemble(STUB, files, b, EPOCH)
    assert a.read_bytes() == b.read_bytes()
    out = run(["objdump", "-p", str(a)], capture=True)
    assert "Time/Date\t\tTue Nov 14 22:13:20 2023" in out


def test_argv_builders():
    assert uki.objcopy_argv(Path("s"), Path("o"), [(".osrel", Path("f"), 0x19200)]) == \
        ["objcopy", "--add-section", ".osrel=f", "--change-section-vma", ".osrel=0x19200", "s", "o"]
    assert uki.sbsign_argv(Path("k"), Path("c"), Path("i"), Path("o")) == \
        ["sbsign", "--key", "k", "--cert", "c", "--output", "o", "i"]
    assert uki.sbsign_argv(Path("k"), Path("c"), Path("i"), Path("o"), EPOCH)[:5] == \
        ["env", "TZ=UTC", "faketime", "-f", "2023-11-14 22:13:20"]
    assert uki.cpio_argv() == ["cpio", "--quiet", "--null", "--create", "--format=newc", "--reproducible"]
    assert uki.xorriso_argv(Path("o.iso"), Path("t")) == [
        "xorriso", "-as", "mkisofs", "-V", "UKI_ISO_INSTALL", "-isohybrid-gpt-basdat", "-e", "efiboot.img",
        "-no-emul-boot", "-o", "o.iso", "t"]


@pytest.mark.parametrize("enroll, ok", [("force", True), ("manual", True), ("off", True), ("if-safe", False)])
def test_loader_conf(enroll, ok):
    if ok:
        assert uki.loader_conf(enroll) == f"timeout 5\nconsole-mode max\neditor no\nsecure-boot-enroll {enroll}\n"
    else:
        with pytest.raises(UsageError, match="systemd-boot 252 takes off, manual, force"):
            uki.loader_conf(enroll)


def test_esp_layout_like_auroraboot():
    files = uki.esp_files("kairos-x", Path("u.efi"), Path("b.efi"), Path("l.conf"), Path("e.conf"), Path("/k"))
    assert files == {"EFI/BOOT/BOOTX64.EFI": Path("b.efi"), "EFI/kairos/kairos-x.efi": Path("u.efi"),
                     "loader/loader.conf": Path("l.conf"), "loader/entries/kairos-x.conf": Path("e.conf"),
                     "loader/keys/auto/PK.auth": Path("/k/PK.auth"), "loader/keys/auto/KEK.auth": Path("/k/KEK.auth"),
                     "loader/keys/auto/db.auth": Path("/k/db.auth")}
    assert uki.entry_conf("Kairos x", "kairos-x") == "title Kairos x\nsort-key kairos-x\nefi /EFI/kairos/kairos-x.efi\n"


def _rootfs(root: Path, init: str = "sbin/init") -> Path:
    for rel in ("etc", "usr/bin", "sbin", "boot", "proc/1", "tmp/junk", "var/lib"):
        (root / rel).mkdir(parents=True, exist_ok=True)
    (root / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\n')
    (root / "boot/vmlinuz").write_bytes(b"kernel")
    (root / "proc/1/status").write_text("x")
    (root / "tmp/junk/f").write_text("x")
    (root / init).write_text("#!/bin/sh\n")
    (root / "usr/bin/hello").write_text("hi\n")
    os.link(root / "usr/bin/hello", root / "usr/bin/hello2")  # a hard link survives the cpio
    return root


def test_prepare_rootfs(tmp_path):
    root = _rootfs(tmp_path / "r")
    uki.prepare_rootfs(root)
    assert os.readlink(root / "init") == "/sbin/init"
    assert not (root / "boot").exists()
    for rel in ("proc", "sys", "dev", "run", "tmp", "oem", "efi", "usr/local/cloud-config"):
        assert (root / rel).is_dir(), rel
    assert list((root / "proc").iterdir()) == [] and list((root / "tmp").iterdir()) == []
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    immucore = _rootfs(tmp_path / "i", init="usr/bin/immucore")
    uki.prepare_rootfs(immucore)
    assert os.readlink(immucore / "init") == "/usr/bin/immucore"   # as upstream, when the image has it
    with pytest.raises(UsageError, match="has no init"):
        uki.prepare_rootfs(tmp_path / "empty")


def test_initrd_is_a_reproducible_cpio_of_the_rootfs(tmp_path):
    outs = []
    for i in range(2):
        root = _rootfs(tmp_path / f"r{i}")
        if i:  # a second tree made later: other inode numbers and mtimes, same content
            (root / "usr/bin/late").write_text("late\n")
            (root / "usr/bin/late").unlink()
        uki.prepare_rootfs(root)
        out = tmp_path / f"initrd{i}"
        uki.make_initrd(root, out, EPOCH, tmp_path)
        outs.append(out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd
    listing = subprocess.run(f"zstd -dc {outs[0]} | cpio -itv --quiet", shell=True, capture_output=True,
                             text=True, check=True).stdout
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()]
    assert names == sorted(names)
    assert "init" in names and "etc/os-release" in names and "boot/vmlinuz" not in names
    assert "2023" in listing and "2026" not in listing  # every mtime clamped to the epoch


@pytest.fixture(scope="module")
def keyset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys") / "k"
    keys.generate(out)
    return out


def _sections(tmp_path: Path) -> dict[str, Path]:
    content = {".osrel": b'ID=debian\n', ".cmdline": UKI_CMDLINE.encode(), ".uname": b"6.1.0-test",
               ".initrd": os.urandom(1 << 16), ".linux": os.urandom(1 << 17)}
    files = {}
    for name, data in content.items():
        files[name] = tmp_path / name.lstrip(".")
        files[name].write_bytes(data)
    return files


def test_uki_assembled_signed_and_verified(tmp_path, keyset):
    files = _sections(tmp_path)
    a, b = tmp_path / "a.efi", tmp_path / "b.efi"
    uki.assemble(STUB, files, a, EPOCH)
    uki.assemble(STUB, files, b, EPOCH)
    assert a.read_bytes() == b.read_bytes()                   # the same inputs, the same bytes
    sections = uki.read_sections(a)
    for name, path in files.items():
        assert sections[name] == path.read_bytes(), name
    assert list(sections)[-5:] == list(uki.SECTIONS)
    assert ".sbat" in sections                                # the stub's own sections are kept
    signed, again = tmp_path / "a.signed.efi", tmp_path / "b.signed.efi"
    uki.sign(keyset / "db.key", keyset / "db.crt", a, signed, EPOCH)
    uki.sign(keyset / "db.key", keyset / "db.crt", b, again, EPOCH)
    assert signed.read_bytes() == again.read_bytes()          # faketime: a fixed signing time
    run(uki.sbverify_argv(keyset / "db.crt", signed))
    with pytest.raises(CommandError, match="sbverify"):      # another key's certificate refuses it
        run(uki.sbverify_argv(keyset / "KEK.crt", signed), what="sbverify with KEK")
    with pytest.raises(CommandError):
        run(uki.sbverify_argv(keyset / "db.crt", a), what="sbverify unsigned")


def test_uki_iso_holds_the_esp(tmp_path, keyset):
    files = _sections(tmp_path)
    unsigned, signed, boot = tmp_path / "u.efi", tmp_path / "s.efi", tmp_path / "BOOTX64.EFI"
    uki.assemble(STUB, files, unsigned, EPOCH)
    uki.sign(keyset / "db.key", keyset / "db.crt", unsigned, signed, EPOCH)
    uki.sign(keyset / "db.key", keyset / "db.crt", BOOT, boot, EPOCH)
    (tmp_path / "loader.conf").write_text(uki.loader_conf("force"))
    (tmp_path / "entry.conf").write_text(uki.entry_conf("Kairos t", "t"))
    esp = uki.esp_files("t", signed, boot, tmp_path / "loader.conf", tmp_path / "entry.conf", keyset)
    iso = tmp_path / "t-uki.iso"
    uki.build_iso(iso, esp, tmp_path / "w", "1234ABCD", EPOCH)
    report = run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"], capture=True)
    assert "UEFI" in report and "BIOS" not in report.split("El Torito boot img")[-1]
    extract = tmp_path / "esp.img"
    run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/" + uki.ESP_NAME, str(extract)])
    got = tmp_path / "got"
    run(["mcopy", "-s", "-i", str(extract), "::/", str(got)], env={"MTOOLS_SKIP_CHECK": "1"})
    for rel, src in esp.items():
        assert (got / rel).read_bytes() == src.read_bytes(), rel
    run(uki.sbverify_argv(keyset / "db.crt", got / "EFI/BOOT/BOOTX64.EFI"))
    assert not any(p.name.endswith(".key") for p in got.rglob("*"))   # no private key on the medium
    shutil.rmtree(got)


# --- measured boot: PCR 11 and its signed policy ------------------------------------------------

MEASURE = "/usr/local/bin/systemd-measure"   # bookworm-backports' 254 (ci/setup.sh)


def test_stub_version_and_measured_sections():
    assert uki.stub_version(STUB.read_bytes()) == 252                 # Debian bookworm's systemd-boot-efi
    assert uki.stub_version(b"..#### LoaderInfo: systemd-stub 254.26-1~bpo12+1 ####") == 254
    with pytest.raises(UsageError, match="no `LoaderInfo: systemd-stub` marker"):
        uki.stub_version(b"MZ whatever")
    assert ".uname" not in uki.measured_sections(252) and ".pcrsig" not in uki.measured_sections(252)
    assert uki.measured_sections(254)[-3:] == (".uname", ".sbat", ".pcrpkey")
    with pytest.raises(UsageError, match="does not measure"):
        uki.measured_sections(251)


def test_file_order_puts_the_pcr_sections_before_the_initrd():
    assert uki.file_order(dict.fromkeys(uki.SECTIONS)) == list(uki.SECTIONS)
    assert uki.file_order(dict.fromkeys(uki.SECTIONS + uki.PCR_SECTIONS)) == \
        [".osrel", ".cmdline", ".uname", ".pcrpkey", ".pcrsig", ".initrd", ".linux"]


def test_measure_sign_argv_passes_only_measured_sections(tmp_path):
    files = {n: tmp_path / n[1:] for n in (*uki.SECTIONS, ".pcrpkey")}
    argv = uki.measure_sign_argv("sm", files, uki.measured_sections(252), ("sysinit", "sysinit:ready"),
                                 Path("k.pem"), files[".pcrpkey"])
    assert argv[:6] == ["sm", "sign", "--bank=sha256", "--private-key=k.pem",
                        f"--public-key={files['.pcrpkey']}", "--json=short"]
    assert argv[6:8] == ["--phase=sysinit", "--phase=sysinit:ready"]
    assert [a.split("=")[0] for a in argv[8:]] == ["--linux", "--osrel", "--cmdline", "--initrd", "--pcrpkey"]


@pytest.mark.parametrize("version, phases", [
    (252, ("sysinit", "sysinit:ready")),
    (254, ("enter-initrd", "enter-initrd:leave-initrd:sysinit:ready")),
])
def test_pcr11_is_what_systemd_measure_calculates(tmp_path, keyset, version, phases):
    """Our PCR 11 arithmetic (for verify) against the real systemd-measure, for a stub that does
    and one that does not measure .uname."""
    files = _sections(tmp_path)
    files[".pcrpkey"] = tmp_path / "pcrpkey"
    run(keys.public_key_argv(keyset / keys.PCR_PRIVATE, files[".pcrpkey"]))
    measured = uki.measured_sections(version)
    argv = [MEASURE, "calculate", "--bank=sha256", *[f"--phase={p}" for p in phases],
            *[f"--{n[1:]}={files[n]}" for n in measured if n in files]]
    lines = [l for l in run(argv, capture=True).splitlines() if l.startswith("11:sha256=")]
    ours = [uki.pcr11([(n, files[n].read_bytes()) for n in measured if n in files], p).hex() for p in phases]
    assert [l.split("=", 1)[1] for l in lines] == ours


def test_signed_pcr_policy_verifies_and_a_changed_section_does_not(tmp_path, keyset):
    """sign_pcr_policy (real systemd-measure) gives one policy per phase, each our PolicyPCR digest
    of our PCR 11 value, signed so that openssl verifies it with .pcrpkey; after one changed byte
    of the kernel the policies no longer match."""
    files = _sections(tmp_path)
    files[".pcrpkey"], files[".pcrsig"] = tmp_path / "pcrpkey", tmp_path / "pcrsig"
    run(keys.public_key_argv(keyset / keys.PCR_PRIVATE, files[".pcrpkey"]))
    phases = ("sysinit", "sysinit:ready")
    uki.sign_pcr_policy(STUB, files, phases, keyset / keys.PCR_PRIVATE, files[".pcrsig"])
    again = tmp_path / "again"
    uki.sign_pcr_policy(STUB, files, phases, keyset / keys.PCR_PRIVATE, again)
    assert again.read_bytes() == files[".pcrsig"].read_bytes()          # RSA PKCS#1 v1.5: deterministic
    sections = {n: p.read_bytes() for n, p in files.items()}
    assert uki.pcr_problems(sections, phases, 252) == []
    entries = uki.pcrsig_entries(sections[".pcrsig"])
    assert len(entries) == 2 and all(e["pcrs"] == [11] for e in entries)
    for i, e in enumerate(entries):
        (tmp_path / f"pol{i}").write_bytes(bytes.fromhex(e["pol"]))
        (tmp_path / f"sig{i}").write_bytes(__import__("base64").b64decode(e["sig"]))
        run(uki.verify_policy_argv(files[".pcrpkey"], tmp_path / f"pol{i}", tmp_path / f"sig{i}"))
    (tmp_path / "pol0").write_bytes(bytes(32))
    with pytest.raises(CommandError):
        run(uki.verify_policy_argv(files[".pcrpkey"], tmp_path / "pol0", tmp_path / "sig0"), what="verify")
    changed = dict(sections, **{".linux": b"\x01" + sections[".linux"][1:]})
    assert uki.pcr_problems(changed, phases, 252) == [
        ".pcrsig has no signed policy for phase sysinit", ".pcrsig has no signed policy for phase sysinit:ready"]
    assert uki.pcr_problems(sections, ("enter-initrd",), 252) == [".pcrsig has no signed policy for phase enter-initrd"]
    assert uki.pcr_problems({".linux": b""}, phases, 252) == ["no .pcrsig/.pcrpkey sections (no PCR policy)"]


def test_a_uki_with_a_pcr_policy_keeps_it_through_objcopy_and_sbsign(tmp_path, keyset):
    files = _sections(tmp_path)
    files[".pcrpkey"], files[".pcrsig"] = tmp_path / "pcrpkey", tmp_path / "pcrsig"
    run(keys.public_key_argv(keyset / keys.PCR_PRIVATE, files[".pcrpkey"]))
    uki.sign_pcr_policy(STUB, files, ("sysinit",), keyset / keys.PCR_PRIVATE, files[".pcrsig"])
    unsigned, signed = tmp_path / "u.efi", tmp_path / "s.efi"
    uki.assemble(STUB, files, unsigned, EPOCH)
    uki.sign(keyset / "db.key", keyset / "db.crt", unsigned, signed, EPOCH)
    sections = uki.read_sections(signed)
    assert list(sections)[-7:] == uki.file_order(files)
    assert uki.stub_version(sections[".sdmagic"]) == 252
    assert uki.pcr_problems(sections, ("sysinit",), 252) == []
