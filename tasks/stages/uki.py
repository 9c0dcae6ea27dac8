"""uki: Trusted Boot artifacts of amd64 generic builds with `trusted_boot: {keys: DIR}`.

- `<stem>-uki.efi`: the signed Unified Kernel Image (tasks/builders/uki.py): systemd-stub
  (the image's own when it ships systemd-boot-efi, else the host's, Debian systemd-boot-efi),
  the image's os-release, `trusted_boot.cmdline`, the kernel release, the image's whole root
  file system as the initrd, and its kernel; signed with the keys' db key (sbsign) and
  checked with sbverify against db.crt. When the keys hold a PCR policy key
  (`tpm2-pcr-private.pem`, written by genkey), also `.pcrpkey` and `.pcrsig`: PCR 11
  policies signed with systemd-measure for `trusted_boot.pcr_phases` (default by converter,
  model.PCR_PHASES).
- `<stem>-uki.iso`: an EFI-only ISO whose ESP holds systemd-boot (signed by the same key) as
  EFI/BOOT/BOOTX64.EFI, the UKI as EFI/kairos/<stem>.efi, its loader entry, loader.conf with
  `secure-boot-enroll <trusted_boot.enroll>`, and the public enrolment files PK/KEK/db.auth
  under loader/keys/auto. No private key is ever written to outputs.

Both are written by one task from the converted image; they rebuild when the image, the key
files or the options change. Times are fixed by SOURCE_DATE_EPOCH (the build's epoch, tasks/epoch.py).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

from .. import keys as keyset
from ..builders import native_raw, uki
from ..epoch import build_epoch
from ..graph import Context, action, task
from ..matrix import Build
from ..model import SECURE_BOOT_FILES
from ..run import CommandError, UsageError, run, say
from ..state import Paths, atomic_path, scratch_dir, write_checksum
from .extract import exported_rootfs

STAGE_VERSION = 1
HOST_EFI = Path("/") / uki.EFI_DIR


def inside(root: Path, rel: str) -> Path:
    """``rel`` resolved inside ``root`` (absolute symlinks point into the image, never the host)."""
    path = root / rel
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise UsageError(f"/{rel}: too many levels of symbolic links in the image")


def kernel_of(root: Path) -> tuple[Path, str]:
    """The image's kernel (/boot/vmlinuz or the newest /boot/vmlinuz-*) and its release."""
    boot = root / "boot"
    link = boot / "vmlinuz"
    path = inside(root, "boot/vmlinuz") if os.path.lexists(link) else None
    if path is None or not path.is_file():
        versioned = sorted(boot.glob("vmlinuz-*")) if boot.is_dir() else []
        if not versioned:
            raise UsageError("the image has no kernel in /boot (vmlinuz or vmlinuz-*)")
        path = versioned[-1]
    release = path.name.removeprefix("vmlinuz-")
    modules = [p.name for d in ("usr/lib/modules", "lib/modules") if (root / d).is_dir() for p in (root / d).iterdir()]
    if release == path.name or release not in modules:
        if len(set(modules)) != 1:
            raise UsageError(f"cannot tell the kernel release of /boot/{path.name} (modules: {sorted(set(modules))})")
        release = modules[0]
    return path, release


def efi_file(root: Path, name: str) -> Path:
    """The image's systemd-boot file ``name`` if it has one, else the host's."""
    own = root / uki.EFI_DIR / name
    if own.is_file():
        return own
    host = HOST_EFI / name
    if not host.is_file():
        raise UsageError(f"cannot find {host} (the image has none either); install Debian package systemd-boot-efi")
    return host


def pcr_key(b: Build) -> Path | None:
    """The key set's PCR policy key, if it has one: then the UKI carries a signed PCR policy."""
    path = b.flavor.trusted_boot.keys / keyset.PCR_PRIVATE
    return path if path.is_file() else None


def key_files(b: Build) -> list[Path]:
    pcr = pcr_key(b)
    return [b.flavor.trusted_boot.keys / name for name in SECURE_BOOT_FILES] + ([pcr] if pcr else [])


def host_efi_digest() -> str:
    """The host's stub and systemd-boot (used when an image has none): a new package version rebuilds."""
    h = hashlib.sha256()
    for name in (uki.STUB["amd64"], uki.BOOTLOADER["amd64"][0]):
        path = HOST_EFI / name
        h.update(path.read_bytes() if path.is_file() else b"missing")
    return h.hexdigest()


def key(b: Build) -> str:
    tb = b.flavor.trusted_boot
    pcr = {"phases": tb.phases(b.flavor.converter), "measured": uki.MEASURED} if pcr_key(b) else None
    return json.dumps({"cmdline": tb.cmdline, "enroll": tb.enroll, "sections": uki.SECTIONS, "pcr": pcr,
                       "zstd": uki.zstd_argv(), "cpio": uki.cpio_argv(), "epoch": build_epoch(b.flavor),
                       "host_efi": host_efi_digest(), "stage": STAGE_VERSION}, sort_keys=True)


def title(b: Build) -> str:
    f = b.flavor
    return f"Kairos {f.flavor} {f.release} {b.variant} {b.version} (Trusted Boot)"


def build(paths: Paths, b: Build, efi_out: Path, iso_out: Path) -> None:
    tb = b.flavor.trusted_boot
    db_key, db_crt = tb.keys / "db.key", tb.keys / "db.crt"
    epoch = build_epoch(b.flavor)
    with scratch_dir(paths.tmp_dir(), f"{b.stem}-uki") as work:
        files = {".osrel": work / "osrel", ".cmdline": work / "cmdline", ".uname": work / "uname",
                 ".initrd": work / "initrd", ".linux": work / "linux"}
        stub, bootloader = work / "stub.efi", work / "systemd-boot.efi"
        with exported_rootfs(paths, b, "uki") as root:
            kernel, release = kernel_of(root)
            shutil.copyfile(kernel, files[".linux"])
            shutil.copyfile(inside(root, "etc/os-release"), files[".osrel"])
            shutil.copyfile(efi_file(root, uki.STUB[b.arch]), stub)
            shutil.copyfile(efi_file(root, uki.BOOTLOADER[b.arch][0]), bootloader)
            files[".uname"].write_text(release)
            uki.prepare_rootfs(root)
            say(f"    initrd: the whole root file system (cpio, zstd -{uki.ZSTD_LEVEL})")
            uki.make_initrd(root, files[".initrd"], epoch, work)
        files[".cmdline"].write_text(tb.cmdline)
        say(f"    UKI: kernel {release}, initrd {files['.initrd'].stat().st_size} bytes, cmdline: {tb.cmdline}")
        pcr = pcr_key(b)
        if pcr:
            phases = tb.phases(b.flavor.converter)
            files[".pcrpkey"], files[".pcrsig"] = work / "pcrpkey", work / "pcrsig"
            run(keyset.public_key_argv(pcr, files[".pcrpkey"]), what=f"read the public half of {keyset.PCR_PRIVATE}")
            say(f"    PCR 11 policy (systemd-measure, {uki.PCR_BANK}) for phases {', '.join(phases)}")
            uki.sign_pcr_policy(stub, files, phases, pcr, files[".pcrsig"])
        unsigned = work / "unsigned.efi"
        uki.assemble(stub, files, unsigned, epoch)
        with atomic_path(efi_out) as tmp:
            uki.sign(db_key, db_crt, unsigned, tmp, epoch)
        write_checksum(efi_out)
        say(f"    {efi_out.name}: {efi_out.stat().st_size} bytes, signed by {db_crt}")
        signed_boot = work / uki.BOOTLOADER[b.arch][1]
        uki.sign(db_key, db_crt, bootloader, signed_boot, epoch)
        (work / "loader.conf").write_text(uki.loader_conf(tb.enroll))
        (work / "entry.conf").write_text(uki.entry_conf(title(b), b.stem))
        esp = uki.esp_files(b.stem, efi_out, signed_boot, work / "loader.conf", work / "entry.conf", tb.keys, b.arch)
        with atomic_path(iso_out) as tmp:
            uki.build_iso(tmp, esp, work / "iso", native_raw.ids(b.stem)["vfat"], epoch)
        write_checksum(iso_out)
        say(f"    {iso_out.name}: {iso_out.stat().st_size} bytes (EFI only, secure-boot-enroll {tb.enroll})")


def problems(paths: Paths, b: Build, work: Path) -> list[str]:
    """What is wrong with ``b``'s UKI files (for `doit verify`), one line each: every EFI binary
    (the UKI, and the ISO's boot loader and UKI) must verify against the keys' db.crt, and the
    UKI's .cmdline must be the flavor's."""
    tb = b.flavor.trusted_boot
    cert = tb.keys / "db.crt"
    efi_out, iso_out = paths.outputs_of(b, "uki")
    found: list[str] = []
    binaries = [(efi_out.name, efi_out)]
    if iso_out.is_file():
        esp = work / uki.ESP_NAME
        try:
            run(["xorriso", "-osirrox", "on", "-indev", str(iso_out), "-extract", "/" + uki.ESP_NAME, str(esp)],
                what=f"read the ESP of {iso_out.name}")
            for rel in uki.esp_binaries(b.stem, b.arch):
                dest = work / rel.replace("/", "_")
                run(["mcopy", "-n", "-i", str(esp), f"::/{rel}", str(dest)], env={"MTOOLS_SKIP_CHECK": "1"},
                    what=f"read {rel} from {iso_out.name}")
                binaries.append((f"{iso_out.name}:/{rel}", dest))
        except CommandError:
            found.append(f"{iso_out.name}: cannot read its ESP")
    for name, path in binaries:
        if not path.is_file():
            found.append(f"{name}: missing")
            continue
        try:
            run(uki.sbverify_argv(cert, path), what=f"sbverify {name}")
        except CommandError:
            found.append(f"{name}: not signed by {cert}")
    if not efi_out.is_file():
        return found
    sections = uki.read_sections(efi_out)
    if sections.get(".cmdline", b"").rstrip(b"\0") != tb.cmdline.encode():
        found.append(f"{efi_out.name}: .cmdline is not the flavor's trusted_boot.cmdline")
    if pcr_key(b):
        found += [f"{efi_out.name}: {p}" for p in pcr_policy_problems(b, sections, work)]
    return found


def pcr_policy_problems(b: Build, sections: dict[str, bytes], work: Path) -> list[str]:
    """The PCR policy of a UKI's ``sections``: `.pcrpkey` is the public half of the keys'
    PCR key, `.pcrsig` holds a policy per phase path for what the UKI's stub measures, and each
    policy's signature verifies with that key (openssl)."""
    public, private = work / "pcr-public.pem", pcr_key(b)
    run(keyset.public_key_argv(private, public), what=f"read the public half of {keyset.PCR_PRIVATE}")
    if sections.get(".pcrpkey", b"").rstrip(b"\0") != public.read_bytes():
        return [f".pcrpkey is not the public half of {private}"]
    try:
        version = uki.stub_version(sections.get(".sdmagic", b""))   # the stub's own marker section
    except UsageError as exc:
        return [str(exc)]
    found = uki.pcr_problems(sections, b.flavor.trusted_boot.phases(b.flavor.converter), version)
    if found:
        return found
    for i, entry in enumerate(uki.pcrsig_entries(sections[".pcrsig"])):
        pol, sig = work / f"pol{i}", work / f"sig{i}"
        pol.write_bytes(bytes.fromhex(entry["pol"]))
        sig.write_bytes(base64.b64decode(entry["sig"]))
        try:
            run(uki.verify_policy_argv(public, pol, sig), what="openssl verify a PCR policy signature")
        except CommandError:
            found.append(f".pcrsig: the signature of policy {entry['pol'][:16]}... does not verify with .pcrpkey")
    return found


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        efi_out, iso_out = ctx.paths.outputs_of(b, kind)
        yield task(b.stem, f"{efi_out.name} and {iso_out.name} (signed UKI, systemd-boot ESP)",
                   action(build, ctx.paths, b, efi_out, iso_out),
                   file_dep=[ctx.paths.image_id(b), ctx.paths.pushed(b), *key_files(b)],
                   targets=ctx.paths.targets_of(b, kind), key=key(b))
