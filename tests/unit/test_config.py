"""config.py: flavor YAML -> frozen dataclasses; every problem names file:line: key.path."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from tasks import config, model
from tasks.config import load_flavors
from tasks.providers import PROVIDERS
from tasks.model import (BootOptions, BuiltinOptions, ConfigError, Flavor, MmdebstrapBase, ScanOptions, SignOptions,
                         SquashfsOptions, parse_ref)

ROOT = Path(__file__).resolve().parents[2]

# A valid, minimal flavor document (kairos-init is the default converter).
MINIMAL = {
    "flavor": "ubuntu",
    "release": "24.04",
    "base_image": "ubuntu:24.04",
    "version": "v3.1.0",
    "variants": ["core"],
    "arches": ["amd64"],
    "devices": ["generic"],
    "kairos_init_image": "quay.io/kairos/kairos-init:v4.3.0",
    "registry": "quay.io/kairos",
    "artifacts": ["iso"],
}
DROP = object()  # doc(key=DROP) removes the key
BUILTIN = {"converter": "builtin", "kairos_init_image": DROP}
DIGEST = "sha256:" + "0123456789abcdef" * 4


def doc(**changes) -> str:
    """MINIMAL with ``changes`` applied, as YAML text (flow style lists, one key a line)."""
    data = dict(MINIMAL)
    for key, value in changes.items():
        if value is DROP:
            data.pop(key, None)
        else:
            data[key] = value
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=1000)


def swap(text: str, old: str, new: str) -> str:
    assert old in text, (old, text)
    return text.replace(old, new)


def line_of(text: str, snippet: str) -> int:
    """1-based number of the first line of ``text`` that contains ``snippet``."""
    for number, line in enumerate(text.splitlines(), 1):
        if snippet in line:
            return number
    raise AssertionError(f"{snippet!r} not in {text!r}")


def problems_of(sources) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_flavors(sources)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --- valid flavors ---------------------------------------------------------------

def test_minimal_flavor_loads_into_a_frozen_flavor(write_flavor):
    path = write_flavor("ubuntu.yaml", doc())
    (f,) = load_flavors([path.parent])

    assert isinstance(f, Flavor)
    assert (f.flavor, f.release, f.base_image, f.version, f.registry) == \
        ("ubuntu", "24.04", "ubuntu:24.04", "v3.1.0", "quay.io/kairos")
    assert f.path == path
    assert (f.variants, f.arches, f.devices, f.artifacts) == (("core",), ("amd64",), ("generic",), ("iso",))
    for value in (f.variants, f.k3s_versions, f.arches, f.devices, f.artifacts):
        assert type(value) is tuple
    # defaults
    assert f.converter == "kairos-init"
    assert f.kairos_init_image == "quay.io/kairos/kairos-init:v4.3.0"
    assert f.k3s_versions == ()
    assert f.overlay is None
    assert (f.trusted_boot, f.fips, f.raw_generic) == (None, False, False)
    assert f.builtin == BuiltinOptions(packages=())
    assert f.squashfs == SquashfsOptions(compression="gzip", block_size="1024k")


@pytest.mark.parametrize("attr, value", [
    ("flavor", "debian"),
    ("variants", ("standard",)),
    ("trusted_boot", True),
    ("overlay", Path("/")),
])
def test_flavor_is_frozen(write_flavor, attr, value):
    (f,) = load_flavors([write_flavor("ubuntu.yaml", doc())])
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(f, attr, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.squashfs.compression = "xz"


def test_full_builtin_flavor_loads_every_option(write_flavor, tmp_path):
    (tmp_path / "flavors" / "overlay" / "etc").mkdir(parents=True)
    (tmp_path / "flavors" / "keys").mkdir()
    (tmp_path / "flavors" / "keys" / "cosign.key").write_text("private")
    (tmp_path / "flavors" / "keys" / "cosign.pub").write_text("public")
    (tmp_path / "flavors" / "trivy-db").mkdir()
    text = doc(
        flavor="debian", release="12",
        base_image={"mmdebstrap": {"suite": "bookworm", "arch": "arm64", "variant": "apt",
                                   "mirror": "http://deb.example.org/debian",
                                   "components": ["main", "contrib"], "include": ["ca-certificates", "vim"]}},
        variants=["core"], arches=["arm64"], devices=["generic", "rpi4"], raw_generic=True, fips=True,
        artifacts=["raw", "kernel", "initrd", "squashfs", "sign"], overlay="overlay",
        builtin={"packages": ["openssh-server", "libc6:arm64"]},
        squashfs={"compression": "xz", "block_size": "256k"},
        scan={"policy": "enforce", "severity": "HIGH", "trivy_db": "trivy-db"},
        sign={"key": "keys/cosign.key", "password_env": "MY_PASS"}, **BUILTIN)
    (f,) = load_flavors([write_flavor("debian.yaml", text)])
    flavors = (tmp_path / "flavors").resolve()
    assert f.scan == ScanOptions(policy="enforce", severity="HIGH", vulnerabilities=True,
                                 trivy_db=flavors / "trivy-db", grype_db=None, download_db=False)
    assert f.sign == SignOptions(key=flavors / "keys" / "cosign.key", password_env="MY_PASS", keyless=False)

    assert f.base_image == MmdebstrapBase(suite="bookworm", arch="arm64", variant="apt",
                                          mirror="http://deb.example.org/debian",
                                          components=("main", "contrib"), include=("ca-certificates", "vim"))
    assert f.converter == "builtin" and f.kairos_init_image is None
    assert f.k3s_versions == ()
    assert f.builtin == BuiltinOptions(packages=("openssh-server", "libc6:arm64"))
    assert f.squashfs == SquashfsOptions(compression="xz", block_size="256k")
    assert f.overlay == (tmp_path / "flavors" / "overlay").resolve() and f.overlay.is_absolute()
    assert (f.raw_generic, f.fips, f.trusted_boot) == (True, True, None)


def test_mmdebstrap_defaults(write_flavor):
    (f,) = load_flavors([write_flavor("d.yaml", doc(base_image={"mmdebstrap": {"suite": "bookworm"}},
                                                   **BUILTIN))])
    assert f.base_image == MmdebstrapBase(suite="bookworm", arch=None, variant="minbase",
                                          mirror="http://deb.debian.org/debian", components=("main",),
                                          include=())


def test_directory_loads_yaml_and_yml_sorted_and_ignores_the_rest(write_flavor):
    write_flavor("b.yaml", doc(flavor="bbb"))
    write_flavor("a.yml", doc(flavor="aaa"))
    write_flavor("notes.txt", "not: a flavor\n")
    write_flavor("c.yaml", "this: is not read\n", subdir="flavors/nested")
    flavors = load_flavors([write_flavor("z.yaml", doc(flavor="zzz")).parent])
    assert [(f.path.name, f.flavor) for f in flavors] == [("a.yml", "aaa"), ("b.yaml", "bbb"), ("z.yaml", "zzz")]


@pytest.mark.parametrize("name", ["upstream", "examples", "debian-12.yaml"])
def test_repository_flavors_are_valid(name):
    flavors = load_flavors([ROOT / "flavors" / name])
    assert flavors
    assert all(isinstance(f, Flavor) for f in flavors)


# --- one problem per file: file:line: key.path: message ---------------------------

MMDEBSTRAP = {"mmdebstrap": {"suite": "bookworm"}}

ERROR_CASES = [
    # text, key path (None: the problem has none), distinctive substring, snippet on the reported line
    pytest.param("flavor: ubuntu\nrelease: '24.04'\nversion: v3.1.0\n  oops: 1\n", None,
                 "malformed YAML: mapping values are not allowed here", "oops", id="malformed-yaml"),
    pytest.param(doc() + "flavor: debian\n", None, "malformed YAML: duplicate key 'flavor'", "flavor: debian",
                 id="duplicate-yaml-key"),
    pytest.param(doc(builtin={"packages": ["vim"]}, **BUILTIN).replace("builtin:", "builtin:\n  packages: [curl]"),
                 None, "malformed YAML: duplicate key 'packages'", "packages: [vim]", id="duplicate-nested-yaml-key"),
    pytest.param("- ubuntu\n- debian\n", None, "the file must hold one mapping of flavor keys, got a list", None,
                 id="document-is-a-list"),
    pytest.param("just a string\n", None, "must hold one mapping of flavor keys, got a string", None,
                 id="document-is-a-string"),
    pytest.param("", None, "must hold one mapping of flavor keys, got null", None, id="empty-file"),
    # unknown keys, top level and nested
    pytest.param(doc(colour="blue"), "colour", "unknown key (allowed: flavor, release, base_image", "colour:",
                 id="unknown-top-level-key"),
    pytest.param(doc(base_image={"mmdebstrap": {"suite": "bookworm", "foo": 1}}, **BUILTIN),
                 "base_image.mmdebstrap.foo", "unknown key (allowed: suite, arch, variant", "foo: 1",
                 id="unknown-key-mmdebstrap"),
    pytest.param(doc(builtin={"foo": 1}, **BUILTIN), "builtin.foo",
                 "unknown key (allowed: packages)", "foo: 1", id="unknown-key-builtin"),
    pytest.param(doc(squashfs={"foo": 1}), "squashfs.foo", "unknown key (allowed: compression, block_size)",
                 "foo: 1", id="unknown-key-squashfs"),
    # missing required keys
    *[pytest.param(doc(**{key: DROP}), key, "missing required key", None, id=f"missing-{key}")
      for key in ("flavor", "release", "registry", "version", "variants", "arches", "devices", "artifacts",
                  "base_image")],
    pytest.param(doc(base_image={"mmdebstrap": {"arch": "amd64"}}, **BUILTIN), "base_image.mmdebstrap.suite",
                 "missing required key", "mmdebstrap:", id="missing-mmdebstrap-suite"),
    # wrong types
    pytest.param(swap(doc(), "release: '24.04'", "release: 24.04"), "release",
                 'must be a string, got number 24.04; quote it, e.g. "24.04"', "release:", id="release-number"),
    pytest.param(swap(doc(), "release: '24.04'", "release: 3.20"), "release",
                 'quote it, e.g. "3.20"', "release:",
                 id="release-number-trailing-zero"),
    pytest.param(swap(doc(), "release: '24.04'", "release: 12"), "release", 'quote it, e.g. "12"', "release:",
                 id="release-int"),
    pytest.param(doc(variants="core"), "variants", "must be a list, got a string", "variants:",
                 id="variants-string"),
    pytest.param(doc(arches=[64]), "arches[0]", "must be a string, got a number 64", "arches:",
                 id="arch-number"),
    pytest.param(doc(trusted_boot="yes"), "trusted_boot",
                 "must be true, false or a mapping (keys, cmdline, enroll, pcr_phases), got a string 'yes'",
                 "trusted_boot:", id="trusted-boot-string"),
    pytest.param(doc(trusted_boot={"pcr_phases": ["enter-initrd", "Sysinit:ready"]}), "trusted_boot.pcr_phases[1]",
                 "invalid value 'Sysinit:ready': a boot phase path such as enter-initrd or sysinit:ready",
                 "pcr_phases:", id="pcr-phase-invalid"),
    pytest.param(doc(trusted_boot={"pcr_phases": []}), "trusted_boot.pcr_phases",
                 "must list at least one phase path", "pcr_phases:", id="pcr-phases-empty"),
    pytest.param(doc(builtin=["vim"], **BUILTIN), "builtin", "must be a mapping, got a list", "builtin:",
                 id="builtin-list"),
    pytest.param(doc(base_image=["ubuntu"]), "base_image", "must be an image reference string or", "base_image:",
                 id="base-image-list"),
    # bad values
    *[pytest.param(doc(version=v), "version", f"invalid value {v!r}: a semantic version with a leading v",
                   "version:", id=f"version-{v}") for v in ("3.1.0", "v3.1", "v3.1.0.1", "v03.1.0")],
    *[pytest.param(doc(variants=["core", "standard"], k3s_versions=[k]), "k3s_versions[0]",
                   f"invalid value {k!r}: a k3s release such as v1.28.2+k3s1", "k3s_versions:", id=f"k3s-{k}")
      for k in ("1.28.2+k3s1", "v1.28.2", "v1.28+k3s1")],
    pytest.param(doc(flavor="Ubuntu"), "flavor", "invalid value 'Ubuntu'", "flavor:", id="flavor-uppercase"),
    pytest.param(doc(registry="quay.io/kairos:latest"), "registry", "invalid value 'quay.io/kairos:latest'",
                 "registry:", id="registry-with-tag"),
    pytest.param(doc(base_image="Ubuntu:24.04"), "base_image", "not an image reference: 'Ubuntu:24.04'",
                 "base_image:", id="base-image-bad-ref"),
    pytest.param(doc(converter="magic"), "converter", "unknown converter 'magic' (allowed: kairos-init, builtin)",
                 "converter:", id="unknown-converter"),
    pytest.param(doc(variants=["core", "minimal"]), "variants[1]", "unknown value 'minimal'", "variants:",
                 id="unknown-variant"),
    pytest.param(doc(devices=["generic", "rpi5"]), "devices[1]", "unknown value 'rpi5'", "devices:",
                 id="unknown-device"),
    pytest.param(doc(artifacts=["iso", "floppy"]), "artifacts[1]",
                 "unknown value 'floppy' (allowed: iso, raw, ipxe", "artifacts:", id="unknown-artifact"),
    pytest.param(doc(squashfs={"compression": "bzip2"}), "squashfs.compression", "unknown compressor 'bzip2'",
                 "compression", id="unknown-compressor"),
    pytest.param(doc(squashfs={"block_size": "big"}), "squashfs.block_size", "invalid value 'big'",
                 "block_size", id="bad-block-size"),
    pytest.param(doc(base_image={"mmdebstrap": {"suite": "bookworm", "arch": "riscv64"}}, **BUILTIN),
                 "base_image.mmdebstrap.arch", "unknown arch 'riscv64'", "riscv64", id="mmdebstrap-arch"),
    pytest.param(doc(builtin={"initramfs_modules": "list"}, **BUILTIN), "builtin.initramfs_modules",
                 "no longer used: the builtin converter builds one generic dracut initrd", "initramfs_modules",
                 id="initramfs-modules-retired"),
    pytest.param(doc(base_image={"mmdebstrap": {"suite": "bookworm", "variant": "tiny"}}, **BUILTIN),
                 "base_image.mmdebstrap.variant", "unknown mmdebstrap variant 'tiny' (allowed: minbase, buildd,",
                 "tiny", id="mmdebstrap-variant"),
    # duplicate list entries
    *[pytest.param(doc(**{key: items}), f"{key}[1]", f"duplicate value {items[1]!r}", f"{key}:",
                   id=f"duplicate-{key}")
      for key, items in (("arches", ["amd64", "amd64"]), ("devices", ["generic", "generic"]),
                         ("artifacts", ["iso", "iso"]), ("variants", ["core", "core"]))],
    # cross-field rules
    pytest.param(doc(devices=["rpi4"], artifacts=["raw"]), "devices",
                 "rpi4 needs arch arm64, but arches lists only amd64", "devices:", id="amd64-with-rpi4"),
    pytest.param(doc(variants=["core", "standard"]), "variants",
                 "the standard variant needs at least one version in k3s_versions (e.g. [v1.28.2+k3s1]) or "
                 "k0s_versions (e.g. [v1.34.4+k0s.0])", "variants:", id="standard-without-k3s"),
    pytest.param(doc(variants=["standard"], k3s_versions=[]), "k3s_versions",
                 "gives no k3s version; the standard variant needs at least one (e.g. [v1.28.2+k3s1])",
                 "k3s_versions:", id="standard-with-empty-k3s"),
    pytest.param(doc(k3s_versions=["v1.28.2+k3s1"]), "k3s_versions", "only used by the standard variant",
                 "k3s_versions:", id="k3s-without-standard"),
    pytest.param(doc(kairos_init_image=DROP), "kairos_init_image", "required when converter is kairos-init",
                 None, id="kairos-init-without-image"),
    pytest.param(doc(converter="kairos-init", kairos_init_image=DROP), "kairos_init_image",
                 "required when converter is kairos-init", "converter:", id="explicit-kairos-init-without-image"),
    pytest.param(doc(kairos_init_image="quay.io/kairos/kairos-init"), "kairos_init_image",
                 "'quay.io/kairos/kairos-init' must be pinned to a tag or digest", "kairos_init_image:",
                 id="kairos-init-image-unpinned"),
    pytest.param(doc(converter="builtin"), "kairos_init_image",
                 "only used with converter: kairos-init (this flavor uses builtin)", "kairos_init_image:",
                 id="kairos-init-image-with-builtin"),
    pytest.param(doc(builtin={"packages": ["vim"]}), "builtin", "only used with converter: builtin",
                 "builtin:", id="builtin-with-kairos-init"),
    pytest.param(doc(overlay="no-such-overlay"), "overlay", "directory 'no-such-overlay' does not exist",
                 "overlay:", id="overlay-missing"),
    pytest.param(doc(artifacts=["iso", "raw"]), "artifacts",
                 "raw images are built for rpi devices only; set raw_generic: true", "artifacts:",
                 id="raw-generic-only"),
    pytest.param(doc(raw_compression="none"), "raw_compression",
                 "only used with the raw artifact, which artifacts does not list", "raw_compression:",
                 id="raw-compression-without-raw"),
    pytest.param(doc(raw_xz_level=0), "raw_xz_level",
                 "only used with the raw artifact, which artifacts does not list", "raw_xz_level:",
                 id="raw-xz-level-without-raw"),
    pytest.param(doc(artifacts=["raw"], raw_generic=True, raw_compression="none", raw_xz_level=0), "raw_xz_level",
                 "only used with raw_compression: xz (this flavor has none)", "raw_xz_level:",
                 id="raw-xz-level-without-xz"),
    pytest.param(doc(artifacts=["raw"], raw_generic=True, raw_xz_level=12), "raw_xz_level",
                 "must be at most 9 (xz's presets: 0 fastest to 9 smallest), got 12", "raw_xz_level:",
                 id="raw-xz-level-too-high"),
    pytest.param(doc(artifacts=["raw"], raw_generic=True, raw_xz_level="9e"), "raw_xz_level",
                 "must be a whole number, got a string '9e'", "raw_xz_level:", id="raw-xz-level-not-a-number"),
    pytest.param(doc(base_image={"mmdebstrap": {"suite": "bookworm", "arch": "amd64"}},
                     arches=["amd64", "arm64"], **BUILTIN), "base_image",
                 "mmdebstrap arch amd64 cannot serve arches arm64", "base_image:", id="mmdebstrap-arch-vs-arches"),
    pytest.param(doc(trusted_boot=True, arches=["arm64"], devices=["generic", "rpi4"]), "trusted_boot",
                 "trusted boot is only supported for generic devices", "trusted_boot:", id="trusted-boot-rpi"),
    pytest.param(doc(trusted_boot={"enroll": "if-safe"}), "trusted_boot.enroll",
                 "unknown secure-boot-enroll value 'if-safe' (allowed: off, manual, force)", "trusted_boot:",
                 id="trusted-boot-enroll"),
    pytest.param(doc(trusted_boot={"key": "k"}), "trusted_boot.key", "unknown key (allowed: keys, cmdline, enroll, pcr_phases)",
                 "trusted_boot:", id="trusted-boot-unknown-key"),
    pytest.param(doc(trusted_boot={"keys": "no-such-keys"}), "trusted_boot.keys",
                 "directory 'no-such-keys' does not exist", "trusted_boot:", id="trusted-boot-keys-missing"),
    pytest.param(doc(artifacts=["uki"]), "artifacts", "uki needs trusted_boot: {keys: DIR} with Secure Boot keys",
                 "artifacts:", id="uki-without-keys"),
    pytest.param(doc(variants=["core", "standard"], k3s_versions=["v1.28.2+k3s1"], **BUILTIN), "variants",
                 "the builtin converter does not install k3s", "variants:", id="builtin-standard"),
    pytest.param(doc(builder="mkosi"), "builder", "unknown builder 'mkosi' (allowed: native, auroraboot)",
                 "builder:", id="unknown-builder"),
    pytest.param(doc(auroraboot_image="Not A Ref"), "auroraboot_image", "invalid value 'Not A Ref'",
                 "auroraboot_image:", id="auroraboot-image-not-a-ref"),
    pytest.param(doc(artifacts=["ipxe"]), "netboot_url", "required when artifacts lists ipxe", "artifacts:",
                 id="ipxe-without-netboot-url"),
    pytest.param(doc(artifacts=["ipxe"], netboot_url="ftp://host/x"), "netboot_url", "invalid value 'ftp://host/x'",
                 "netboot_url:", id="netboot-url-not-http"),
    pytest.param(doc(scan={"policy": "strict"}), "scan.policy", "unknown policy 'strict'", "policy:",
                 id="scan-policy"),
    pytest.param(doc(scan={"severity": "high"}), "scan.severity", "unknown severity 'high'", "severity:",
                 id="scan-severity-case"),
    pytest.param(doc(scan={"trivy_db": "no-such-db"}), "scan.trivy_db", "directory 'no-such-db' does not exist",
                 "trivy_db:", id="scan-trivy-db-missing"),
    pytest.param(doc(scan={"vulnerabilities": False}, artifacts=["grype"]), "artifacts",
                 "grype only scans vulnerabilities", "artifacts:", id="grype-without-vulnerabilities"),
    pytest.param(doc(scan="yes"), "scan", "must be a mapping", "scan:", id="scan-not-mapping"),
    pytest.param(doc(scan={"foo": 1}), "scan.foo", "unknown key", "foo:", id="scan-unknown-key"),
    pytest.param(doc(artifacts=["sign"]), "sign.key", "required when artifacts lists sign", "artifacts:",
                 id="sign-without-key"),
    pytest.param(doc(artifacts=["sign"], sign={"key": "nope.key"}), "sign.key", "file 'nope.key' does not exist",
                 "key:", id="sign-key-missing"),
    pytest.param(doc(sign={"password_env": "BAD-NAME"}), "sign.password_env", "invalid value 'BAD-NAME'",
                 "password_env:", id="sign-password-env"),
]


@pytest.mark.parametrize("value, expected", [(DROP, "xz"), ("xz", "xz"), ("none", "none")])
def test_raw_compression_values(write_flavor, value, expected):
    (f,) = load_flavors([write_flavor("r.yaml", doc(artifacts=["raw"], raw_generic=True, raw_compression=value))])
    assert f.raw_compression == expected


@pytest.mark.parametrize("value, expected", [(DROP, 6), (0, 0), (9, 9)])
def test_raw_xz_level_values(write_flavor, value, expected):
    (f,) = load_flavors([write_flavor("r.yaml", doc(artifacts=["raw"], raw_generic=True, raw_xz_level=value))])
    assert f.raw_xz_level == expected


@pytest.mark.parametrize("value, expected", [
    (DROP, ("own",)), ("own", ("own",)), ("none", ()), ([], ()),
    (["ghcr.io/org/kairos:cache", "own"], ("ghcr.io/org/kairos:cache", "own")),
])
def test_cache_from_values(write_flavor, value, expected):
    (f,) = load_flavors([write_flavor("c.yaml", doc(cache_from=value))])
    assert f.cache_from == expected


@pytest.mark.parametrize("value, problem", [
    (True, "cache_from: must be own, none or a list of image references, got a boolean True"),
    ("latest", "cache_from: must be own, none or a list of image references, got a string 'latest'"),
    (["Not A Ref"], "cache_from[0]: invalid image reference 'Not A Ref' (e.g. ghcr.io/org/kairos:cache, or own)"),
    (["own", "own"], "cache_from[1]: duplicate value 'own'"),
])
def test_cache_from_bad_values(write_flavor, value, problem):
    text = doc(cache_from=value)
    path = write_flavor("c.yaml", text)
    assert problems_of([path]) == [f"{path}:{line_of(text, 'cache_from:')}: {problem}"]


@pytest.mark.parametrize("value, expected", [(DROP, None), (0, 0), (1700000000, 1700000000),
                                             (253402300799, 253402300799)])
def test_source_date_epoch_values(write_flavor, value, expected):
    (f,) = load_flavors([write_flavor("e.yaml", doc(source_date_epoch=value))])
    assert f.source_date_epoch == expected


@pytest.mark.parametrize("value, problem", [
    (-1, "source_date_epoch: must be at least 0, got -1"),
    ("1700000000", "source_date_epoch: must be a whole number, got a string '1700000000'"),
    (1.5, "source_date_epoch: must be a whole number, got a number 1.5"),
    (253402300800, "source_date_epoch: must be at most 253402300799 (seconds since 1970-01-01 UTC), "
                   "got 253402300800"),
])
def test_source_date_epoch_bad_values(write_flavor, value, problem):
    text = doc(source_date_epoch=value)
    path = write_flavor("e.yaml", text)
    assert problems_of([path]) == [f"{path}:{line_of(text, 'source_date_epoch:')}: {problem}"]


def test_builder_and_netboot_defaults_and_values(write_flavor):
    (f,) = load_flavors([write_flavor("a.yaml", doc())])
    assert (f.builder, f.auroraboot_image, f.netboot_url) == \
        ("native", "quay.io/kairos/auroraboot:v0.19.4", None)
    (g,) = load_flavors([write_flavor("b.yaml", doc(builder="auroraboot", artifacts=["iso", "ipxe"],
                                                     netboot_url="http://10.0.2.2:8080/files/"))])
    assert (g.builder, g.netboot_url) == ("auroraboot", "http://10.0.2.2:8080/files")


@pytest.mark.parametrize("text, keypath, message, at", ERROR_CASES)
def test_config_error_names_file_line_key_and_problem(write_flavor, text, keypath, message, at):
    path = write_flavor("bad.yaml", text)
    problems = problems_of([path])

    assert all(p.startswith(f"{path}:") for p in problems), problems
    hits = [p for p in problems if message in p and (keypath is None or f" {keypath}: " in p)]
    assert hits, f"no problem with {keypath!r} and {message!r} in {problems}"
    # the line of ``at``; without one, the problem has no line (a missing top-level key, a bad file)
    prefix = (f"{path}:{line_of(text, at)}: " if at is not None else f"{path}: ") + (f"{keypath}: " if keypath else "")
    assert any(p.startswith(prefix) for p in hits), f"expected {prefix!r} in {hits}"


def test_all_problems_of_one_file_are_reported(write_flavor):
    text = doc(colour="blue", version="3.1", registry=DROP, trusted_boot="no")
    path = write_flavor("bad.yaml", text)
    problems = problems_of([path])
    assert f"{path}:{line_of(text, 'colour')}: colour: unknown key" in "\n".join(problems)
    assert any(" version: invalid value '3.1'" in p for p in problems)
    assert f"{path}: registry: missing required key" in problems
    assert any(" trusted_boot: must be true, false or a mapping" in p for p in problems)
    assert len(problems) == 4, problems


def test_several_bad_files_are_reported_together(write_flavor):
    good = write_flavor("a-good.yaml", doc(flavor="good"))
    bad1 = write_flavor("b-bad.yaml", doc(colour="blue"))
    bad2 = write_flavor("c-bad.yaml", doc(version="v3"))
    bad3 = write_flavor("d-bad.yaml", "flavor: [unclosed\n")
    problems = problems_of([good.parent])
    assert any(p.startswith(f"{bad1}:") and " colour: unknown key" in p for p in problems)
    assert any(p.startswith(f"{bad2}:") and " version: invalid value 'v3'" in p for p in problems)
    assert any(p.startswith(f"{bad3}:") and "malformed YAML" in p for p in problems)
    assert not any(p.startswith(f"{good}:") for p in problems)


def test_files_and_directories_mix_and_all_problems_come_together(write_flavor, tmp_path):
    bad_dir_file = write_flavor("x.yaml", doc(arches=["amd64", "amd64"]), subdir="one")
    bad_file = write_flavor("y.yaml", doc(devices=DROP), subdir="two")
    problems = problems_of([bad_dir_file.parent, bad_file, tmp_path / "missing"])
    assert any(p.startswith(f"{bad_dir_file}:") and "arches[1]: duplicate value" in p for p in problems)
    assert f"{bad_file}: devices: missing required key" in problems
    assert f"{tmp_path / 'missing'}: no such flavor file or directory" in problems


@pytest.mark.parametrize("setup, message", [
    ("empty-dir", "no flavor files (*.yaml) in this directory"),
    ("dir-with-other-files", "no flavor files (*.yaml) in this directory"),
    ("nonexistent", "no such flavor file or directory"),
])
def test_source_problems(tmp_path, setup, message):
    source = tmp_path / "flavors"
    if setup != "nonexistent":
        source.mkdir()
    if setup == "dir-with-other-files":
        (source / "README.md").write_text("flavor: ubuntu\n")
    assert problems_of([source]) == [f"{source}: {message}"]


def test_paths_below_the_working_directory_are_shown_relative(write_flavor, tmp_path, monkeypatch):
    write_flavor("bad.yaml", doc(colour="blue"))
    monkeypatch.chdir(tmp_path)
    problems = problems_of([Path("flavors")])
    assert problems and all(p.startswith(f"{Path('flavors', 'bad.yaml')}:") for p in problems), problems


@pytest.mark.parametrize("ref, parts", [
    ("ubuntu:24.04", ("ubuntu", "24.04", None)),
    ("opensuse/leap:15.6", ("opensuse/leap", "15.6", None)),
    ("quay.io/kairos/kairos-init:v4.3.0", ("quay.io/kairos/kairos-init", "v4.3.0", None)),
    ("127.0.0.1:5000/kairos/debian:12-core", ("127.0.0.1:5000/kairos/debian", "12-core", None)),
    ("localhost:5000/a/b", ("localhost:5000/a/b", None, None)),
    (f"quay.io/kairos/kairos-init@{DIGEST}", ("quay.io/kairos/kairos-init", None, DIGEST)),
    (f"ubuntu:24.04@{DIGEST}", ("ubuntu", "24.04", DIGEST)),
])
def test_parse_ref(ref, parts):
    assert parse_ref(ref) == parts


@pytest.mark.parametrize("ref", ["Ubuntu:24.04", "ubuntu 24.04", "ubuntu:", "ubuntu@sha256:abc", ""])
def test_parse_ref_rejects(ref):
    with pytest.raises(ValueError, match="not an image reference"):
        parse_ref(ref)


@pytest.mark.parametrize("text, message", [
    ("hostname: x\n", "bad-cc.yaml:1: a cloud-config must start with the line #cloud-config"),
    ("#cloud-config\nusers:\n  - name: [oops\n", "bad-cc.yaml:4: malformed YAML"),
    ("#cloud-config\n- a\n- b\n", "bad-cc.yaml:2: a cloud-config is a YAML mapping, got a list"),
])
def test_bad_cloud_config_is_a_config_error_naming_its_file_and_line(write_flavor, tmp_path, text, message):
    write_flavor("bad-cc.yaml", text)
    path = write_flavor("f.yaml", doc(cloud_config="bad-cc.yaml"))
    problems = problems_of([path])
    assert any(p.startswith(f"{path}:") and "cloud_config:" in p and message in p for p in problems), problems


def test_good_cloud_config_loads(write_flavor, tmp_path):
    (tmp_path / "flavors").mkdir(exist_ok=True)
    cc = tmp_path / "flavors" / "cc.yaml.in"
    cc.write_text("#cloud-config\nusers:\n  - name: kairos\n")
    (f,) = load_flavors([write_flavor("f.yaml", doc(cloud_config="cc.yaml.in"))])
    assert f.cloud_config == cc.resolve()


def test_k3s_versions_by_policy(write_flavor, tmp_path):
    (tmp_path / "flavors").mkdir(exist_ok=True)
    (tmp_path / "flavors" / "k3s.txt").write_text("v1.30.0+k3s1\nv1.27.4+k3s1\nv1.28.3+k3s1\nv1.29.2+k3s1\n")
    text = doc(variants=["core", "standard"], k3s_versions="policy",
               k3s_policy={"current": ["v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"], "available": "k3s.txt"})
    (f,) = load_flavors([write_flavor("f.yaml", text)])
    assert f.k3s_versions == ("v1.28.3+k3s1", "v1.29.2+k3s1", "v1.30.0+k3s1")


@pytest.mark.parametrize("changes, keypath, message, at", [
    (dict(k3s_versions="policy"), "k3s_policy", "required with k3s_versions: policy", "k3s_versions:"),
    (dict(k3s_versions="policy", k3s_policy={}), "k3s_policy", "required with k3s_versions: policy",
     "k3s_policy:"),
    (dict(k3s_versions="policy", k3s_policy={"current": ["v1.27.3+k3s1"], "available": "nope.txt"}),
     "k3s_policy.available", "file 'nope.txt' does not exist", "available:"),
    (dict(k3s_versions=["v1.28.2+k3s1"], k3s_policy={"current": []}), "k3s_policy",
     "only used with k3s_versions: policy", "k3s_policy:"),
])
def test_k3s_policy_errors(write_flavor, changes, keypath, message, at):
    text = doc(variants=["core", "standard"], **changes)
    path = write_flavor("f.yaml", text)
    problems = problems_of([path])
    prefix = f"{path}:{line_of(text, at)}: {keypath}: "
    assert any(p.startswith(prefix) and message in p for p in problems), (prefix, problems)


# --- the messages that point at the most relevant line, exactly ---------------------

@pytest.mark.parametrize("changes, at, problem", [
    (dict(artifacts=["sign"]), "artifacts:", "sign.key: required when artifacts lists sign (a cosign.key made by "
     "`cosign generate-key-pair`), or set sign.keyless: true"),
    (dict(artifacts=["ipxe"]), "artifacts:", "netboot_url: required when artifacts lists ipxe (the http(s) URL "
     "where <stem>-kernel, -initrd and .squashfs will be served)"),
    (dict(converter="kairos-init", kairos_init_image=DROP), "converter:",
     "kairos_init_image: required when converter is kairos-init (e.g. quay.io/kairos/kairos-init:v4.3.0)"),
    # the default converter: like a missing required key, no line
    (dict(kairos_init_image=DROP), None,
     "kairos_init_image: required when converter is kairos-init (e.g. quay.io/kairos/kairos-init:v4.3.0)"),
    (dict(k3s_versions="policy"), "k3s_versions:",
     "k3s_policy: required with k3s_versions: policy: {current: [...], available: FILE}"),
    (dict(k3s_versions="policy", k3s_policy={"available": "k3s.txt"}), "k3s_policy:",
     "k3s_policy.current: missing required key"),
    (dict(base_image={"mmdebstrap": {"arch": "amd64"}}, **BUILTIN), "mmdebstrap:",
     "base_image.mmdebstrap.suite: missing required key"),
    (dict(registry=DROP), None, "registry: missing required key"),
])
def test_problem_names_the_most_relevant_line(write_flavor, changes, at, problem):
    write_flavor("k3s.txt", "v1.28.3+k3s1\n")
    text = doc(**changes)
    path = write_flavor("f.yaml", text)
    where = f"{path}:{line_of(text, at)}" if at else f"{path}"
    assert problems_of([path]) == [f"{where}: {problem}"]


@pytest.mark.parametrize("boot, at, problem", [
    ({"timeout": 0}, "timeout:", "boot.timeout: must be at least 1, got 0"),
    ({"timeout": "5m"}, "timeout:", "boot.timeout: must be a whole number, got a string '5m'"),
    ({"memory": 128}, "memory:", "boot.memory: must be at least 256, got 128"),
    ({"firmware": ["bios", "coreboot"]}, "firmware:", "boot.firmware[1]: unknown value 'coreboot' (allowed: bios, uefi)"),
    ({"cpus": 2}, "cpus:", "boot.cpus: unknown key (allowed: timeout, firmware, memory)"),
])
def test_boot_options_are_checked(write_flavor, boot, at, problem):
    text = doc() + "boot:\n" + "".join(f"  {k}: {yaml.safe_dump(v, default_flow_style=True).strip()}\n"
                                       for k, v in boot.items())
    path = write_flavor("b.yaml", text)
    assert problems_of([path]) == [f"{path}:{line_of(text, at)}: {problem}"]


def test_boot_options_load(write_flavor):
    (f,) = load_flavors([write_flavor("b.yaml", doc(boot={"timeout": 90, "firmware": ["uefi"], "memory": 3072}))])
    assert f.boot == BootOptions(timeout=90, firmware=("uefi",), memory=3072)
    (g,) = load_flavors([write_flavor("c.yaml", doc())])
    assert g.boot == BootOptions() and g.boot.firmware == ("bios", "uefi")


# --- enumerations: one check, one message form --------------------------------------

@pytest.mark.parametrize("changes, at, problem", [
    (dict(converter="magic"), "converter:", "converter: unknown converter 'magic' (allowed: kairos-init, builtin)"),
    (dict(builder="mkosi"), "builder:", "builder: unknown builder 'mkosi' (allowed: native, auroraboot)"),
    (dict(scan={"policy": "strict"}), "policy:", "scan.policy: unknown policy 'strict' (allowed: report-only, enforce)"),
    (dict(scan={"severity": "high"}), "severity:",
     "scan.severity: unknown severity 'high' (allowed: UNKNOWN, LOW, MEDIUM, HIGH, CRITICAL)"),
    (dict(squashfs={"compression": "bzip2"}), "compression:",
     "squashfs.compression: unknown compressor 'bzip2' (allowed: gzip, xz, zstd, lz4, lzo)"),
    (dict(base_image={"mmdebstrap": {"suite": "bookworm", "arch": "riscv64"}}, **BUILTIN), "riscv64",
     "base_image.mmdebstrap.arch: unknown arch 'riscv64' (allowed: amd64, arm64)"),
    (dict(base_image={"mmdebstrap": {"suite": "bookworm", "variant": "tiny"}}, **BUILTIN), "tiny",
     "base_image.mmdebstrap.variant: unknown mmdebstrap variant 'tiny' "
     "(allowed: minbase, buildd, required, important, standard, apt, essential)"),
    (dict(raw_compression="gzip", artifacts=["raw"], raw_generic=True), "raw_compression:",
     "raw_compression: unknown raw compression 'gzip' (allowed: xz, none)"),
    (dict(raw_compression=False, artifacts=["raw"], raw_generic=True), "raw_compression:",
     "raw_compression: must be a string, got a boolean"),
    # not a string: that is the one problem (no "unknown policy None" after it)
    (dict(scan={"policy": 5}), "policy:", 'scan.policy: must be a string, got number 5; quote it, e.g. "5"'),
    (dict(squashfs={"compression": None}), "compression:", "squashfs.compression: must be a string, got null"),
])
def test_unknown_enumeration_value(write_flavor, changes, at, problem):
    text = doc(**changes)
    path = write_flavor("f.yaml", text)
    assert problems_of([path]) == [f"{path}:{line_of(text, at)}: {problem}"]


# --- tables: keys are the dataclass fields, defaults are the dataclass defaults ------

SECTION_TABLES = [(config.BUILTIN, BuiltinOptions), (config.SQUASHFS, SquashfsOptions), (config.SCAN, ScanOptions),
                  (config.SIGN, SignOptions), (config.MMDEBSTRAP, MmdebstrapBase)]


@pytest.mark.parametrize("table, cls", SECTION_TABLES, ids=lambda x: getattr(x, "__name__", ""))
def test_each_section_table_checks_exactly_the_fields_of_its_dataclass(table, cls):
    assert tuple(table) == tuple(f.name for f in dataclasses.fields(cls))


def test_top_keys_are_the_flavor_fields_and_the_provider_policies():
    assert tuple(config.TOP) == tuple(f.name for f in dataclasses.fields(Flavor) if f.name != "path")
    assert config.TOP_KEYS == (*config.TOP, "k3s_policy", "k0s_policy")


def test_each_provider_has_its_versions_field():
    fields = {f.name: f for f in dataclasses.fields(Flavor)}
    for p in PROVIDERS.values():
        assert fields[p.key].default == () and p.key in config.TOP and p.policy_key in config.TOP_KEYS


@pytest.mark.parametrize("changes, attr, default", [
    ({}, "builtin", BuiltinOptions()),
    (dict(builtin={}, **BUILTIN), "builtin", BuiltinOptions()),
    ({}, "squashfs", SquashfsOptions()),
    (dict(squashfs={}), "squashfs", SquashfsOptions()),
    ({}, "scan", ScanOptions()),
    (dict(scan={}), "scan", ScanOptions()),
    ({}, "sign", SignOptions()),
    (dict(sign={}), "sign", SignOptions()),
    (dict(base_image={"mmdebstrap": {"suite": "bookworm"}}, **BUILTIN), "base_image", MmdebstrapBase("bookworm")),
    # an empty components list means the default components
    (dict(base_image={"mmdebstrap": {"suite": "bookworm", "components": []}}, **BUILTIN), "base_image",
     MmdebstrapBase("bookworm")),
    *[({}, f.name, f.default) for f in dataclasses.fields(Flavor)
      if f.name not in MINIMAL and f.default is not dataclasses.MISSING],
])
def test_absent_keys_take_the_dataclass_default(write_flavor, changes, attr, default):
    (f,) = load_flavors([write_flavor("f.yaml", doc(**changes))])
    assert getattr(f, attr) == default


def test_defaults_are_said_once_in_the_model():
    source = (ROOT / "tasks" / "config.py").read_text()
    for literal in ('"gzip"', '"1024k"', '"minbase"', '"most"', '"report-only"', '"CRITICAL"', '"native"',
                    '"COSIGN_PASSWORD"', '"http://deb.debian.org/debian"'):
        assert literal not in source, literal


def test_rules_are_named_and_documented():
    names = [rule.__name__ for rule in config.RULES]
    assert len(set(names)) == len(names)
    assert all(rule.__doc__ for rule in config.RULES), names


def test_the_model_is_said_once():
    """config builds model objects; it defines none of its own (stages import tasks.model)."""
    for name in ("DEVICES", "SEVERITIES", "ConfigError", "Flavor", "MmdebstrapBase",
                 "BuiltinOptions", "SquashfsOptions", "ScanOptions", "SignOptions", "parse_ref"):
        assert getattr(config, name) is getattr(model, name), name


# --- providers: k3s_versions and k0s_versions ---------------------------------------

K3S, K0S = "v1.28.2+k3s1", "v1.34.4+k0s.0"
STANDARD = dict(variants=["core", "standard"])


@pytest.mark.parametrize("changes, k3s, k0s, builds", [
    (dict(k0s_versions=[K0S]), (), (K0S,), [("k0s", K0S)]),
    (dict(k3s_versions=[K3S], k0s_versions=[K0S, "v1.33.4+k0s.1"]), (K3S,), (K0S, "v1.33.4+k0s.1"),
     [("k3s", K3S), ("k0s", K0S), ("k0s", "v1.33.4+k0s.1")]),
    (dict(k0s_versions=["v1.35.0-rc.1+k0s.0"]), (), ("v1.35.0-rc.1+k0s.0",), [("k0s", "v1.35.0-rc.1+k0s.0")]),
])
def test_standard_flavors_list_k3s_and_or_k0s_versions(write_flavor, changes, k3s, k0s, builds):
    (f,) = load_flavors([write_flavor("f.yaml", doc(**STANDARD, **changes))])
    assert (f.k3s_versions, f.k0s_versions) == (k3s, k0s)
    assert type(f.k0s_versions) is tuple
    assert list(f.provider_versions()) == builds


K0S_HINT = "a k0s release such as v1.34.4+k0s.0, or the word policy (see k0s_policy)"


@pytest.mark.parametrize("changes, at, problem", [
    pytest.param(dict(**STANDARD, k0s_versions=["v1.34.4+k0s0"]), "k0s_versions:",
                 f"k0s_versions[0]: invalid value 'v1.34.4+k0s0': {K0S_HINT}", id="k0s-malformed"),
    pytest.param(dict(**STANDARD, k0s_versions=[K0S, "1.33.4+k0s.0"]), "k0s_versions:",
                 f"k0s_versions[1]: invalid value '1.33.4+k0s.0': {K0S_HINT}", id="k0s-without-v"),
    pytest.param(dict(**STANDARD, k0s_versions=[K3S]), "k0s_versions:",
                 f"k0s_versions[0]: invalid value 'v1.28.2+k3s1': {K0S_HINT}", id="k3s-release-as-k0s"),
    pytest.param(dict(**STANDARD, k3s_versions=[K0S]), "k3s_versions:",
                 "k3s_versions[0]: invalid value 'v1.34.4+k0s.0': a k3s release such as v1.28.2+k3s1, or the word "
                 "policy (see k3s_policy)", id="k0s-release-as-k3s"),
    pytest.param(dict(**STANDARD, k0s_versions=[K0S, K0S]), "k0s_versions:",
                 "k0s_versions[1]: duplicate value 'v1.34.4+k0s.0'", id="k0s-duplicate"),
    pytest.param(dict(**STANDARD, k0s_versions=K0S), "k0s_versions:",
                 "k0s_versions: must be a list, got a string", id="k0s-not-a-list"),
    pytest.param(dict(k0s_versions=[K0S]), "k0s_versions:",
                 "k0s_versions: k0s versions are only used by the standard variant, which variants does not list",
                 id="k0s-on-core-only"),
    pytest.param(dict(k0s_versions=[]), "k0s_versions:",
                 "k0s_versions: k0s versions are only used by the standard variant, which variants does not list",
                 id="k0s-empty-on-core-only"),
    pytest.param(dict(**STANDARD, k0s_versions=[]), "k0s_versions:",
                 "k0s_versions: gives no k0s version; the standard variant needs at least one (e.g. [v1.34.4+k0s.0])",
                 id="k0s-empty"),
    pytest.param(dict(**STANDARD, k3s_versions=[K3S], k0s_versions=[]), "k0s_versions:",
                 "k0s_versions: gives no k0s version; list at least one (e.g. [v1.34.4+k0s.0]) or remove the key",
                 id="k0s-empty-next-to-k3s"),
    pytest.param(dict(**STANDARD, k0s_versions=[K0S], **BUILTIN), "variants:",
                 "variants: the builtin converter does not install k0s; the standard variant needs converter: "
                 "kairos-init", id="builtin-standard-k0s"),
    pytest.param(dict(**STANDARD, k3s_versions=[K3S], k0s_versions=[K0S], **BUILTIN), "variants:",
                 "variants: the builtin converter does not install k3s or k0s; the standard variant needs converter: "
                 "kairos-init", id="builtin-standard-both"),
    pytest.param(dict(**STANDARD, k0s_versions=[K0S], k0s_policy={"current": [K0S]}), "k0s_policy:",
                 "k0s_policy: only used with k0s_versions: policy", id="k0s-policy-without-policy"),
    pytest.param(dict(**STANDARD, k0s_versions="policy"), "k0s_versions:",
                 "k0s_policy: required with k0s_versions: policy: {current: [...], available: FILE}",
                 id="k0s-policy-missing"),
    pytest.param(dict(**STANDARD, k0s_versions="policy", k0s_policy={"current": ["v1.34.4"], "available": "k0s.txt"}),
                 "current:", "k0s_policy.current[0]: invalid value 'v1.34.4': a k0s release such as v1.34.4+k0s.0",
                 id="k0s-policy-current-malformed"),
    pytest.param(dict(**STANDARD, k0s_versions="policy",
                      k0s_policy={"current": [K0S, "v1.35.0-rc.1+k0s.0"], "available": "k0s.txt"}), "current:",
                 "k0s_policy.current[1]: 'v1.35.0-rc.1+k0s.0' is a pre-release; the policy starts from stable "
                 "releases such as v1.34.4+k0s.0", id="k0s-policy-current-pre-release"),
    pytest.param(dict(**STANDARD, k3s_versions="policy",
                      k3s_policy={"current": ["v1.29.0-rc1+k3s1"], "available": "k0s.txt"}), "current:",
                 "k3s_policy.current[0]: 'v1.29.0-rc1+k3s1' is a pre-release; the policy starts from stable "
                 "releases such as v1.28.2+k3s1", id="k3s-policy-current-pre-release"),
])
def test_provider_problems(write_flavor, changes, at, problem):
    write_flavor("k0s.txt", "v1.34.5+k0s.0\n")
    text = doc(**changes)
    path = write_flavor("f.yaml", text)
    assert problems_of([path]) == [f"{path}:{line_of(text, at)}: {problem}"]


def test_k0s_versions_by_policy(write_flavor):
    write_flavor("k0s.txt", "v1.35.1+k0s.0\nv1.35.2-rc.0+k0s.0\nv1.33.4+k0s.1\nv1.34.5+k0s.0\nv1.28.2+k3s1\n")
    text = doc(**STANDARD, k3s_versions=[K3S], k0s_versions="policy",
               k0s_policy={"current": ["v1.32.8+k0s.0", "v1.33.4+k0s.0", K0S], "available": "k0s.txt"})
    (f,) = load_flavors([write_flavor("f.yaml", text)])
    assert f.k0s_versions == ("v1.33.4+k0s.1", "v1.34.5+k0s.0", "v1.35.1+k0s.0")
    assert f.k3s_versions == (K3S,)
