"""Flavor YAML -> the validated, frozen dataclasses of tasks/model.py.

Every problem is reported as ``file:line: key.path: message`` and all problems
of all files are reported at once (ConfigError). Unknown keys are errors.

Each mapping is checked by a table ``key -> check`` (TOP, SCAN, SIGN, ...): the keys
are the dataclass fields, an absent key takes the field default and a field without
a default is a required key. The rules between keys are the functions in RULES.
"""
from __future__ import annotations

import dataclasses
import re
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import yaml

from . import epoch
from .providers import PROVIDERS, Provider, next_versions
from .kinds import ARTIFACT_KINDS
from .model import (
    ARCHES, BUILDERS, FIRMWARES, RAW_COMPRESSIONS, BootOptions, CONVERTERS, DEFAULT_AURORABOOT_IMAGE, DEVICES,
    MMDEBSTRAP_VARIANTS, OWN_TAG, POLICIES, REF_RE, REPO_RE, SEVERITIES, SQUASHFS_COMPRESSORS, VARIANTS, BuiltinOptions,
    ConfigError, ENROLL, Flavor, MmdebstrapBase, SECURE_BOOT_FILES, ScanOptions, SignOptions, SquashfsOptions,
    TrustedBoot, parse_ref)

# keys earlier versions accepted -> what to do now
RETIRED = {
    "builtin.initramfs_modules": "no longer used: the builtin converter builds one generic dracut initrd "
                                 "that boots the Kairos live command lines; remove the key",
}
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
URL_RE = re.compile(r"^https?://[^\s/]+(/\S*)?$")
MIRROR_RE = re.compile(r"^(https?|file)://\S+$")
BLOCK_SIZE_RE = re.compile(r"^\d+[kKmM]?$")
VERSION_RE = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?$")
FLAVOR_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
RELEASE_RE = re.compile(r"^[A-Za-z0-9]+([._-][A-Za-z0-9]+)*$")
SUITE_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]*(:[a-z0-9]+)?$")


# --- YAML loading with line numbers and duplicate-key detection -------------

class _Map(dict):
    """A mapping that remembers the line of each key (1-based), the source text of
    scalar values (so messages quote what the user wrote) and its own line (of the
    key holding it, else where it starts)."""

    lines: dict
    raw: dict
    line: int


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Map:
    result = _Map()
    result.lines = {}
    result.raw = {}
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain strings", key_node.start_mark)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = value = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
        if isinstance(value, _Map):
            value.line = min(value.line, result.lines[key])
        if isinstance(value_node, yaml.ScalarNode):
            result.raw[key] = value_node.value
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(path: Path, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"{where}: malformed YAML: {problem}"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", _Map: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# --- checks of one value ---------------------------------------------------------

class _Checker:
    """Collects the problems of one file. Each check is called for a key present in its
    mapping and returns the value, or None when it is invalid (after reporting why)."""

    def __init__(self, path: Path, doc: _Map, problems: list[str]):
        self.path = path
        self.doc = doc
        self.problems = problems

    def where(self, mapping: dict, key: Any) -> str:
        """`file:line` of ``key``; for a key absent from a nested mapping, the mapping's line
        (an absent top-level key has no line)."""
        line = getattr(mapping, "lines", {}).get(key)
        if line is None and mapping is not self.doc:
            line = getattr(mapping, "line", None)
        return f"{self.path}:{line}" if line else f"{self.path}"

    def problem(self, keypath: str, message: str, mapping: dict | None = None, key: Any = None) -> None:
        """Report ``keypath: message`` at ``key`` of ``mapping`` (default: the top-level key of keypath)."""
        mapping = self.doc if mapping is None else mapping
        key = keypath.split(".")[0] if key is None else key
        self.problems.append(f"{self.where(mapping, key)}: {keypath}: {message}")

    def unknown_keys(self, mapping: dict, allowed: tuple[str, ...], prefix: str = "") -> None:
        for key in mapping:
            if key not in allowed:
                shown = key if re.fullmatch(r"[\w.-]+", str(key)) else repr(key)
                why = RETIRED.get(f"{prefix}{shown}", f"unknown key (allowed: {', '.join(allowed)})")
                self.problem(f"{prefix}{shown}", why, mapping, key)

    def string(self, mapping, key, prefix="", pattern=None, hint=""):
        value = mapping[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            text = getattr(mapping, "raw", {}).get(key, str(value))
            self.problem(prefix + key, f"must be a string, got number {text}; quote it, e.g. \"{text}\"",
                         mapping, key)
            return None
        if not isinstance(value, str):
            self.problem(prefix + key, f"must be a string, got {_type_name(value)}", mapping, key)
            return None
        if pattern is not None and not pattern.match(value):
            self.problem(prefix + key, f"invalid value {value!r}{': ' + hint if hint else ''}", mapping, key)
            return None
        return value

    def choice(self, mapping, key, prefix="", *, allowed, what="value"):
        """One string of ``allowed``: "unknown <what> 'x' (allowed: a, b)"."""
        value = self.string(mapping, key, prefix)
        if value is not None and value not in allowed:
            self.problem(prefix + key, f"unknown {what} {value!r} (allowed: {', '.join(allowed)})", mapping, key)
            return None
        return value

    def integer(self, mapping, key, prefix="", *, minimum, maximum=None, hint=""):
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(prefix + key, f"must be a whole number, got {_type_name(value)} {value!r}", mapping, key)
            return None
        if value < minimum:
            self.problem(prefix + key, f"must be at least {minimum}, got {value}", mapping, key)
            return None
        if maximum is not None and value > maximum:
            self.problem(prefix + key, f"must be at most {maximum}{' (' + hint + ')' if hint else ''}, got {value}",
                         mapping, key)
            return None
        return value

    def boolean(self, mapping, key, prefix=""):
        value = mapping[key]
        if not isinstance(value, bool):
            self.problem(prefix + key, f"must be true or false, got {_type_name(value)} {value!r}", mapping, key)
            return None
        return value

    def choice_list(self, mapping, key, prefix="", *, choices=None, pattern=None, hint=""):
        """A list of distinct strings, each one of ``choices`` and matching ``pattern`` (when given)."""
        keypath = prefix + key
        value = mapping[key]
        if not isinstance(value, list):
            self.problem(keypath, f"must be a list, got {_type_name(value)}", mapping, key)
            return None
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                wrong = f"must be a string, got {_type_name(item)} {item!r}"
            elif choices is not None and item not in choices:
                wrong = f"unknown value {item!r} (allowed: {', '.join(choices)})"
            elif pattern is not None and not pattern.match(item):
                wrong = f"invalid value {item!r}{': ' + hint if hint else ''}"
            elif item in out:
                wrong = f"duplicate value {item!r}"
            else:
                out.append(item)
                continue
            self.problem(f"{keypath}[{i}]", wrong, mapping, key)
        return tuple(out) if len(out) == len(value) else None

    def existing(self, mapping, key, prefix="", *, kind):
        """A path relative to the flavor file naming an existing ``kind`` ("file" or "dir")."""
        raw = self.string(mapping, key, prefix)
        if raw is None:
            return None
        resolved = (self.path.parent / raw).resolve()
        if not (resolved.is_dir() if kind == "dir" else resolved.is_file()):
            self.problem(prefix + key, f"{'directory' if kind == 'dir' else 'file'} {raw!r} does not exist "
                         f"(resolved to {resolved})", mapping, key)
            return None
        return resolved


# A check: (checker, mapping, key, prefix) -> the value, or None when invalid.
Check = Callable[[_Checker, dict, str, str], Any]


def _text(pattern: re.Pattern | None = None, hint: str = "") -> Check:
    return partial(_Checker.string, pattern=pattern, hint=hint)


def _choice(allowed: tuple[str, ...], what: str = "value") -> Check:
    return partial(_Checker.choice, allowed=allowed, what=what)


def _list(choices: tuple[str, ...] | None = None, pattern: re.Pattern | None = None, hint: str = "") -> Check:
    return partial(_Checker.choice_list, choices=choices, pattern=pattern, hint=hint)


def _int(minimum: int, maximum: int | None = None, hint: str = "") -> Check:
    return partial(_Checker.integer, minimum=minimum, maximum=maximum, hint=hint)


_BOOL: Check = _Checker.boolean
_DIR: Check = partial(_Checker.existing, kind="dir")
_FILE: Check = partial(_Checker.existing, kind="file")


# --- checks of one mapping -------------------------------------------------------

def _defaults(cls: type) -> dict[str, Any]:
    """The dataclass field defaults of ``cls``; a field without one is a required key."""
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def _values(c: _Checker, mapping: dict, prefix: str, table: dict[str, Check], defaults: dict) -> dict:
    """key -> its checked value (None when invalid), for every key of ``table``: an absent key
    takes its default from ``defaults``, or is a missing required key (None)."""
    values = {}
    for key, check in table.items():
        if key in mapping:
            values[key] = check(c, mapping, key, prefix)
        elif key in defaults:
            values[key] = defaults[key]
        else:
            c.problem(prefix + key, "missing required key", mapping, key)
            values[key] = None
    return values


def _build(cls: type, values: dict) -> Any:
    """``cls`` from the valid ``values`` (invalid ones take the default); None if a required one is missing."""
    given = {key: value for key, value in values.items() if value is not None}
    required = {f.name for f in dataclasses.fields(cls)} - set(_defaults(cls))
    return cls(**given) if required <= set(given) else None


def _mapping(c: _Checker, mapping: dict, key: str, prefix: str) -> dict | None:
    value = mapping[key]
    if not isinstance(value, dict):
        c.problem(prefix + key, f"must be a mapping, got {_type_name(value)}", mapping, key)
        return None
    return value


def _section(cls: type, table: dict[str, Check]) -> Check:
    """The check of a mapping-valued key holding the fields of ``cls``, each checked by ``table``."""
    def check(c: _Checker, mapping: dict, key: str, prefix: str) -> Any:
        spec = _mapping(c, mapping, key, prefix)
        if spec is None:
            return None
        c.unknown_keys(spec, tuple(table), f"{prefix}{key}.")
        return _build(cls, _values(c, spec, f"{prefix}{key}.", table, _defaults(cls)))
    return check


# --- per-key checks that do more than one value ------------------------------------

def _cosign_key(c: _Checker, mapping: dict, key: str, prefix: str) -> Path | None:
    found = c.existing(mapping, key, prefix, kind="file")
    if found is not None and not found.with_suffix(".pub").is_file():
        c.problem(prefix + key, f"no public key {found.with_suffix('.pub').name} next to {found}", mapping, key)
    return found


def _netboot_url(c: _Checker, mapping: dict, key: str, prefix: str) -> str | None:
    url = c.string(mapping, key, prefix, URL_RE, "an http(s) URL where the kernel, initrd and squashfs are served")
    return url.rstrip("/") if url else url


TRUSTED_BOOT: dict[str, Check] = {
    "keys": _DIR,
    "cmdline": _text(re.compile(r"^\S.*$"), "a kernel command line"),
    "enroll": _choice(ENROLL, "secure-boot-enroll value"),
    "pcr_phases": _list(pattern=re.compile(r"^[a-z][a-z0-9-]*(:[a-z][a-z0-9-]*)*$"),
                        hint="a boot phase path such as enter-initrd or sysinit:ready"),
}


def _cache_from(c: _Checker, mapping: dict, key: str, prefix: str) -> tuple[str, ...] | None:
    """`own` (the default: each build's own tag), `none`, or a list of image references and `own`."""
    value = mapping[key]
    if value == "none":
        return ()
    if value == OWN_TAG:
        return (OWN_TAG,)
    if not isinstance(value, list):
        c.problem(prefix + key, f"must be {OWN_TAG}, none or a list of image references, "
                  f"got {_type_name(value)} {value!r}", mapping, key)
        return None
    refs = c.choice_list(mapping, key, prefix)
    if refs is None:
        return None
    wrong = [r for r in refs if r != OWN_TAG and not REF_RE.match(r)]
    for ref in wrong:
        c.problem(f"{prefix}{key}[{refs.index(ref)}]", f"invalid image reference {ref!r} "
                  f"(e.g. ghcr.io/org/kairos:cache, or {OWN_TAG})", mapping, key)
    return None if wrong else refs


def _trusted_boot(c: _Checker, mapping: dict, key: str, prefix: str) -> TrustedBoot | None:
    """true/false, or a mapping (TRUSTED_BOOT) that means true; false is None."""
    value = mapping[key]
    if isinstance(value, bool):
        return TrustedBoot() if value else None
    if not isinstance(value, dict):
        c.problem(prefix + key, f"must be true, false or a mapping ({', '.join(TRUSTED_BOOT)}), "
                  f"got {_type_name(value)} {value!r}", mapping, key)
        return None
    if value.get("pcr_phases") == []:
        c.problem(f"{prefix}{key}.pcr_phases", "must list at least one phase path (leave it out for the "
                  "converter's default)", value, "pcr_phases")
        return None
    return _section(TrustedBoot, TRUSTED_BOOT)(c, mapping, key, prefix)


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


def _cloud_config(c: _Checker, mapping: dict, key: str, prefix: str) -> Path | None:
    found = c.existing(mapping, key, prefix, kind="file")
    problems = cloud_config_problems(found) if found is not None else []
    for problem in problems:
        c.problem(prefix + key, problem, mapping, key)
    return None if problems else found


MMDEBSTRAP: dict[str, Check] = {
    "suite": _text(SUITE_RE, "a Debian suite such as bookworm"),
    "arch": _choice(ARCHES, "arch"),
    "variant": _choice(MMDEBSTRAP_VARIANTS, "mmdebstrap variant"),
    "mirror": _text(MIRROR_RE, "a mirror URL"),
    "components": _list(pattern=SUITE_RE),
    "include": _list(pattern=PACKAGE_RE, hint="a Debian package name"),
}


def _base_image(c: _Checker, doc: dict, key: str, prefix: str) -> str | MmdebstrapBase | None:
    """An image reference, or {mmdebstrap: {suite, ...}} (see MMDEBSTRAP)."""
    value = doc[key]
    if isinstance(value, str):
        if not REF_RE.match(value):
            c.problem(key, f"not an image reference: {value!r} (expected e.g. ubuntu:24.04 or "
                      "registry.example.com/team/ubuntu:24.04)")
            return None
        return value
    if not (isinstance(value, dict) and set(value) == {"mmdebstrap"} and isinstance(value["mmdebstrap"], dict)):
        c.problem(key, "must be an image reference string or {mmdebstrap: {suite: ..., arch: ...}}, "
                  f"got {_type_name(value)}")
        return None
    spec, p = value["mmdebstrap"], f"{key}.mmdebstrap."
    c.unknown_keys(spec, tuple(MMDEBSTRAP), p)
    values = _values(c, spec, p, MMDEBSTRAP, _defaults(MmdebstrapBase))
    if values["components"] == ():
        values["components"] = None  # an empty list means the default components
    return _build(MmdebstrapBase, values)


def _policy_table(p: Provider) -> dict[str, Check]:
    """The keys of `<provider>_policy`."""
    return {
        "current": _list(pattern=p.pattern, hint=p.hint),
        "available": _FILE,  # the provider's release list; without it the policy gives no versions
    }


def _provider_versions(p: Provider) -> Check:
    """The check of `<provider>_versions`: a list of the provider's releases, or the word policy: the
    next releases after `<provider>_policy.current` that `<provider>_policy.available` lists."""
    def check(c: _Checker, doc: dict, key: str, prefix: str) -> tuple[str, ...] | None:
        if doc[key] != "policy":
            return c.choice_list(doc, key, prefix, pattern=p.pattern,
                                 hint=f"{p.hint}, or the word policy (see {p.policy_key})")
        spec = _mapping(c, doc, p.policy_key, "") if p.policy_key in doc else {}
        if spec == {}:
            c.problem(p.policy_key, f"required with {key}: policy: {{current: [...], available: FILE}}",
                      key=p.policy_key if p.policy_key in doc else key)
        if not spec:
            return None
        c.unknown_keys(spec, tuple(_policy_table(p)), f"{p.policy_key}.")
        policy = _values(c, spec, f"{p.policy_key}.", _policy_table(p), {"available": None})
        if policy["current"] is None or ("available" in spec and policy["available"] is None):
            return None  # invalid or missing: reported
        current = [p.parse(v) for v in policy["current"]]
        for i, (text, version) in enumerate(zip(policy["current"], current)):
            if version is None:
                c.problem(f"{p.policy_key}.current[{i}]", f"{text!r} is a pre-release; the policy starts from "
                          f"stable releases such as {p.example}", spec, "current")
        if None in current:
            return None
        if not policy["current"] or policy["available"] is None:
            return ()
        try:
            upstream = p.parse_available(policy["available"].read_text())
        except (OSError, ValueError) as exc:
            c.problem(f"{p.policy_key}.available", f"{policy['available']}: {exc}", spec, "available")
            return None
        return tuple(str(v) for v in next_versions(current, upstream))
    return check


# The sections (mappings) of a flavor file: one check per field of their dataclass.
BUILTIN: dict[str, Check] = {
    "packages": _list(pattern=PACKAGE_RE, hint="a Debian package name"),
}
SQUASHFS: dict[str, Check] = {
    "compression": _choice(SQUASHFS_COMPRESSORS, "compressor"),
    "block_size": _text(BLOCK_SIZE_RE, "e.g. 1024k"),
}
SCAN: dict[str, Check] = {
    "policy": _choice(POLICIES, "policy"),
    "severity": _choice(SEVERITIES, "severity"),
    "vulnerabilities": _BOOL,
    "trivy_db": _DIR,
    "grype_db": _DIR,
    "download_db": _BOOL,
}
SIGN: dict[str, Check] = {
    "key": _cosign_key,
    "password_env": _text(ENV_RE, "an environment variable name"),
    "keyless": _BOOL,
}
BOOT: dict[str, Check] = {
    "timeout": _int(1),
    "firmware": _list(FIRMWARES),
    "memory": _int(256),
}
# The flavor file: one check per Flavor field but path, in the order of the "unknown key" message.
TOP: dict[str, Check] = {
    "flavor": _text(FLAVOR_RE, "lowercase letters, digits and dashes"),
    "release": _text(RELEASE_RE, "letters, digits, '.', '_' and '-'"),
    "base_image": _base_image,
    "version": _text(VERSION_RE, "a semantic version with a leading v, e.g. v3.1.0"),
    "variants": _list(VARIANTS),
    **{p.key: _provider_versions(p) for p in PROVIDERS.values()},
    "arches": _list(ARCHES),
    "devices": _list(tuple(DEVICES)),
    "converter": _choice(CONVERTERS, "converter"),
    "kairos_init_image": _text(),  # a pinned reference: see RULES
    "registry": _text(REPO_RE, "a repository prefix without tag, e.g. 127.0.0.1:5000/kairos"),
    "artifacts": _list(ARTIFACT_KINDS),
    "overlay": _DIR,
    "trusted_boot": _trusted_boot,
    "fips": _BOOL,
    "raw_generic": _BOOL,
    "raw_compression": _choice(RAW_COMPRESSIONS, "raw compression"),
    "raw_xz_level": _int(0, 9, "xz's presets: 0 fastest to 9 smallest"),
    "builtin": _section(BuiltinOptions, BUILTIN),
    "squashfs": _section(SquashfsOptions, SQUASHFS),
    "builder": _choice(BUILDERS, "builder"),
    "auroraboot_image": _text(REF_RE, "an image reference such as " + DEFAULT_AURORABOOT_IMAGE),
    "netboot_url": _netboot_url,
    "scan": _section(ScanOptions, SCAN),
    "sign": _section(SignOptions, SIGN),
    "boot": _section(BootOptions, BOOT),
    "cloud_config": _cloud_config,
    "cache_from": _cache_from,
    "source_date_epoch": _int(0, epoch.MAX, epoch.HINT),
}
TOP_KEYS = (*TOP, *(p.policy_key for p in PROVIDERS.values()))


# --- rules between keys: (checker, parsed values; None where invalid) -> None -----------------

def provider_policy_needs_policy(c: _Checker, v: SimpleNamespace) -> None:
    """`<provider>_policy` is only read when `<provider>_versions` is the word policy."""
    for p in PROVIDERS.values():
        if p.policy_key in c.doc and c.doc.get(p.key) != "policy":
            c.problem(p.policy_key, f"only used with {p.key}: policy")


def builtin_needs_builtin_converter(c: _Checker, v: SimpleNamespace) -> None:
    """The builtin: options are only read by the builtin converter."""
    if "builtin" in c.doc and v.converter == "kairos-init":
        c.problem("builtin", "only used with converter: builtin (this flavor uses kairos-init)")


def grype_needs_vulnerabilities(c: _Checker, v: SimpleNamespace) -> None:
    """grype scans vulnerabilities only: not with scan.vulnerabilities: false."""
    if v.artifacts and "grype" in v.artifacts and v.scan and not v.scan.vulnerabilities:
        c.problem("artifacts", "grype only scans vulnerabilities, which scan.vulnerabilities: false turns off; "
                  "remove grype from artifacts")


def sign_needs_key(c: _Checker, v: SimpleNamespace) -> None:
    """Signing needs sign.key unless sign.keyless."""
    if v.artifacts and "sign" in v.artifacts and v.sign and not v.sign.keyless and v.sign.key is None:
        c.problem("sign.key", "required when artifacts lists sign (a cosign.key made by "
                  "`cosign generate-key-pair`), or set sign.keyless: true", key="artifacts")


def ipxe_needs_netboot_url(c: _Checker, v: SimpleNamespace) -> None:
    """The ipxe artifact needs netboot_url."""
    if v.artifacts and "ipxe" in v.artifacts and "netboot_url" not in c.doc:
        c.problem("netboot_url", "required when artifacts lists ipxe (the http(s) URL "
                  "where <stem>-kernel, -initrd and .squashfs will be served)", key="artifacts")


def kairos_init_needs_pinned_image(c: _Checker, v: SimpleNamespace) -> None:
    """The kairos-init converter needs kairos_init_image, pinned to a tag or digest."""
    if v.converter != "kairos-init":
        return
    image = v.kairos_init_image
    if "kairos_init_image" not in c.doc:
        c.problem("kairos_init_image", "required when converter is kairos-init "
                  "(e.g. quay.io/kairos/kairos-init:v4.3.0)", key="converter")
    elif image is not None and not REF_RE.match(image):
        c.problem("kairos_init_image", f"not an image reference: {image!r}")
    elif image is not None and parse_ref(image)[1:] == (None, None):
        c.problem("kairos_init_image", f"{image!r} must be pinned to a tag or digest")


def kairos_init_image_needs_kairos_init(c: _Checker, v: SimpleNamespace) -> None:
    """The builtin converter does not use kairos_init_image."""
    if v.converter == "builtin" and "kairos_init_image" in c.doc:
        c.problem("kairos_init_image", "only used with converter: kairos-init (this flavor uses builtin)")


def standard_needs_provider_versions(c: _Checker, v: SimpleNamespace) -> None:
    """The standard variant needs a provider version (k3s or k0s); a provider key listing none is an error."""
    if not (v.variants and "standard" in v.variants):
        return
    given = [p for p in PROVIDERS.values() if p.key in c.doc]
    if not given:
        c.problem("variants", "the standard variant needs at least one version in " +
                  " or ".join(f"{p.key} (e.g. [{p.example}])" for p in PROVIDERS.values()))
        return
    elsewhere = [p for p in given if getattr(v, p.key)]
    for p in given:
        if getattr(v, p.key) == ():
            c.problem(p.key, f"gives no {p.name} version; " + (
                f"list at least one (e.g. [{p.example}]) or remove the key" if elsewhere else
                f"the standard variant needs at least one (e.g. [{p.example}])"))


def standard_needs_kairos_init(c: _Checker, v: SimpleNamespace) -> None:
    """The builtin converter installs no provider (k3s, k0s), so it cannot make the standard variant."""
    if v.variants and "standard" in v.variants and v.converter == "builtin":
        named = [p.name for p in PROVIDERS.values() if p.key in c.doc] or list(PROVIDERS)
        c.problem("variants", f"the builtin converter does not install {' or '.join(named)}; the standard variant "
                  "needs converter: kairos-init")


def provider_versions_need_standard(c: _Checker, v: SimpleNamespace) -> None:
    """Provider versions are only used by the standard variant."""
    for p in PROVIDERS.values():
        if v.variants and p.key in c.doc and getattr(v, p.key) is not None and "standard" not in v.variants:
            c.problem(p.key, f"{p.name} versions are only used by the standard variant, which variants does not list")


def devices_need_their_arch(c: _Checker, v: SimpleNamespace) -> None:
    """Each device needs one of its arches in arches."""
    for device in v.devices or ():
        if v.arches and not set(DEVICES[device]) & set(v.arches):
            c.problem("devices", f"{device} needs arch {' or '.join(DEVICES[device])}, "
                      f"but arches lists only {', '.join(v.arches)}")


def mmdebstrap_arch_serves_arches(c: _Checker, v: SimpleNamespace) -> None:
    """A base_image.mmdebstrap.arch serves only builds of that arch."""
    base = v.base_image
    if isinstance(base, MmdebstrapBase) and base.arch and v.arches:
        others = [a for a in v.arches if a != base.arch]
        if others:
            c.problem("base_image", f"mmdebstrap arch {base.arch} cannot serve arches {', '.join(others)}; "
                      "drop base_image.mmdebstrap.arch to follow each build's arch")


def raw_needs_rpi_or_raw_generic(c: _Checker, v: SimpleNamespace) -> None:
    """raw images are for rpi devices, or for generic too with raw_generic: true."""
    if v.artifacts and "raw" in v.artifacts and v.devices and not v.raw_generic \
            and all(d == "generic" for d in v.devices):
        c.problem("artifacts", "raw images are built for rpi devices only; set raw_generic: true "
                  "to build them for generic too")


def raw_compression_needs_raw(c: _Checker, v: SimpleNamespace) -> None:
    """raw_compression is only read for raw images."""
    if "raw_compression" in c.doc and v.artifacts is not None and "raw" not in v.artifacts:
        c.problem("raw_compression", "only used with the raw artifact, which artifacts does not list")


def raw_xz_level_needs_xz(c: _Checker, v: SimpleNamespace) -> None:
    """raw_xz_level is only read when raw images are compressed with xz."""
    if "raw_xz_level" not in c.doc:
        return
    if v.artifacts is not None and "raw" not in v.artifacts:
        c.problem("raw_xz_level", "only used with the raw artifact, which artifacts does not list")
    elif v.raw_compression == "none":
        c.problem("raw_xz_level", "only used with raw_compression: xz (this flavor has none)")


def trusted_boot_needs_generic(c: _Checker, v: SimpleNamespace) -> None:
    """Trusted boot exists for generic devices only."""
    if v.trusted_boot and v.devices and any(d != "generic" for d in v.devices):
        c.problem("trusted_boot", "trusted boot is only supported for generic devices")


def uki_needs_keys(c: _Checker, v: SimpleNamespace) -> None:
    """The uki artifact is signed: trusted_boot.keys must hold a genkey key set."""
    if not v.artifacts or "uki" not in v.artifacts:
        return
    keys = v.trusted_boot.keys if v.trusted_boot else None
    if keys is None:
        c.problem("artifacts", "uki needs trusted_boot: {keys: DIR} with Secure Boot keys "
                  "(make them with: python -m tasks genkey DIR)")
        return
    missing = [name for name in SECURE_BOOT_FILES if not (keys / name).is_file()]
    if missing:
        c.problem("trusted_boot", f"keys: {keys} lacks {', '.join(missing)} (make a key set with: "
                  f"python -m tasks genkey {keys})")


RULES: tuple[Callable[[_Checker, SimpleNamespace], None], ...] = (
    provider_policy_needs_policy, builtin_needs_builtin_converter, grype_needs_vulnerabilities, sign_needs_key,
    ipxe_needs_netboot_url, kairos_init_needs_pinned_image, kairos_init_image_needs_kairos_init,
    standard_needs_provider_versions, standard_needs_kairos_init, provider_versions_need_standard,
    devices_need_their_arch, mmdebstrap_arch_serves_arches, raw_needs_rpi_or_raw_generic, raw_compression_needs_raw,
    raw_xz_level_needs_xz, trusted_boot_needs_generic, uki_needs_keys,
)


def _check_doc(path: Path, doc: Any, problems: list[str]) -> Flavor | None:
    if not isinstance(doc, dict):
        problems.append(f"{path}: the file must hold one mapping of flavor keys, got {_type_name(doc)}")
        return None
    start = len(problems)
    c = _Checker(path, doc, problems)
    c.unknown_keys(doc, TOP_KEYS)
    values = _values(c, doc, "", TOP, _defaults(Flavor))
    parsed = SimpleNamespace(**values)
    for rule in RULES:
        rule(c, parsed)
    return Flavor(path=path, **values) if len(problems) == start else None


# --- files ---------------------------------------------------------------------

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
