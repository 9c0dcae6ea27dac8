"""Unified Kernel Images for Trusted Boot: the whole OS in one signed EFI binary.

A UKI is systemd's EFI stub (`linuxx64.efi.stub`) with sections appended:

    .osrel    the image's /etc/os-release
    .cmdline  the kernel command line (Kairos' UKI command line unless the flavor sets one)
    .uname    the kernel release
    .initrd   the initrd: here, as upstream, the image's WHOLE root file system as a
              zstd-compressed newc cpio, so everything that boots is covered by the signature
    .linux    the kernel

Sections are added with objcopy at addresses after the stub's last section, each aligned to
the stub's SectionAlignment (`section_vmas`, pure). objcopy stamps the PE header with the
current time; `stamp_pe_time` writes SOURCE_DATE_EPOCH there instead, and the cpio is made
from a sorted file list with clamped mtimes, renumbered inodes and zstd at a fixed level, so
the same inputs give the same UKI bytes. The signature: `sbsign` with the db key. sbsign puts
the signing time into the PKCS#7 signature, so it runs under faketime at SOURCE_DATE_EPOCH
when faketime is installed (then the signed file is reproducible too); the UKI itself is
reproducible either way.

The root file system prepared for the cpio (`prepare_rootfs`): /boot removed (its kernel and
initrd would only double the size), /init pointing at the image's init (immucore where the
image has it, as upstream, else /sbin/init: the builtin converter's systemd then runs the
system from the initramfs), empty /proc /sys /dev /run /tmp, and /oem, /efi and
/usr/local/cloud-config as upstream.

The ESP of the `-uki.iso` (`esp_files`, pure) is laid out like AuroraBoot's: systemd-boot as
EFI/BOOT/BOOTX64.EFI (signed), the UKI as EFI/kairos/<name>.efi, loader/loader.conf,
loader/entries/<name>.conf and the public enrolment files loader/keys/auto/{PK,KEK,db}.auth.
Debian bookworm's systemd-boot is 252: its entries name the UKI with `efi` (the `uki` key
needs 257) and `secure-boot-enroll` takes off, manual or force (`if-safe` needs 253).

Measured boot: systemd-stub extends TPM PCR 11 with the name (NUL-terminated) and then the
data of each section it knows, in its own order (`MEASURED`, by stub version; never .pcrsig),
and systemd then extends it with the name of each boot phase it passes (systemd-pcrphase).
When the key set has a PCR policy key, the UKI also carries `.pcrpkey` (its public half) and
`.pcrsig` (systemd-measure's JSON: for each phase path, the TPM2 PolicyPCR digest of the
predicted PCR 11 value, signed), so secrets sealed to that key unseal only under this UKI at
those phases. `pcr11` and `policy_digest` compute the same values in Python, for `verify`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..epoch import frozen_clock_argv
from ..model import ENROLL
from ..run import UsageError, run
from .native_raw import MIB, make_fat

SECTIONS = (".osrel", ".cmdline", ".uname", ".initrd", ".linux")   # in file order, as ukify writes them
PCR_SECTIONS = (".pcrpkey", ".pcrsig")                              # before .initrd when there is a PCR policy
EFI_DIR = "usr/lib/systemd/boot/efi"                # Debian systemd-boot-efi, in the image or on the host
STUB = {"amd64": "linuxx64.efi.stub"}
BOOTLOADER = {"amd64": ("systemd-bootx64.efi", "BOOTX64.EFI")}
AUTH_FILES = ("PK.auth", "KEK.auth", "db.auth")
INIT_CANDIDATES = ("usr/bin/immucore", "sbin/init", "lib/systemd/systemd")
EMPTY_DIRS = ("proc", "sys", "dev", "run", "tmp", "oem", "efi", "usr/local/cloud-config")
ZSTD_LEVEL = 15
ISO_VOLUME = "UKI_ISO_INSTALL"
PCR, PCR_BANK = 11, "sha256"
TPM2_CC_POLICY_PCR, TPM2_ALG_SHA256 = 0x17F, 0x000B
# sections systemd-stub measures into PCR 11, in its order, by the stub's systemd version (from)
MEASURED = ((252, (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey")),
            (253, (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".uname", ".sbat", ".pcrpkey")))
MEASURE_MIN = 253      # systemd-measure signs without a TPM from this version on
ESP_NAME = "efiboot.img"


@dataclass(frozen=True)
class PeLayout:
    """What objcopy needs of the stub: where its sections end and how they align."""

    end: int          # highest VMA + size of its sections
    alignment: int    # SectionAlignment


def parse_layout(objdump_h: str, objdump_p: str) -> PeLayout:
    """The stub's layout from `objdump -h` and `objdump -p` output (pure)."""
    end = 0
    for line in objdump_h.splitlines():
        fields = line.split()
        if len(fields) == 7 and fields[0].isdigit():
            end = max(end, int(fields[2], 16) + int(fields[3], 16))
    m = re.search(r"^SectionAlignment\s+([0-9a-fA-F]+)", objdump_p, re.M)
    if not end or not m:
        raise UsageError("cannot read the sections of the EFI stub (objdump): is it a PE file?")
    return PeLayout(end, int(m[1], 16))


def section_vmas(layout: PeLayout, sizes: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Section name -> address, each after the previous one and aligned (pure)."""
    def up(x: int) -> int:
        return -(-x // layout.alignment) * layout.alignment
    out, vma = [], up(layout.end)
    for name, size in sizes:
        out.append((name, vma))
        vma = up(vma + size)
    return out


def objcopy_argv(stub: Path, out: Path, sections: list[tuple[str, Path, int]]) -> list[str]:
    """objcopy adding each (name, file, vma) to ``stub`` (pure)."""
    argv = ["objcopy"]
    for name, path, vma in sections:
        argv += ["--add-section", f"{name}={path}", "--change-section-vma", f"{name}=0x{vma:x}"]
    return argv + [str(stub), str(out)]


def sbsign_argv(key: Path, cert: Path, src: Path, out: Path, epoch: int | None = None) -> list[str]:
    """sbsign by the db key (pure); with ``epoch``, under faketime with the clock stopped at that
    time (UTC), so the signing time in the signature is fixed."""
    argv = ["sbsign", "--key", str(key), "--cert", str(cert), "--output", str(out), str(src)]
    return argv if epoch is None else frozen_clock_argv(epoch, argv)


def sbverify_argv(cert: Path, efi: Path) -> list[str]:
    return ["sbverify", "--cert", str(cert), str(efi)]


def pe_checksum(data: bytes, checksum_at: int) -> int:
    """The PE image checksum of ``data`` (pure): 16-bit one's-complement-style sum of the file
    with the CheckSum field at ``checksum_at`` taken as zero, plus the file length."""
    size = len(data)
    words = memoryview(data + b"\0" * (size % 2)).cast("H")  # an odd last byte is a word of its own
    total = sum(words) - words[checksum_at // 2] - words[checksum_at // 2 + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + size) & 0xFFFFFFFF


def stamp_pe_time(path: Path, epoch: int) -> None:
    """Write ``epoch`` into the PE/COFF header's TimeDateStamp (objcopy writes the current time)
    and the CheckSum that goes with it."""
    data = bytearray(Path(path).read_bytes())
    if data[:2] != b"MZ":
        raise UsageError(f"{path.name}: not a PE file")
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if data[pe:pe + 4] != b"PE\0\0":
        raise UsageError(f"{path.name}: no PE signature")
    struct.pack_into("<I", data, pe + 8, epoch & 0xFFFFFFFF)  # after Signature, Machine, NumberOfSections
    checksum_at = pe + 24 + 64                                # the optional header's CheckSum
    struct.pack_into("<I", data, checksum_at, pe_checksum(bytes(data), checksum_at))
    Path(path).write_bytes(data)


def read_sections(path: Path) -> dict[str, bytes]:
    """Section name -> raw data of a PE file (for checks; the sections objcopy and sbsign wrote)."""
    data = Path(path).read_bytes()
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    count, opt_size = struct.unpack_from("<H12xH", data, pe + 6)
    table = pe + 24 + opt_size
    out = {}
    for i in range(count):
        name, vsize, _, raw_size, raw_ptr = struct.unpack_from("<8sIIII", data, table + 40 * i)
        out[name.rstrip(b"\0").decode()] = data[raw_ptr:raw_ptr + min(vsize, raw_size)]
    return out


# --- measured boot: PCR 11 and its signed policy ---------------------------------------------------

def stub_version(data: bytes) -> int:
    """The systemd version of an EFI stub, from its `LoaderInfo: systemd-stub N` marker (pure)."""
    m = re.search(rb"#### LoaderInfo: systemd-stub (\d+)", data)
    if not m:
        raise UsageError("the EFI stub has no `LoaderInfo: systemd-stub` marker: is it systemd's linuxx64.efi.stub?")
    return int(m[1])


def measured_sections(version: int) -> tuple[str, ...]:
    """What a stub of systemd ``version`` measures, in order (pure)."""
    known = [names for since, names in MEASURED if version >= since]
    if not known:
        raise UsageError(f"systemd-stub {version} does not measure its sections (that needs {MEASURED[0][0]})")
    return known[-1]


def _extend(value: bytes, data: bytes) -> bytes:
    return hashlib.sha256(value + hashlib.sha256(data).digest()).digest()


def pcr11(sections: list[tuple[str, bytes]], phase_path: str = "") -> bytes:
    """PCR 11 (sha256 bank) after a stub measured ``sections`` (name, data; measured ones, in the
    stub's order) and systemd passed the phases of ``phase_path`` (`sysinit:ready`) (pure)."""
    value = bytes(32)
    for name, data in sections:
        value = _extend(_extend(value, name.encode() + b"\0"), data)
    for word in phase_path.split(":") if phase_path else ():
        value = _extend(value, word.encode())
    return value


def policy_digest(pcr_value: bytes, pcr: int = PCR) -> bytes:
    """The TPM2 policy digest of PolicyPCR(sha256 bank, ``pcr`` = ``pcr_value``) from an empty
    policy (pure): what `.pcrsig` signs as `pol`."""
    select = bytearray(3)
    select[pcr // 8] |= 1 << (pcr % 8)
    selection = struct.pack(">IHB", 1, TPM2_ALG_SHA256, len(select)) + bytes(select)
    return hashlib.sha256(bytes(32) + struct.pack(">I", TPM2_CC_POLICY_PCR) + selection
                          + hashlib.sha256(pcr_value).digest()).digest()


def measure_sign_argv(measure: str, files: dict[str, Path], measured: tuple[str, ...], phases: tuple[str, ...],
                      key: Path, public: Path) -> list[str]:
    """systemd-measure signing the PCR 11 policies of ``phases`` for the UKI of ``files`` (pure):
    only the sections the stub measures, so the prediction is what the stub extends."""
    argv = [measure, "sign", f"--bank={PCR_BANK}", f"--private-key={key}", f"--public-key={public}", "--json=short"]
    argv += [f"--phase={p}" for p in phases]
    return argv + [f"--{name[1:]}={files[name]}" for name in measured if name in files]


def verify_policy_argv(public: Path, policy: Path, signature: Path) -> list[str]:
    """openssl checking ``signature`` (RSA PKCS#1 v1.5, sha256) of the policy digest in ``policy``
    by ``public`` (pure): what TPM2_PolicyAuthorize checks, with an empty policyRef."""
    return ["openssl", "dgst", "-sha256", "-verify", str(public), "-signature", str(signature), str(policy)]


def pcrsig_entries(data: bytes) -> list[dict]:
    """The sha256-bank entries of a `.pcrsig` section (pure); an unreadable one is a UsageError."""
    try:
        doc = json.loads(data.rstrip(b"\0"))
        entries = doc[PCR_BANK]
        for e in entries:
            bytes.fromhex(e["pol"]), base64.b64decode(e["sig"], validate=True), e["pcrs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f".pcrsig is not systemd-measure's JSON with a {PCR_BANK} bank ({exc})") from None
    return entries


def pcr_problems(sections: dict[str, bytes], phases: tuple[str, ...], version: int) -> list[str]:
    """What is wrong with the PCR policy of a UKI's ``sections`` (pure): `.pcrsig` must hold one
    PCR 11 policy per phase path, each the policy of the value computed from the sections the
    stub of systemd ``version`` measures. (The signatures are checked with openssl by the caller.)"""
    if ".pcrsig" not in sections or ".pcrpkey" not in sections:
        return ["no .pcrsig/.pcrpkey sections (no PCR policy)"]
    measured = [(n, sections[n]) for n in measured_sections(version) if n in sections]
    try:
        entries = pcrsig_entries(sections[".pcrsig"])
    except UsageError as exc:
        return [str(exc)]
    got = {e["pol"] for e in entries if e["pcrs"] == [PCR]}
    return [f".pcrsig has no signed policy for phase {p or '(none)'}" for p in phases
            if policy_digest(pcr11(measured, p)).hex() not in got]


# --- the root file system in the initrd ----------------------------------------------------------

def init_target(root: Path) -> str:
    """What /init points at: the first of INIT_CANDIDATES the image has (immucore, as upstream)."""
    for rel in INIT_CANDIDATES:
        if os.path.lexists(root / rel):
            return "/" + rel
    raise UsageError("the image has no init (none of /" + ", /".join(INIT_CANDIDATES) + "): it cannot boot as a UKI")


def cpio_argv() -> list[str]:
    """GNU cpio writing a newc archive of the NUL-separated names on stdin (pure), device
    numbers dropped and inodes renumbered (`--reproducible`)."""
    return ["cpio", "--quiet", "--null", "--create", "--format=newc", "--reproducible"]


def zstd_argv(level: int = ZSTD_LEVEL) -> list[str]:
    return ["zstd", "-q", f"-{level}", "-T0"]


def rootfs_names(root: Path) -> list[bytes]:
    """Every path under ``root`` relative to it, sorted bytewise (pure but for the walk): the cpio's order."""
    names = []
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        for name in dirs + files:
            names.append(os.fsencode(os.path.normpath(os.path.join(rel, name))))
    return sorted(names)


# --- the ESP of the -uki.iso ---------------------------------------------------------------------

def loader_conf(enroll: str, timeout: int = 5) -> str:
    if enroll not in ENROLL:
        raise UsageError(f"secure-boot-enroll {enroll!r}: systemd-boot 252 takes {', '.join(ENROLL)}")
    return f"timeout {timeout}\nconsole-mode max\neditor no\nsecure-boot-enroll {enroll}\n"


def entry_conf(title: str, name: str) -> str:
    return f"title {title}\nsort-key {name}\nefi /EFI/kairos/{name}.efi\n"


def esp_binaries(name: str, arch: str = "amd64") -> tuple[str, str]:
    """FAT paths of the ESP's signed EFI binaries (pure): the boot loader, then the UKI."""
    return f"EFI/BOOT/{BOOTLOADER[arch][1]}", f"EFI/kairos/{name}.efi"


def esp_files(name: str, uki: Path, bootloader: Path, loader: Path, entry: Path, keys: Path,
              arch: str = "amd64") -> dict[str, Path]:
    """FAT path -> source file of the ESP (pure)."""
    boot_path, uki_path = esp_binaries(name, arch)
    files = {boot_path: bootloader, uki_path: uki,
             "loader/loader.conf": loader, f"loader/entries/{name}.conf": entry}
    files.update({f"loader/keys/auto/{auth}": keys / auth for auth in AUTH_FILES})
    return files


def xorriso_argv(out: Path, tree: Path, volume: str = ISO_VOLUME) -> list[str]:
    """An EFI-only ISO whose El Torito image is the ESP at ``tree``/efiboot.img (pure)."""
    return ["xorriso", "-as", "mkisofs", "-V", volume, "-isohybrid-gpt-basdat", "-e", ESP_NAME, "-no-emul-boot",
            "-o", str(out), str(tree)]


# --- the runners -----------------------------------------------------------------------------------

def stub_layout(stub: Path) -> PeLayout:
    return parse_layout(run(["objdump", "-h", str(stub)], capture=True, what=f"read the sections of {stub.name}"),
                        run(["objdump", "-p", str(stub)], capture=True, what=f"read the header of {stub.name}"))


def prepare_rootfs(root: Path) -> None:
    """Make an unpacked image root file system ready to be the UKI's initrd (see the module doc)."""
    target = init_target(root)
    shutil.rmtree(root / "boot", ignore_errors=True)
    (root / "init").unlink(missing_ok=True)
    (root / "init").symlink_to(target)
    for rel in EMPTY_DIRS:
        path = root / rel
        if path.is_dir() and not path.is_symlink() and rel in ("proc", "sys", "dev", "run", "tmp"):
            shutil.rmtree(path)
        if not os.path.lexists(path):
            path.mkdir(parents=True)
    (root / "tmp").chmod(0o1777)


def clamp_mtimes(root: Path, epoch: int) -> None:
    """No file in ``root`` is newer than ``epoch`` (as SOURCE_DATE_EPOCH tools do)."""
    for top, dirs, files in os.walk(root):
        for name in dirs + files + ["."]:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if st.st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)


def make_initrd(root: Path, out: Path, epoch: int, work: Path) -> None:
    """``root`` as a zstd newc cpio at ``out``: sorted names, mtimes clamped, inodes renumbered."""
    clamp_mtimes(root, epoch)
    archive = work / "initrd.cpio"
    names = rootfs_names(root)
    run([*cpio_argv(), "--file", str(archive)], cwd=root, feed=[b"\0".join(names) + b"\0"],
        what="cpio the root file system")
    run([*zstd_argv(), "-f", "-o", str(out), str(archive)], what="zstd the initrd")
    archive.unlink()


def file_order(files: dict[str, Path]) -> list[str]:
    """The sections of a UKI in file order (pure): SECTIONS, with the PCR ones before .initrd."""
    pcr = [s for s in PCR_SECTIONS if s in files]
    at = SECTIONS.index(".initrd")
    return [*SECTIONS[:at], *pcr, *SECTIONS[at:]]


def assemble(stub: Path, files: dict[str, Path], out: Path, epoch: int) -> None:
    """The unsigned UKI at ``out``: ``files`` maps each of SECTIONS (and PCR_SECTIONS, when
    there is a PCR policy) to its content."""
    missing = [s for s in SECTIONS if s not in files]
    if missing:
        raise UsageError(f"UKI sections missing: {', '.join(missing)}")
    order = file_order(files)
    vmas = section_vmas(stub_layout(stub), [(s, files[s].stat().st_size) for s in order])
    run(objcopy_argv(stub, out, [(name, files[name], vma) for name, vma in vmas]), what="objcopy the UKI")
    stamp_pe_time(out, epoch)


def measure_tool() -> str:
    """A systemd-measure that signs without a TPM (>= MEASURE_MIN): on PATH, else systemd's own."""
    found = []
    for cand in (shutil.which("systemd-measure"), "/usr/lib/systemd/systemd-measure", "/lib/systemd/systemd-measure"):
        if not cand or not os.access(cand, os.X_OK):
            continue
        m = re.match(r"systemd (\d+)", run([cand, "--version"], capture=True, what=f"{cand} --version"))
        if m and int(m[1]) >= MEASURE_MIN:
            return cand
        found.append(f"{cand} ({m[0] if m else 'unknown version'})")
    raise UsageError(f"signing the UKI's PCR policy needs systemd-measure >= {MEASURE_MIN}"
                     f"{' (found ' + ', '.join(found) + ')' if found else ''}: Debian bookworm has 252; "
                     "`bash ci/setup.sh` installs 254 from bookworm-backports as /usr/local/bin/systemd-measure. "
                     "Or build without a PCR policy: remove tpm2-pcr-private.pem from the keys")


def sign_pcr_policy(stub: Path, files: dict[str, Path], phases: tuple[str, ...], key: Path, out: Path) -> None:
    """``out``: the `.pcrsig` JSON for the UKI of ``files`` (which holds `.pcrpkey` already),
    signed by ``key`` for each phase path of ``phases``; checked against `pcr11` before use."""
    version = stub_version(stub.read_bytes())
    measured = measured_sections(version)
    text = run(measure_sign_argv(measure_tool(), files, measured, phases, key, files[".pcrpkey"]),
               capture=True, what="systemd-measure sign the PCR 11 policy")
    data = text.strip().encode()
    sections = {name: files[name].read_bytes() for name in measured if name in files}
    wrong = pcr_problems({**sections, ".pcrsig": data}, phases, version)
    if wrong:
        raise UsageError("systemd-measure's PCR policy does not match the stub's measurements: " + "; ".join(wrong))
    out.write_bytes(data)


def sign(key: Path, cert: Path, src: Path, out: Path, epoch: int) -> None:
    """``src`` signed by ``key``/``cert`` at ``out``, checked with sbverify; the signing time is
    ``epoch`` when faketime is installed."""
    fixed = epoch if shutil.which("faketime") else None
    run(sbsign_argv(key, cert, src, out, fixed), what=f"sbsign {out.name}")
    run(sbverify_argv(cert, out), what=f"sbverify {out.name}")


def build_iso(out: Path, files: dict[str, Path], work: Path, volume_id: str, epoch: int) -> None:
    """The EFI-only ISO at ``out`` whose ESP (FAT, El Torito) holds ``files`` (FAT path -> source);
    xorriso dates it at ``epoch``."""
    size = sum(f.stat().st_size for f in files.values())
    size = max(64 * MIB, -(-(size + size // 50 + 4 * MIB) // MIB) * MIB)  # FAT32 minimum, 2% + 4 MiB slack
    tree = work / "iso"
    tree.mkdir(parents=True, exist_ok=True)
    make_fat(tree / ESP_NAME, size, "COS_GRUB", volume_id, files, work / "esp.d", epoch)
    run(xorriso_argv(out, tree), env={"SOURCE_DATE_EPOCH": str(epoch)}, what=f"xorriso {out.name}")
