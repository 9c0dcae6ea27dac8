"""Flavor YAML -> validated, frozen dataclasses.

Every problem is reported as ``file:line: key.path: message`` and all problems
of all files are reported at once (ConfigError). Unknown keys are errors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import k3s

ARTIFACT_KINDS = ("iso", "raw", "ipxe", "kernel", "initrd", "squashfs", "sbom", "trivy", "grype", "sign")
VARIANTS = ("core", "standard")
ARCHES = ("amd64", "arm64")
# device -> the arches it exists for
DEVICES = {"generic": ("amd64", "arm64"), "rpi3": ("arm64",), "rpi4": ("arm64",)}
CONVERTERS = ("kairos-init", "builtin")
SQUASHFS_COMPRESSORS = ("gzip", "xz", "zstd", "lz4", "lzo")
INITRAMFS_MODULES = ("most", "dep", "list", "netboot")
BUILDERS = ("native", "auroraboot")
DEFAULT_AURORABOOT_IMAGE = "quay.io/kairos/auroraboot:v0.19.4"
SEVERITIES = ("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")
POLICIES = ("report-only", "enforce")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
URL_RE = re.compile(r"^https?://[^\s/]+(/\S*)?$")

VERSION_RE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?$")
K3S_RE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-rc\d+)?\+k3s\d+$")
FLAVOR_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
RELEASE_RE = re.compile(r"^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$")
SUITE_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*(:[a-z0-9]+)?$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*(?::[0-9]+)?)"
REPO_RE = re.compile(rf"^(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*$")
REF_RE = re.compile(rf"^(?P<repo>(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
                    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")


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

    packages: tuple[str, ...] = ()
    initramfs_modules: str = "most"


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


@dataclass(frozen=True)
class Flavor:
    """One flavor file, validated."""

    path: Path
    flavor: str
    release: str
    base_image: str | MmdebstrapBase
    version: str
    variants: tuple[str, ...]
    k3s_versions: tuple[str, ...]
    arches: tuple[str, ...]
    devices: tuple[str, ...]
    converter: str
    kairos_init_image: str | None
    registry: str
    artifacts: tuple[str, ...]
    overlay: Path | None = None
    trusted_boot: bool = False
    fips: bool = False
    raw_generic: bool = False
    builtin: BuiltinOptions = field(default_factory=BuiltinOptions)
    squashfs: SquashfsOptions = field(default_factory=SquashfsOptions)
    builder: str = "native"
    auroraboot_image: str = DEFAULT_AURORABOOT_IMAGE
    netboot_url: str | None = None
    scan: ScanOptions = field(default_factory=ScanOptions)
    sign: SignOptions = field(default_factory=SignOptions)
    cloud_config: Path | None = None   # baked into the ISO (/config.yaml) and raw images (COS_OEM)


# --- YAML loading with line numbers and duplicate-key detection -------------

class _Map(dict):
    """A mapping that remembers the line of each key (1-based) and the source
    text of scalar values (so messages quote what the user wrote)."""

    lines: dict
    raw: dict


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    result = _Map()
    result.lines = {}
    result.raw = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain strings", key_node.start_mark)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.ScalarNode):
            result.raw[key] = value_node.value
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"{where}: malformed YAML: {problem}"


# --- validation ----------------------------------------------------------------

class _Checker:
    """Collects problems for one file; helpers return a value or None."""

    def __init__(self, path: Path, doc: _Map, problems: list[str]):
        self.path = path
        self.doc = doc
        self.problems = problems

    def where(self, keypath: str, mapping: dict | None = None, key: str | None = None) -> str:
        line = getattr(mapping if mapping is not None else self.doc, "lines", {}).get(
            key if key is not None else keypath.split(".")[0])
        return f"{self.path}:{line}" if line else f"{self.path}"

    def problem(self, keypath: str, message: str, mapping: dict | None = None, key: str | None = None):
        self.problems.append(f"{self.where(keypath, mapping, key)}: {keypath}: {message}")

    def unknown_keys(self, mapping: dict, allowed: tuple[str, ...], prefix: str = "") -> None:
        for key in mapping:
            if key not in allowed:
                shown = key if re.fullmatch(r"[\w.-]+", str(key)) else repr(key)
                self.problem(f"{prefix}{shown}", f"unknown key (allowed: {', '.join(allowed)})", mapping, key)

    def string(self, mapping, key, prefix="", required=True, pattern=None, hint="", default=None):
        keypath = f"{prefix}{key}"
        if key not in mapping:
            if required:
                self.problems.append(f"{self.path}: {keypath}: missing required key")
            return default
        value = mapping[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = getattr(mapping, "raw", {}).get(key, str(value))
            self.problem(keypath, f"must be a string, got number {text}; quote it, e.g. \"{text}\"",
                         mapping, key)
            return None
        if not isinstance(value, str):
            self.problem(keypath, f"must be a string, got {_type_name(value)}", mapping, key)
            return None
        if pattern is not None and not pattern.match(value):
            self.problem(keypath, f"invalid value {value!r}{': ' + hint if hint else ''}", mapping, key)
            return None
        return value

    def boolean(self, mapping, key, prefix="", default=False):
        if key not in mapping:
            return default
        value = mapping[key]
        if not isinstance(value, bool):
            self.problem(f"{prefix}{key}", f"must be true or false, got {_type_name(value)} {value!r}",
                         mapping, key)
            return default
        return value

    def choice_list(self, mapping, key, choices, prefix="", required=True, pattern=None, hint=""):
        keypath = f"{prefix}{key}"
        if key not in mapping:
            if required:
                self.problems.append(f"{self.path}: {keypath}: missing required key")
            return None
        value = mapping[key]
        if not isinstance(value, list):
            self.problem(keypath, f"must be a list, got {_type_name(value)}", mapping, key)
            return None
        out: list[str] = []
        ok = True
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.problem(f"{keypath}[{i}]", f"must be a string, got {_type_name(item)} {item!r}",
                             mapping, key)
                ok = False
            elif choices is not None and item not in choices:
                self.problem(f"{keypath}[{i}]", f"unknown value {item!r} (allowed: {', '.join(choices)})",
                             mapping, key)
                ok = False
            elif pattern is not None and not pattern.match(item):
                self.problem(f"{keypath}[{i}]", f"invalid value {item!r}{': ' + hint if hint else ''}",
                             mapping, key)
                ok = False
            elif item in out:
                self.problem(f"{keypath}[{i}]", f"duplicate value {item!r}", mapping, key)
                ok = False
            else:
                out.append(item)
        return tuple(out) if ok else None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", _Map: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


TOP_KEYS = ("flavor", "release", "base_image", "version", "variants", "k3s_versions", "arches", "devices",
            "converter", "kairos_init_image", "registry", "artifacts", "overlay", "trusted_boot", "fips",
            "raw_generic", "builtin", "squashfs", "builder", "auroraboot_image", "netboot_url", "scan", "sign", "cloud_config", "k3s_policy")
K3S_POLICY_KEYS = ("current", "available")
SCAN_KEYS = ("policy", "severity", "vulnerabilities", "trivy_db", "grype_db", "download_db")
SIGN_KEYS = ("key", "password_env", "keyless")
MMDEBSTRAP_KEYS = ("suite", "arch", "variant", "mirror", "components", "include")
BUILTIN_KEYS = ("packages", "initramfs_modules")
SQUASHFS_KEYS = ("compression", "block_size")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """Split an image reference into (repository, tag, digest)."""
    match = REF_RE.match(ref)
    if not match:
        raise ValueError(f"not an image reference: {ref!r}")
    return match["repo"], match["tag"], match["digest"]


def _check_base(c: _Checker, doc: _Map) -> str | MmdebstrapBase | None:
    if "base_image" not in doc:
        c.problems.append(f"{c.path}: base_image: missing required key")
        return None
    value = doc["base_image"]
    if isinstance(value, str):
        if not REF_RE.match(value):
            c.problem("base_image", f"not an image reference: {value!r} (expected e.g. ubuntu:24.04 or "
                      "registry.example.com/team/ubuntu:24.04)")
            return None
        return value
    if isinstance(value, dict) and set(value) == {"mmdebstrap"} and isinstance(value["mmdebstrap"], dict):
        spec = value["mmdebstrap"]
        p = "base_image.mmdebstrap."
        c.unknown_keys(spec, MMDEBSTRAP_KEYS, p)
        suite = c.string(spec, "suite", p, pattern=SUITE_RE, hint="a Debian suite such as bookworm")
        arch = c.string(spec, "arch", p, required=False)
        if arch is not None and arch not in ARCHES:
            c.problem(p + "arch", f"unknown arch {arch!r} (allowed: {', '.join(ARCHES)})", spec, "arch")
            arch = None
        variant = c.string(spec, "variant", p, required=False, default="minbase")
        if variant not in ("minbase", "buildd", "required", "important", "standard", "apt", "essential"):
            c.problem(p + "variant", f"unknown mmdebstrap variant {variant!r}", spec, "variant")
        mirror = c.string(spec, "mirror", p, required=False, default=MmdebstrapBase.mirror,
                          pattern=re.compile(r"^(https?|file)://\S+$"), hint="a mirror URL")
        components = c.choice_list(spec, "components", None, p, required=False, pattern=SUITE_RE)
        include = c.choice_list(spec, "include", None, p, required=False, pattern=PACKAGE_RE,
                                hint="a Debian package name")
        if suite is None:
            return None
        return MmdebstrapBase(suite=suite, arch=arch, variant=variant or "minbase",
                              mirror=mirror or MmdebstrapBase.mirror,
                              components=components or ("main",), include=include or ())
    c.problem("base_image", "must be an image reference string or {mmdebstrap: {suite: ..., arch: ...}}, "
              f"got {_type_name(value)}")
    return None


def _section(c: _Checker, doc: _Map, name: str, keys: tuple[str, ...]) -> dict | None:
    if name not in doc:
        return {}
    spec = doc[name]
    if not isinstance(spec, dict):
        c.problem(name, f"must be a mapping, got {_type_name(spec)}")
        return None
    c.unknown_keys(spec, keys, f"{name}.")
    return spec


def _path_option(c: _Checker, spec: dict, name: str, key: str, base: Path, kind: str) -> Path | None:
    prefix = f"{name}." if name else ""
    raw = c.string(spec, key, prefix, required=False)
    if raw is None:
        return None
    resolved = (base / raw).resolve()
    ok = resolved.is_dir() if kind == "dir" else resolved.is_file()
    if not ok:
        c.problem(f"{prefix}{key}", f"{'directory' if kind == 'dir' else 'file'} {raw!r} does not exist "
                  f"(resolved to {resolved})", spec, key)
        return None
    return resolved


def _check_scan(c: _Checker, doc: _Map, path: Path) -> ScanOptions | None:
    spec = _section(c, doc, "scan", SCAN_KEYS)
    if spec is None:
        return None
    policy = c.string(spec, "policy", "scan.", required=False, default="report-only")
    if policy not in POLICIES:
        c.problem("scan.policy", f"unknown policy {policy!r} (allowed: {', '.join(POLICIES)})", spec, "policy")
    severity = c.string(spec, "severity", "scan.", required=False, default="CRITICAL")
    if severity not in SEVERITIES:
        c.problem("scan.severity", f"unknown severity {severity!r} (allowed: {', '.join(SEVERITIES)})",
                  spec, "severity")
    return ScanOptions(policy=policy, severity=severity,
                       vulnerabilities=c.boolean(spec, "vulnerabilities", "scan.", default=True),
                       trivy_db=_path_option(c, spec, "scan", "trivy_db", path.parent, "dir"),
                       grype_db=_path_option(c, spec, "scan", "grype_db", path.parent, "dir"),
                       download_db=c.boolean(spec, "download_db", "scan.", default=False))


def _check_sign(c: _Checker, doc: _Map, path: Path) -> SignOptions | None:
    spec = _section(c, doc, "sign", SIGN_KEYS)
    if spec is None:
        return None
    key = _path_option(c, spec, "sign", "key", path.parent, "file")
    if key is not None and not key.with_suffix(".pub").is_file():
        c.problem("sign.key", f"no public key {key.with_suffix('.pub').name} next to {key}", spec, "key")
    env = c.string(spec, "password_env", "sign.", required=False, default="COSIGN_PASSWORD", pattern=ENV_RE,
                   hint="an environment variable name")
    return SignOptions(key=key, password_env=env or "COSIGN_PASSWORD",
                       keyless=c.boolean(spec, "keyless", "sign.", default=False))


def cloud_config_problems(path: Path) -> list[str]:
    """Problems of a cloud-config file, each naming `file:line` (pure but for reading it)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{path}: cannot read: {exc}"]
    if text.split("\n", 1)[0].rstrip() != "#cloud-config":
        return [f"{path}:1: a cloud-config must start with the line #cloud-config"]
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        return [_yaml_problem(path, exc)]
    if doc is not None and not isinstance(doc, dict):
        return [f"{path}:2: a cloud-config is a YAML mapping, got {_type_name(doc)}"]
    return []


def _check_cloud_config(c: _Checker, doc: _Map, path: Path) -> Path | None:
    found = _path_option(c, doc, "", "cloud_config", path.parent, "file") if "cloud_config" in doc else None
    if found is None:
        return None
    problems = cloud_config_problems(found)
    for problem in problems:
        c.problem("cloud_config", problem)
    return None if problems else found


def _k3s_by_policy(c: _Checker, doc: _Map, path: Path) -> tuple[str, ...] | None:
    """k3s_versions: policy -> the next versions from k3s_policy {current, available}."""
    spec = _section(c, doc, "k3s_policy", K3S_POLICY_KEYS)
    if not spec:
        if spec == {}:
            c.problem("k3s_policy", "required with k3s_versions: policy: {current: [...], available: FILE}")
        return None
    current = c.choice_list(spec, "current", None, "k3s_policy.", pattern=K3S_RE,
                            hint="a k3s release such as v1.28.2+k3s1")
    available = _path_option(c, spec, "k3s_policy", "available", path.parent, "file")
    if not current or available is None:
        return None
    try:
        upstream = k3s.parse_available(available.read_text())
    except (OSError, ValueError) as exc:
        c.problem("k3s_policy.available", f"{available}: {exc}", spec, "available")
        return None
    return tuple(str(v) for v in k3s.next_versions([k3s.parse(v) for v in current], upstream))


def _check_doc(path: Path, doc: Any, problems: list[str]) -> Flavor | None:
    if not isinstance(doc, dict):
        problems.append(f"{path}: the file must hold one mapping of flavor keys, got {_type_name(doc)}")
        return None
    start = len(problems)
    c = _Checker(path, doc, problems)
    c.unknown_keys(doc, TOP_KEYS)
    flavor = c.string(doc, "flavor", pattern=FLAVOR_RE, hint="lowercase letters, digits and dashes")
    release = c.string(doc, "release", pattern=RELEASE_RE, hint="letters, digits, '.', '_' and '-'")
    base = _check_base(c, doc)
    version = c.string(doc, "version", pattern=VERSION_RE, hint="a semantic version with a leading v, e.g. v3.1.0")
    variants = c.choice_list(doc, "variants", VARIANTS)
    if doc.get("k3s_versions") == "policy":
        k3s = _k3s_by_policy(c, doc, path)
    else:
        k3s = c.choice_list(doc, "k3s_versions", None, required=False, pattern=K3S_RE,
                            hint="a k3s release such as v1.28.2+k3s1, or the word policy (see k3s_policy)")
        if "k3s_policy" in doc:
            c.problem("k3s_policy", "only used with k3s_versions: policy")
    arches = c.choice_list(doc, "arches", ARCHES)
    devices = c.choice_list(doc, "devices", tuple(DEVICES))
    converter = c.string(doc, "converter", required=False, default="kairos-init")
    if converter is not None and converter not in CONVERTERS:
        c.problem("converter", f"unknown converter {converter!r} (allowed: {', '.join(CONVERTERS)})")
        converter = None
    kairos_init = c.string(doc, "kairos_init_image", required=False)
    registry = c.string(doc, "registry", pattern=REPO_RE,
                        hint="a repository prefix without tag, e.g. 127.0.0.1:5000/kairos")
    artifacts = c.choice_list(doc, "artifacts", ARTIFACT_KINDS)
    trusted = c.boolean(doc, "trusted_boot")
    fips = c.boolean(doc, "fips")
    raw_generic = c.boolean(doc, "raw_generic")

    overlay = None
    if "overlay" in doc:
        raw = c.string(doc, "overlay", required=False)
        if raw is not None:
            overlay = (path.parent / raw).resolve()
            if not overlay.is_dir():
                c.problem("overlay", f"directory {raw!r} does not exist (resolved to {overlay})")
                overlay = None

    builtin = BuiltinOptions()
    if "builtin" in doc:
        spec = doc["builtin"]
        if not isinstance(spec, dict):
            c.problem("builtin", f"must be a mapping, got {_type_name(spec)}")
        else:
            c.unknown_keys(spec, BUILTIN_KEYS, "builtin.")
            packages = c.choice_list(spec, "packages", None, "builtin.", required=False, pattern=PACKAGE_RE,
                                     hint="a Debian package name")
            modules = c.string(spec, "initramfs_modules", "builtin.", required=False, default="most")
            if modules not in INITRAMFS_MODULES:
                c.problem("builtin.initramfs_modules", f"unknown value {modules!r} (allowed: "
                          f"{', '.join(INITRAMFS_MODULES)})", spec, "initramfs_modules")
                modules = "most"
            builtin = BuiltinOptions(packages=packages or (), initramfs_modules=modules)
        if converter == "kairos-init":
            c.problem("builtin", "only used with converter: builtin (this flavor uses kairos-init)")

    squashfs = SquashfsOptions()
    if "squashfs" in doc:
        spec = doc["squashfs"]
        if not isinstance(spec, dict):
            c.problem("squashfs", f"must be a mapping, got {_type_name(spec)}")
        else:
            c.unknown_keys(spec, SQUASHFS_KEYS, "squashfs.")
            comp = c.string(spec, "compression", "squashfs.", required=False, default="gzip")
            if comp not in SQUASHFS_COMPRESSORS:
                c.problem("squashfs.compression", f"unknown compressor {comp!r} (allowed: "
                          f"{', '.join(SQUASHFS_COMPRESSORS)})", spec, "compression")
                comp = "gzip"
            block = c.string(spec, "block_size", "squashfs.", required=False, default="1024k",
                             pattern=re.compile(r"^\d+[kKmM]?$"), hint="e.g. 1024k")
            squashfs = SquashfsOptions(compression=comp, block_size=block or "1024k")

    builder = c.string(doc, "builder", required=False, default="native")
    if builder is not None and builder not in BUILDERS:
        c.problem("builder", f"unknown builder {builder!r} (allowed: {', '.join(BUILDERS)})")
        builder = None
    auroraboot = c.string(doc, "auroraboot_image", required=False, default=DEFAULT_AURORABOOT_IMAGE,
                          pattern=REF_RE, hint="an image reference such as " + DEFAULT_AURORABOOT_IMAGE)
    netboot_url = c.string(doc, "netboot_url", required=False, pattern=URL_RE,
                           hint="an http(s) URL where the kernel, initrd and squashfs are served")
    if netboot_url:
        netboot_url = netboot_url.rstrip("/")

    scan = _check_scan(c, doc, path)
    sign = _check_sign(c, doc, path)
    cloud_config = _check_cloud_config(c, doc, path)

    # cross-field rules
    if artifacts is not None and "grype" in artifacts and scan and not scan.vulnerabilities:
        c.problem("artifacts", "grype only scans vulnerabilities, which scan.vulnerabilities: false turns off; "
                  "remove grype from artifacts")
    if artifacts is not None and "sign" in artifacts and sign and not sign.keyless and sign.key is None:
        problems.append(f"{path}: sign.key: required when artifacts lists sign (a cosign.key made by "
                        "`cosign generate-key-pair`), or set sign.keyless: true")
    if artifacts is not None and "ipxe" in artifacts and "netboot_url" not in doc:
        problems.append(f"{path}: netboot_url: required when artifacts lists ipxe (the http(s) URL "
                        "where <stem>-kernel, -initrd and .squashfs will be served)")
    if converter == "kairos-init":
        if "kairos_init_image" not in doc:
            problems.append(f"{path}: kairos_init_image: required when converter is kairos-init "
                            "(e.g. quay.io/kairos/kairos-init:v4.3.0)")
        elif kairos_init is not None:
            if not REF_RE.match(kairos_init):
                c.problem("kairos_init_image", f"not an image reference: {kairos_init!r}")
                kairos_init = None
            elif not (parse_ref(kairos_init)[1] or parse_ref(kairos_init)[2]):
                c.problem("kairos_init_image", f"{kairos_init!r} must be pinned to a tag or digest")
    elif converter == "builtin" and "kairos_init_image" in doc:
        c.problem("kairos_init_image", "only used with converter: kairos-init (this flavor uses builtin)")
    if variants and "standard" in variants and not k3s:
        c.problem("variants" if "k3s_versions" not in doc else "k3s_versions",
                  "the standard variant needs at least one k3s version in k3s_versions (e.g. [v1.28.2+k3s1])")
    if variants and "standard" in variants and converter == "builtin":
        c.problem("variants", "the builtin converter does not install k3s; the standard variant needs "
                  "converter: kairos-init")
    if variants and k3s and "standard" not in variants:
        c.problem("k3s_versions", "k3s versions are only used by the standard variant, which variants does not list")
    if arches and devices:
        for device in devices:
            if not set(DEVICES[device]) & set(arches):
                c.problem("devices", f"{device} needs arch {' or '.join(DEVICES[device])}, "
                          f"but arches lists only {', '.join(arches)}")
    if isinstance(base, MmdebstrapBase) and base.arch and arches:
        others = [a for a in arches if a != base.arch]
        if others:
            c.problem("base_image", f"mmdebstrap arch {base.arch} cannot serve arches {', '.join(others)}; "
                      "drop base_image.mmdebstrap.arch to follow each build's arch")
    if artifacts is not None and "raw" in artifacts and devices and not raw_generic \
            and not any(d != "generic" for d in devices):
        c.problem("artifacts", "raw images are built for rpi devices only; set raw_generic: true "
                  "to build them for generic too")
    if trusted and devices and any(d != "generic" for d in devices):
        c.problem("trusted_boot", "trusted boot is only supported for generic devices")

    if len(problems) > start:
        return None
    return Flavor(path=path, flavor=flavor, release=release, base_image=base, version=version,
                  variants=variants, k3s_versions=k3s or (), arches=arches, devices=devices,
                  converter=converter, kairos_init_image=kairos_init if converter == "kairos-init" else None,
                  registry=registry, artifacts=artifacts, overlay=overlay, trusted_boot=trusted, fips=fips,
                  raw_generic=raw_generic, builtin=builtin, squashfs=squashfs, builder=builder,
                  auroraboot_image=auroraboot, netboot_url=netboot_url, scan=scan, sign=sign,
                  cloud_config=cloud_config)


def _display(path: Path) -> Path:
    """Paths in messages: relative to the working directory when below it."""
    try:
        return path.absolute().relative_to(Path.cwd())
    except ValueError:
        return path


def flavor_files(sources: list[Path]) -> tuple[list[Path], list[str]]:
    """Expand files and directories (non-recursive *.yaml/*.yml, sorted)."""
    files: list[Path] = []
    problems: list[str] = []
    for source in sources:
        source = _display(Path(source))
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
            if not found:
                problems.append(f"{source}: no flavor files (*.yaml) in this directory")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            problems.append(f"{source}: no such flavor file or directory")
    return files, problems


def load_flavor_file(path: Path, problems: list[str]) -> Flavor | None:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return None
    try:
        doc = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        problems.append(_yaml_problem(path, exc))
        return None
    return _check_doc(path, doc, problems)


def load_flavors(sources: list[Path]) -> tuple[Flavor, ...]:
    """Load and validate every flavor file; raise ConfigError listing all problems."""
    files, problems = flavor_files(sources)
    flavors = []
    for path in files:
        flavor = load_flavor_file(path, problems)
        if flavor is not None:
            flavors.append(flavor)
    if problems:
        raise ConfigError(problems)
    return tuple(flavors)
