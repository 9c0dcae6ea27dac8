"""The artifact-kind registry: what each kind of artifact is, said once.

One `Kind` entry per artifact a flavor can list under `artifacts:`: the files it
writes (relative to the build's stem), whether each gets a `<file>.sha256`, the
builds it applies to (the matrix rules), the kinds it is built from, the stage
module that builds it and the programs that stage runs. `PROGRAMS` (tasks/needs.py) says
which package provides each program and how to ask its version.

A kind with `implied_by` is not listed by flavors: a build gets it with any of those kinds,
when its own matrix rule says so (`xz`: the compressed raw image, by `raw_compression`).

Everything else derives from here: the allowed `artifacts:` values, file names
(`naming.artifact_files`), the matrix (`Build.kinds`), preflight's tool list, the
manifest's tool versions, `plan`, and the doit tasks of dodo.py (one task per kind,
its docstring is `Kind.doc`). A new kind is one entry here, one stage module under
tasks/stages/ with `tasks(ctx, kind)`, and its tests. Pure data: it imports only tasks/needs.py
(pure data too), so every module may import it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .needs import AAVMF, IPXE_LKRN, OVMF, PROGRAMS, SYSTEMD_EFI, Program  # noqa: F401 (PROGRAMS, Program: re-exported)

CHECKSUM_SUFFIX = ".sha256"          # `<file>.sha256` in sha256sum format
BLOB_SIGNATURE_SUFFIXES = (".sig", ".bundle")  # cosign sign-blob of each `.sha256`
SBOM_SPDX = "-sbom.spdx.json"        # the SBOM the sign stage attests
PROVENANCE = "-provenance.json"      # the SLSA provenance predicate the sign stage attests


def _always(b) -> bool:
    return True


def native(b) -> bool:
    """The build's ISO/raw images come from the native (Debian tools) builder."""
    return b.flavor.builder == "native"


def auroraboot(b) -> bool:
    """The build's ISO/raw images come from the AuroraBoot container."""
    return b.flavor.builder == "auroraboot"


def signs_pcr_policy(b) -> bool:
    """The build's Secure Boot keys hold the PCR policy key: its UKI gets `.pcrsig` (systemd-measure)."""
    from .stages.uki import pcr_key  # here, not at the top: the stages import this module
    return pcr_key(b) is not None


def board(b) -> bool:
    """A single-board computer (rpi3, rpi4): firmware boot instead of EFI."""
    return b.device != "generic"


@dataclass(frozen=True)
class Need:
    """A program a stage runs for a build, what for, and for which builds."""

    program: str
    purpose: str
    when: Callable = _always


@dataclass(frozen=True)
class Kind:
    """One artifact kind (see the module docstring)."""

    name: str
    doc: str                                  # the doit task docstring (`doit list`)
    stage: str                                # module under tasks/stages/ with tasks(ctx, kind)
    suffixes: tuple[str, ...] = ()            # files, appended to the build's stem
    checksummed: bool = False                 # each file also gets <file>.sha256
    devices: tuple[str, ...] | None = None    # only for these devices (None: all)
    arches: tuple[str, ...] | None = None     # only for these arches (None: all)
    applies: Callable = _always               # any further matrix rule
    built_from: tuple[str, ...] = ()          # kinds it is made of (they are built too) ...
    built_from_when: Callable = _always       # ... for the builds this says
    requires_any: tuple[str, ...] = ()        # kept only when the build gets one of these kinds
    implied_by: tuple[str, ...] = ()          # not listed by flavors: comes with one of these kinds
    needs: tuple[Need, ...] = ()
    also_writes: tuple[str, ...] = ()         # other per-build files its stage writes (not artifacts)

    def for_build(self, b) -> bool:
        """The matrix rule: does ``b`` get this kind when its flavor lists it (pure)?"""
        return ((self.devices is None or b.device in self.devices)
                and (self.arches is None or b.arch in self.arches) and self.applies(b))

    def inputs(self, b) -> tuple[str, ...]:
        """Kinds ``b``'s artifact of this kind is built from."""
        return self.built_from if self.built_from_when(b) else ()

    def files(self, stem: str) -> list[str]:
        """File names for one build, checksums included (after the files)."""
        names = [stem + s for s in self.suffixes]
        return names + ([n + CHECKSUM_SUFFIX for n in names] if self.checksummed else [])

    def tools_for(self, b) -> dict[str, str]:
        """Program -> what it is needed for, for ``b`` (preflight checks them)."""
        return {n.program: n.purpose for n in self.needs if n.when(b)}


BOOT_FILES = ("kernel", "initrd", "squashfs")  # what the native ISO, raw and iPXE builders are made of
BOOTABLE = ("iso", "raw", "ipxe", "uki")       # what the boot stage boots
RUN_AURORABOOT = "run the AuroraBoot container (builder: auroraboot)"

REGISTRY: tuple[Kind, ...] = (
    Kind("iso", "Build <stem>.iso: live ISO (volume COS_LIVE; amd64 BIOS+EFI, arm64 EFI) from kernel, initrd, squashfs.",
         stage="iso", suffixes=(".iso",), checksummed=True, devices=("generic",),
         built_from=BOOT_FILES, built_from_when=native,
         needs=(Need("docker", RUN_AURORABOOT, auroraboot),
                Need("grub-mkrescue", "build the bootable ISO", native),
                Need("xorriso", "write the ISO image (grub-mkrescue calls it)", native),
                Need("mformat", "build the ISO's EFI system image (grub-mkrescue calls it)", native),
                Need("faketime", "run grub-mkrescue at SOURCE_DATE_EPOCH, so the ISO is reproducible", native),
                Need("unsquashfs", "take the image's arm64 grub modules out of its squashfs",
                     lambda b: native(b) and b.arch == "arm64"))),
    Kind("raw", "Build the raw disk <stem>.img (rpi3/rpi4 firmware boot; generic amd64 EFI with raw_generic).",
         stage="raw", suffixes=(".img",), checksummed=True,
         applies=lambda b: board(b) or b.flavor.raw_generic,  # generic raw images only when asked
         built_from=BOOT_FILES, built_from_when=native,
         needs=(Need("docker", RUN_AURORABOOT, auroraboot),
                Need("sfdisk", "write the partition table of the raw disk image", native),
                Need("mkfs.vfat", "make the firmware/boot FAT partition of the raw disk image", native),
                Need("mmd", "make directories in the FAT partition of the raw disk image", native),
                Need("mcopy", "copy the firmware, kernel and initrd into the FAT partition", native),
                Need("mkfs.ext4", "make the Kairos ext4 partitions of the raw disk image", native),
                Need("unsquashfs", "take the Raspberry Pi firmware and device trees out of the squashfs",
                     lambda b: native(b) and board(b)),
                Need("debugfs", "date the files of the raw disk image's ext4 partitions at SOURCE_DATE_EPOCH", native),
                Need("faketime", "run mkfs.vfat and mtools at SOURCE_DATE_EPOCH, so the raw image is reproducible",
                     native),
                Need("grub-mkimage", "build the GRUB EFI loader of the generic raw disk image",
                     lambda b: native(b) and not board(b)))),
    Kind("xz", "Compress <stem>.img to <stem>.img.xz (xz, multi-threaded, reproducible; raw_compression: xz).",
         stage="xz", suffixes=(".img.xz",), checksummed=True, implied_by=("raw",), built_from=("raw",),
         applies=lambda b: b.flavor.raw_compression == "xz",
         needs=(Need("xz", "compress the raw disk image and check the compressed file"),)),
    Kind("ipxe", "Write <stem>.ipxe, <stem>-ipxe.iso and <stem>-ipxe-usb.img (netboot; amd64 generic).",
         stage="ipxe", suffixes=(".ipxe", "-ipxe.iso", "-ipxe-usb.img"), checksummed=True,
         devices=("generic",), arches=("amd64",),  # the media start Debian's BIOS iPXE
         built_from=BOOT_FILES,
         needs=(Need("grub-mkrescue", "build the iPXE ISO"),
                Need("xorriso", "build the iPXE ISO (grub-mkrescue writes it with xorriso)"),
                Need("grub-mkimage", "build the boot loader of the iPXE USB image"),
                Need(IPXE_LKRN, "put Debian's iPXE on the iPXE ISO and USB image"),
                Need("sfdisk", "write the partition table of the iPXE USB image"),
                Need("mkfs.vfat", "make the FAT partition of the iPXE USB image"),
                Need("mcopy", "copy iPXE and its script into the iPXE USB image"),
                Need("faketime", "run grub-mkrescue, mkfs.vfat and mcopy at SOURCE_DATE_EPOCH, so the iPXE media are "
                     "reproducible"))),
    Kind("uki", "Build <stem>-uki.efi (signed UKI: systemd-stub, kernel, whole-rootfs initrd) and <stem>-uki.iso.",
         stage="uki", suffixes=("-uki.efi", "-uki.iso"), checksummed=True, devices=("generic",), arches=("amd64",),
         needs=(Need("tar", "unpack the image root filesystem"),
                Need("cpio", "write the UKI's initrd (the whole root filesystem)"),
                Need("zstd", "compress the UKI's initrd"),
                Need("objdump", "read the sections of the EFI stub"),
                Need("objcopy", "add the UKI sections to the EFI stub"),
                Need(SYSTEMD_EFI, "take systemd's EFI stub and systemd-boot from the host when the image has none"),
                Need("systemd-measure", "sign the UKI's PCR 11 policy (keys holding tpm2-pcr-private.pem)",
                     signs_pcr_policy),
                Need("openssl", "read the public half of the PCR policy key", signs_pcr_policy),
                Need("sbsign", "sign the UKI and systemd-boot with the db key"),
                Need("faketime", "sign at SOURCE_DATE_EPOCH, so the signed files are reproducible"),
                Need("sbverify", "check the signatures against db.crt"),
                Need("mkfs.vfat", "make the ESP of the -uki.iso"),
                Need("mmd", "make directories in the ESP"),
                Need("mcopy", "copy systemd-boot, the UKI and the keys into the ESP"),
                Need("xorriso", "write the EFI-only -uki.iso"))),
    Kind("kernel", "Extract <stem>-kernel from the image's /boot.",
         stage="extract", suffixes=("-kernel",), checksummed=True),
    Kind("initrd", "Extract <stem>-initrd from the image's /boot.",
         stage="extract", suffixes=("-initrd",), checksummed=True),
    Kind("squashfs", "Build <stem>.squashfs of the image's root filesystem.",
         stage="extract", suffixes=(".squashfs",), checksummed=True,
         needs=(Need("mksquashfs", "build the .squashfs root filesystem"),
                Need("tar", "unpack the image root filesystem"))),
    Kind("boot", "Boot each bootable artifact in qemu to its login prompt; write <stem>-boot.json and -boot.log.",
         stage="boot", suffixes=("-boot.json", "-boot.log"), requires_any=BOOTABLE,
         needs=(Need("qemu-system-x86_64", "boot amd64 artifacts in an emulator", lambda b: b.arch == "amd64"),
                Need("qemu-system-aarch64", "boot arm64 artifacts in an emulator", lambda b: b.arch == "arm64"),
                Need(OVMF, "boot amd64 artifacts under UEFI (and probe KVM)", lambda b: b.arch == "amd64"),
                Need(AAVMF, "boot arm64 ISOs under UEFI", lambda b: b.arch == "arm64" and not board(b)),
                Need("swtpm", "give the Secure Boot machine a TPM 2.0 (uki)", lambda b: "uki" in b.kinds),
                Need("sfdisk", "find the boot partition of a Raspberry Pi image", board),
                Need("mcopy", "read the kernel, initrd and command line of a Raspberry Pi image", board),
                Need("virt-fw-vars", "enrol the Secure Boot keys into the firmware variables (uki)",
                     lambda b: "uki" in b.kinds))),
    Kind("sbom", "Write <stem>-sbom.spdx.json and -sbom.syft.json of the image (syft).",
         stage="sbom", suffixes=(SBOM_SPDX, "-sbom.syft.json"),
         needs=(Need("syft", "write the SBOMs"),)),
    Kind("trivy", "Write <stem>-trivy.json and -trivy.sarif (vulnerabilities and secrets), apply the scan policy.",
         stage="scan", suffixes=("-trivy.sarif", "-trivy.json"),
         needs=(Need("trivy", "scan the image with trivy"),)),
    Kind("grype", "Write <stem>-grype.json and -grype.sarif, apply the scan policy.",
         stage="scan", suffixes=("-grype.json", "-grype.sarif"),
         needs=(Need("grype", "scan the image with grype"),)),
    Kind("sign", "cosign: sign the image, attest SBOM and SLSA provenance, sign-blob every .sha256.",
         stage="sign", also_writes=(PROVENANCE,),
         needs=(Need("cosign", "sign images and artifacts"),)),
)

KINDS: dict[str, Kind] = {k.name: k for k in REGISTRY}
ARTIFACT_KINDS: tuple[str, ...] = tuple(k.name for k in REGISTRY if not k.implied_by)  # `artifacts:` values


def boot_file_names(stem: str) -> tuple[str, ...]:
    """`<stem>-kernel`, `<stem>-initrd`, `<stem>.squashfs`."""
    return tuple(stem + KINDS[kind].suffixes[0] for kind in BOOT_FILES)
