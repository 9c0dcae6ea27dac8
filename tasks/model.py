"""The flavor model: frozen dataclasses, the allowed values, image references.

This is what the stages read; tasks/config.py builds these objects from flavor
YAML. Each default lives here once, as the dataclass field default: a field with
no default is a required key of the flavor file, an absent optional key takes
the field default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .providers import PROVIDERS

VARIANTS = ("core", "standard")
ARCHES = ("amd64", "arm64")
# device -> the arches it exists for
DEVICES = {"generic": ("amd64", "arm64"), "rpi3": ("arm64",), "rpi4": ("arm64",)}
CONVERTERS = ("kairos-init", "builtin")
SQUASHFS_COMPRESSORS = ("gzip", "xz", "zstd", "lz4", "lzo")
BUILDERS = ("native", "auroraboot")
RAW_COMPRESSIONS = ("xz", "none")  # how raw images are published: <stem>.img.xz, or the .img alone
DEFAULT_AURORABOOT_IMAGE = "quay.io/kairos/auroraboot:v0.19.4"
SEVERITIES = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
POLICIES = ("report-only", "enforce")
FIRMWARES = ("bios", "uefi")  # what amd64 ISOs boot under in the boot stage
MMDEBSTRAP_VARIANTS = ("minbase", "buildd", "required", "important", "standard", "apt", "essential")

# image references: [host[:port]/]component(/component)*[:tag][@sha256:digest]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?)"
REPO_RE = re.compile(rf"^(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
REF_RE = re.compile(rf"^(?P<repo>(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
                    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """Split an image reference into (repository, tag, digest)."""
    match = REF_RE.match(ref)
    if not match:
        raise ValueError(f"not an image reference: {ref!r}")
    return match["repo"], match["tag"], match["digest"]


class ConfigError(Exception):
    """All problems found in the flavor files; str() is one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class MmdebstrapBase:
    """A base rootfs made offline by mmdebstrap from Debian's mirror."""

    suite: str
    arch: str | None = None          # None: follow each build's arch
    variant: str = "minbase"
    mirror: str = "http://deb.debian.org/debian"
    components: tuple[str, ...] = ("main",)
    include: tuple[str, ...] = ()

    def options(self) -> dict:
        return {"suite": self.suite, "variant": self.variant, "mirror": self.mirror,
                "components": list(self.components), "include": list(self.include)}


@dataclass(frozen=True)
class BuiltinOptions:
    """Options of the builtin (offline) converter."""

    packages: tuple[str, ...] = ()         # extra Debian packages installed into the image


@dataclass(frozen=True)
class BootOptions:
    """The boot stage: every bootable artifact must reach its login prompt in qemu."""

    timeout: int = 300                      # seconds one boot may take to the login prompt
    firmware: tuple[str, ...] = FIRMWARES   # the firmware ISOs boot under (raw generic: uefi)
    memory: int = 2048                      # MiB of the emulated machine


# Trusted Boot (UKI): AuroraBoot's UKI command line, and systemd-boot 252's secure-boot-enroll values
UKI_CMDLINE = ("console=ttyS0 console=tty1 net.ifnames=1 rd.immucore.oemlabel=COS_OEM rd.immucore.oemtimeout=2 "
               "rd.immucore.uki selinux=0 panic=5 rd.shell=0 systemd.crash_reboot=yes")
ENROLL = ("off", "manual", "force")
SECURE_BOOT_FILES = ("db.key", "db.crt", "PK.auth", "KEK.auth", "db.auth")  # what a uki build needs of the keys
# the PCR 11 phase paths a UKI's policy is signed for when the flavor names none, by converter:
# kairos-init images pass an initrd phase (immucore), systemd-measure's default; builtin UKIs run
# systemd straight from the initrd's root file system, which passes sysinit and ready only
PCR_PHASES = {"kairos-init": ("enter-initrd", "enter-initrd:leave-initrd", "enter-initrd:leave-initrd:sysinit",
                              "enter-initrd:leave-initrd:sysinit:ready"),
              "builtin": ("sysinit", "sysinit:ready")}


@dataclass(frozen=True)
class TrustedBoot:
    """`trusted_boot: true` (kairos-init -t true) or a mapping, which also says how the `uki`
    artifact is made and signed (keys made by `python -m tasks genkey DIR`)."""

    keys: Path | None = None           # the genkey directory: db.key/db.crt sign, *.auth are enrolled
    cmdline: str = UKI_CMDLINE         # the UKI's kernel command line
    enroll: str = "force"              # systemd-boot's secure-boot-enroll on the -uki.iso
    pcr_phases: tuple[str, ...] = ()   # phase paths of the PCR policy; (): the converter's PCR_PHASES

    def phases(self, converter: str) -> tuple[str, ...]:
        return self.pcr_phases or PCR_PHASES[converter]


@dataclass(frozen=True)
class SquashfsOptions:
    compression: str = "gzip"
    block_size: str = "1024k"


@dataclass(frozen=True)
class ScanOptions:
    """Vulnerability/secret scanning policy of trivy and grype."""

    policy: str = "report-only"        # or "enforce": fail on findings at or above severity
    severity: str = "CRITICAL"
    vulnerabilities: bool = True       # false: trivy scans secrets only, grype is not allowed
    trivy_db: Path | None = None       # trivy cache dir holding db/trivy.db + db/metadata.json
    grype_db: Path | None = None       # GRYPE_DB_CACHE_DIR holding a grype database
    download_db: bool = False          # let the scanners download their databases (needs network)


@dataclass(frozen=True)
class SignOptions:
    """cosign signing: key-based offline (default) or keyless."""

    key: Path | None = None            # cosign.key; cosign.pub must sit next to it
    password_env: str = "COSIGN_PASSWORD"
    keyless: bool = False


OWN_TAG = "own"   # cache_from: the build's own image tag in its registry (its last push)


@dataclass(frozen=True)
class Flavor:
    """One flavor file, validated. Fields are the flavor file's keys (but path); fields
    without a default are required keys."""

    path: Path
    flavor: str
    release: str
    base_image: str | MmdebstrapBase
    version: str
    variants: tuple[str, ...]
    # one field <provider>_versions per provider of PROVIDERS, in its order
    k3s_versions: tuple[str, ...] = field(default=(), kw_only=True)
    k0s_versions: tuple[str, ...] = field(default=(), kw_only=True)
    arches: tuple[str, ...]
    devices: tuple[str, ...]
    converter: str = field(default="kairos-init", kw_only=True)
    kairos_init_image: str | None = field(default=None, kw_only=True)  # required by converter kairos-init
    registry: str
    artifacts: tuple[str, ...]
    overlay: Path | None = None
    trusted_boot: TrustedBoot | None = None   # None: false
    fips: bool = False
    raw_generic: bool = False
    raw_compression: str = "xz"        # xz: also <stem>.img.xz, and the -img carrier holds it (as upstream)
    raw_xz_level: int = 6              # xz's preset (0-9) for <stem>.img.xz; 6 is xz's own default
    builtin: BuiltinOptions = field(default_factory=BuiltinOptions)
    squashfs: SquashfsOptions = field(default_factory=SquashfsOptions)
    builder: str = "native"
    auroraboot_image: str = DEFAULT_AURORABOOT_IMAGE
    netboot_url: str | None = None
    scan: ScanOptions = field(default_factory=ScanOptions)
    sign: SignOptions = field(default_factory=SignOptions)
    boot: BootOptions = field(default_factory=BootOptions)
    cloud_config: Path | None = None   # baked into the ISO (/config.yaml) and raw images (COS_OEM)
    # image refs whose BuildKit inline cache the conversion reuses; OWN_TAG: each build's own tag
    # (its last push); (): none, and the converted images carry no inline cache
    cache_from: tuple[str, ...] = (OWN_TAG,)
    # SOURCE_DATE_EPOCH of this flavor's builds (None: the environment's, else tasks/epoch.py's default)
    source_date_epoch: int | None = None

    def provider_versions(self) -> tuple[tuple[str, str], ...]:
        """(provider, version) of each standard build: every version of every `<provider>_versions`
        field, in PROVIDERS order."""
        return tuple((name, version) for name, p in PROVIDERS.items() for version in getattr(self, p.key))
