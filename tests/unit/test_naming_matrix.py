"""naming.py (the Kairos convention) and matrix.py (flavors -> builds, rules, shards)."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from tasks import naming
from tasks.model import MmdebstrapBase, parse_ref
from tasks.matrix import Build, duplicate_problems, expand, parse_shard, shard
from tasks.providers import PROVIDERS
from tasks.tools.docker import registry_host

K3S = "v1.28.2+k3s1"

# --- naming ----------------------------------------------------------------------

NAME_CASES = [
    # flavor, release, variant, arch, device, kairos version, provider, its version, registry -> stem, image tag
    ("ubuntu", "23.04", "standard", "arm64", "rpi4", "v3.1.0", "k3s", K3S, "quay.io/kairos",
     "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1",
     "quay.io/kairos/ubuntu:23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2-k3s1"),
    ("opensuse", "leap-15.6", "core", "amd64", "generic", "v3.1.0", None, None, "quay.io/kairos",
     "kairos-opensuse-leap-15.6-core-amd64-generic-v3.1.0",
     "quay.io/kairos/opensuse:leap-15.6-core-amd64-generic-v3.1.0"),
    ("debian", "12", "core", "amd64", "generic", "v3.1.0", None, None, "127.0.0.1:5000/kairos",
     "kairos-debian-12-core-amd64-generic-v3.1.0",
     "127.0.0.1:5000/kairos/debian:12-core-amd64-generic-v3.1.0"),
    ("alpine", "3.21", "standard", "amd64", "generic", "v3.2.0-rc1", "k3s", "v1.29.0-rc1+k3s2", "ghcr.io/me/os",
     "kairos-alpine-3.21-standard-amd64-generic-v3.2.0-rc1-k3sv1.29.0-rc1+k3s2",
     "ghcr.io/me/os/alpine:3.21-standard-amd64-generic-v3.2.0-rc1-k3sv1.29.0-rc1-k3s2"),
    ("fedora", "42", "core", "arm64", "rpi3", "v3.1.0", None, None, "localhost:5000",
     "kairos-fedora-42-core-arm64-rpi3-v3.1.0",
     "localhost:5000/fedora:42-core-arm64-rpi3-v3.1.0"),
    # upstream release names of k0s builds
    ("hadron", "v0.0.4", "standard", "amd64", "generic", "v4.0.1", "k0s", "v1.34.4+k0s.0", "quay.io/kairos",
     "kairos-hadron-v0.0.4-standard-amd64-generic-v4.0.1-k0sv1.34.4+k0s.0",
     "quay.io/kairos/hadron:v0.0.4-standard-amd64-generic-v4.0.1-k0sv1.34.4-k0s.0"),
    ("rocky", "9.6", "standard", "amd64", "generic", "v3.5.6", "k0s", "v1.32.8+k0s.0", "quay.io/kairos",
     "kairos-rocky-9.6-standard-amd64-generic-v3.5.6-k0sv1.32.8+k0s.0",
     "quay.io/kairos/rocky:9.6-standard-amd64-generic-v3.5.6-k0sv1.32.8-k0s.0"),
    # a pre-release Kairos version, and a k0s pre-release
    ("ubuntu", "24.04", "standard", "arm64", "rpi4", "v3.6.1-beta1", "k0s", "v1.34.4+k0s.0", "127.0.0.1:5000/k",
     "kairos-ubuntu-24.04-standard-arm64-rpi4-v3.6.1-beta1-k0sv1.34.4+k0s.0",
     "127.0.0.1:5000/k/ubuntu:24.04-standard-arm64-rpi4-v3.6.1-beta1-k0sv1.34.4-k0s.0"),
    ("debian", "12", "standard", "amd64", "generic", "v3.6.1-beta1", "k0s", "v1.35.0-rc.1+k0s.0", "ghcr.io/me/os",
     "kairos-debian-12-standard-amd64-generic-v3.6.1-beta1-k0sv1.35.0-rc.1+k0s.0",
     "ghcr.io/me/os/debian:12-standard-amd64-generic-v3.6.1-beta1-k0sv1.35.0-rc.1-k0s.0"),
]


@pytest.mark.parametrize("flavor, release, variant, arch, device, version, provider, provider_version, registry, "
                         "stem, tag", NAME_CASES)
def test_stem_and_image_tag(flavor, release, variant, arch, device, version, provider, provider_version, registry,
                            stem, tag):
    full = naming.version_string(version, provider, provider_version)
    assert naming.stem(flavor, release, variant, arch, device, full) == stem
    image = naming.image_tag(registry, flavor, release, variant, arch, device, full)
    assert image == tag
    assert "+" not in image
    repo, image_tag, digest = parse_ref(image)  # a valid docker reference
    assert (repo, digest) == (f"{registry}/{flavor}", None) and len(image_tag) <= 128
    assert naming.carrier_tag(image) == tag + "-img"


@pytest.mark.parametrize("flavor, release, variant, arch, device, version, provider, provider_version, registry, "
                         "stem, tag", NAME_CASES)
def test_builds_of_a_flavor_have_those_names(make_flavor, flavor, release, variant, arch, device, version, provider,
                                             provider_version, registry, stem, tag):
    """The same names through the flavor -> build expansion (what `plan` and the stages use)."""
    lists = {PROVIDERS[provider].key: (provider_version,)} if provider else {}
    f = make_flavor(flavor=flavor, release=release, variants=(variant,), arches=(arch,), devices=(device,),
                    version=version, registry=registry, **lists)
    (b,) = expand((f,))
    assert (b.stem, b.image, b.provider, b.provider_version) == (stem, tag, provider, provider_version)


UPSTREAM_ISOS = ["kairos-hadron-v0.0.4-standard-amd64-generic-v4.0.1-k0sv1.34.4+k0s.0.iso",
                 "kairos-rocky-9.6-standard-amd64-generic-v3.5.6-k0sv1.32.8+k0s.0.iso"]


@pytest.mark.parametrize("name", UPSTREAM_ISOS)
def test_upstream_k0s_release_names(name):
    stems = [c[-2] for c in NAME_CASES]
    assert name.removesuffix(".iso") in stems
    assert name in naming.artifact_files(name.removesuffix(".iso"), "iso")


@pytest.mark.parametrize("version, provider, provider_version, expected", [
    ("v3.1.0", None, None, "v3.1.0"),
    ("v3.1.0", "k3s", K3S, "v3.1.0-k3sv1.28.2+k3s1"),
    ("v3.2.0-beta1", "k3s", "v1.30.1+k3s2", "v3.2.0-beta1-k3sv1.30.1+k3s2"),
    ("v4.0.1", "k0s", "v1.34.4+k0s.0", "v4.0.1-k0sv1.34.4+k0s.0"),
    ("v3.6.1-beta1", "k0s", "v1.34.4+k0s.0", "v3.6.1-beta1-k0sv1.34.4+k0s.0"),
])
def test_version_string(version, provider, provider_version, expected):
    assert naming.version_string(version, provider, provider_version) == expected


S = "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1"


@pytest.mark.parametrize("kind, names", [
    ("iso", [f"{S}.iso", f"{S}.iso.sha256"]),
    ("raw", [f"{S}.img", f"{S}.img.sha256"]),
    ("ipxe", [f"{S}.ipxe", f"{S}-ipxe.iso", f"{S}-ipxe-usb.img",
              f"{S}.ipxe.sha256", f"{S}-ipxe.iso.sha256", f"{S}-ipxe-usb.img.sha256"]),
    ("kernel", [f"{S}-kernel", f"{S}-kernel.sha256"]),
    ("initrd", [f"{S}-initrd", f"{S}-initrd.sha256"]),
    ("squashfs", [f"{S}.squashfs", f"{S}.squashfs.sha256"]),
    ("sbom", [f"{S}-sbom.spdx.json", f"{S}-sbom.syft.json"]),
    ("trivy", [f"{S}-trivy.sarif", f"{S}-trivy.json"]),
    ("grype", [f"{S}-grype.json", f"{S}-grype.sarif"]),
    ("sign", []),
])
def test_artifact_files(kind, names):
    assert naming.artifact_files(S, kind) == names


@pytest.mark.parametrize("kind, name", [
    ("initrd", "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1-initrd"),
    ("kernel", "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1-kernel"),
    ("iso", "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1.iso"),
    ("iso", "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1.iso.sha256"),
    ("trivy", "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1-trivy.sarif"),
    ("grype", "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1-grype.json"),
    ("sbom", "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1-sbom.spdx.json"),
])
def test_design_examples(kind, name):
    stem = naming.stem("ubuntu", "23.04", "standard", "arm64", "rpi4", naming.version_string("v3.1.0", "k3s", K3S))
    assert name in naming.artifact_files(stem, kind)


@pytest.mark.parametrize("args, expected", [
    (("cosign", "v2.4.1", "linux", "amd64"), "cosign-v2.4.1-linux-amd64"),
    (("grype", "v0.80.0", "linux", "arm64", "tar.gz"), "grype-v0.80.0-linux-arm64.tar.gz"),
    (("auroraboot", "v0.4.3", "darwin", "arm64", "zip"), "auroraboot-v0.4.3-darwin-arm64.zip"),
])
def test_binary_name(args, expected):
    assert naming.binary_name(*args) == expected


# --- matrix: expand() rules ------------------------------------------------------

K0S = "v1.34.4+k0s.0"
EXPAND_CASES = [
    # variants, k3s versions, k0s versions, arches, devices -> (variant, provider, version, arch, device) in order
    pytest.param(("core",), (), (), ("amd64", "arm64"), ("generic", "rpi3", "rpi4"),
                 [("core", None, None, "amd64", "generic"), ("core", None, None, "arm64", "generic"),
                  ("core", None, None, "arm64", "rpi3"), ("core", None, None, "arm64", "rpi4")], id="amd64-never-rpi"),
    pytest.param(("core", "standard"), ("v1.28.2+k3s1", "v1.29.1+k3s1"), (), ("amd64",), ("generic",),
                 [("core", None, None, "amd64", "generic"), ("standard", "k3s", "v1.28.2+k3s1", "amd64", "generic"),
                  ("standard", "k3s", "v1.29.1+k3s1", "amd64", "generic")], id="one-standard-build-per-k3s"),
    pytest.param(("standard",), (K3S,), (), ("arm64",), ("rpi4", "generic"),
                 [("standard", "k3s", K3S, "arm64", "rpi4"), ("standard", "k3s", K3S, "arm64", "generic")],
                 id="device-order-kept"),
    pytest.param(("core",), (), (), ("amd64",), ("rpi4",), [], id="amd64-only-rpi4-gives-nothing"),
    pytest.param(("standard", "core"), (K3S,), (), ("arm64", "amd64"), ("generic",),
                 [("standard", "k3s", K3S, "arm64", "generic"), ("standard", "k3s", K3S, "amd64", "generic"),
                  ("core", None, None, "arm64", "generic"), ("core", None, None, "amd64", "generic")], id="file-order"),
    pytest.param(("standard",), (), (K0S, "v1.33.4+k0s.1"), ("amd64",), ("generic",),
                 [("standard", "k0s", K0S, "amd64", "generic"),
                  ("standard", "k0s", "v1.33.4+k0s.1", "amd64", "generic")],
                 id="one-standard-build-per-k0s"),
    pytest.param(("core", "standard"), (K3S,), (K0S,), ("amd64", "arm64"), ("generic",),
                 [("core", None, None, "amd64", "generic"), ("core", None, None, "arm64", "generic"),
                  ("standard", "k3s", K3S, "amd64", "generic"), ("standard", "k3s", K3S, "arm64", "generic"),
                  ("standard", "k0s", K0S, "amd64", "generic"), ("standard", "k0s", K0S, "arm64", "generic")],
                 id="k3s-then-k0s"),
    pytest.param(("core",), (), (K0S,), ("amd64",), ("generic",), [("core", None, None, "amd64", "generic")],
                 id="core-has-no-provider"),
]


@pytest.mark.parametrize("variants, k3s, k0s, arches, devices, expected", EXPAND_CASES)
def test_expand(make_flavor, variants, k3s, k0s, arches, devices, expected):
    f = make_flavor(variants=variants, k3s_versions=k3s, k0s_versions=k0s, arches=arches, devices=devices)
    builds = expand((f,))
    assert [(b.variant, b.provider, b.provider_version, b.arch, b.device) for b in builds] == expected
    assert all(b.flavor is f for b in builds)
    assert len({b.stem for b in builds}) == len(builds)


@pytest.mark.parametrize("provider, provider_version", [("k3s", None), (None, K3S), ("rke2", "v1.30.0+rke2r1")])
def test_a_build_has_a_known_provider_and_its_version_or_neither(make_flavor, provider, provider_version):
    with pytest.raises(ValueError, match="a build needs a known provider and its version, or neither"):
        Build(make_flavor(), "standard", "amd64", "generic", provider=provider, provider_version=provider_version)


def test_expand_keeps_flavor_order(make_flavor):
    a = make_flavor(flavor="zzz", path=Path("a.yaml"))
    b = make_flavor(flavor="aaa", path=Path("b.yaml"))
    assert [x.flavor.flavor for x in expand((a, b))] == ["zzz", "aaa"]
    assert expand(()) == []


KINDS_ALL = ("iso", "raw", "ipxe", "kernel", "initrd", "squashfs", "sbom", "trivy", "grype", "sign")


@pytest.mark.parametrize("device, arch, raw_generic, kinds", [
    ("generic", "amd64", False, ("iso", "ipxe", "kernel", "initrd", "squashfs", "sbom", "trivy", "grype", "sign")),
    ("generic", "arm64", True, ("iso", "raw", "xz", "kernel", "initrd", "squashfs", "sbom", "trivy", "grype", "sign")),
    ("rpi4", "arm64", False, ("raw", "xz", "kernel", "initrd", "squashfs", "sbom", "trivy", "grype", "sign")),
    ("rpi3", "arm64", True, ("raw", "xz", "kernel", "initrd", "squashfs", "sbom", "trivy", "grype", "sign")),
])
def test_build_kinds_iso_ipxe_generic_only_raw_rpi_unless_raw_generic(make_build, device, arch, raw_generic, kinds):
    b = make_build(arch=arch, device=device, artifacts=KINDS_ALL, raw_generic=raw_generic)
    assert b.kinds == kinds
    files = b.files()
    assert list(files) == [k for k in kinds if k != "sign"]  # sign has no files of its own
    assert (f"{b.stem}.iso" in files.get("iso", [])) == (device == "generic")
    assert (f"{b.stem}.img" in files.get("raw", [])) == (device != "generic" or raw_generic)


def test_build_properties(make_build):
    b = make_build("standard", K3S, "arm64", "rpi4", flavor="ubuntu", release="23.04")
    assert b.version == "v3.1.0-k3sv1.28.2+k3s1"
    assert b.stem == "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1"
    assert b.image == "quay.io/kairos/ubuntu:23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2-k3s1"
    assert b.platform == "linux/arm64"
    assert b.base.ref == "ubuntu:24.04" and b.base.mmdebstrap is None


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_mmdebstrap_base_source(make_build, arch):
    base = MmdebstrapBase(suite="bookworm")
    b = make_build(arch=arch, base_image=base, registry="127.0.0.1:5000/kairos", converter="builtin",
                   kairos_init_image=None)
    src = b.base
    assert src.mmdebstrap == base and src.arch == arch
    repo, tag, digest = parse_ref(src.ref)
    assert registry_host(src.ref) == "127.0.0.1:5000"
    assert tag.startswith(f"bookworm-minbase-{arch}-") and digest is None
    assert "/" not in src.ident and ":" not in src.ident
    assert b.base == src  # stable
    other = make_build(arch=arch, base_image=MmdebstrapBase(suite="bookworm", include=("vim",)),
                       registry="127.0.0.1:5000/kairos", converter="builtin", kairos_init_image=None)
    assert other.base.ref != src.ref and other.base.ident != src.ident  # options are part of the id


# --- matrix: duplicates across files ------------------------------------------------

def test_duplicate_problems_across_two_flavor_files(make_flavor):
    a = make_flavor(path=Path("flavors/a.yaml"), arches=("amd64", "arm64"))
    b = make_flavor(path=Path("flavors/b.yaml"), arches=("arm64",), registry="127.0.0.1:5000/x")
    problems = duplicate_problems(expand((a, b)))
    stem = "kairos-ubuntu-24.04-core-arm64-generic-v3.1.0"
    assert problems == [f"flavors/b.yaml: build {stem} is also produced by flavors/a.yaml"]


@pytest.mark.parametrize("changes", [{"release": "22.04"}, {"flavor": "kubuntu"}, {"version": "v3.2.0"},
                                     {"devices": ("rpi4",), "arches": ("arm64",)}])
def test_no_duplicates_when_stems_differ(make_flavor, changes):
    a = make_flavor(path=Path("a.yaml"))
    b = make_flavor(path=Path("b.yaml"), **changes)
    assert duplicate_problems(expand((a, b))) == []


# --- matrix: shards ---------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("2/4", (2, 4)), ("4/4", (4, 4)), ("10/12", (10, 12))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0/4", "need 1 <= I <= N"), ("5/4", "need 1 <= I <= N"), ("1/0", "need 1 <= I <= N"),
    ("-1/4", "need 1 <= I <= N"), ("a/b", "must look like I/N"), ("1", "must look like I/N"),
    ("1/2/3", "must look like I/N"), ("", "must look like I/N"), ("1/", "must look like I/N"),
])
def test_parse_shard_rejects(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_shard(text)


@pytest.fixture
def matrix(make_flavor):
    """A 24-build matrix like flavors/upstream."""
    flavors = []
    for name, release, arches, devices in [("alpine", "3.21", ("amd64", "arm64"), ("generic", "rpi4")),
                                           ("debian", "12", ("amd64", "arm64"), ("generic", "rpi4")),
                                           ("fedora", "42", ("amd64",), ("generic",)),
                                           ("opensuse", "leap-15.6", ("amd64", "arm64"), ("generic",)),
                                           ("ubuntu", "24.04", ("amd64", "arm64"), ("generic", "rpi4"))]:
        flavors.append(make_flavor(path=Path(f"{name}.yaml"), flavor=name, release=release,
                                   variants=("core", "standard"), k3s_versions=(K3S,), arches=arches,
                                   devices=devices))
    builds = expand(tuple(flavors))
    assert len(builds) == 24
    return builds


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 24, 30])
def test_shards_partition_the_matrix(matrix, count):
    parts = [shard(matrix, i, count) for i in range(1, count + 1)]
    stems = [b.stem for part in parts for b in part]
    assert sorted(stems) == sorted(b.stem for b in matrix)  # union is everything
    assert len(stems) == len(set(stems))  # disjoint
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # round robin balances
    for part in parts:  # each shard keeps the matrix order
        assert part == [b for b in matrix if b in part]


@pytest.mark.parametrize("index, count", [(1, 3), (2, 3), (3, 3), (2, 5)])
def test_shard_is_stable_across_runs_and_input_order(matrix, index, count):
    first = {b.stem for b in shard(matrix, index, count)}
    shuffled = list(matrix)
    random.Random(index * 31 + count).shuffle(shuffled)
    assert {b.stem for b in shard(shuffled, index, count)} == first
    assert {b.stem for b in shard(list(matrix), index, count)} == first


@pytest.mark.parametrize("artifacts, builder, device, arch, kinds", [
    (("iso",), "native", "generic", "amd64", ("iso", "kernel", "initrd", "squashfs")),
    (("iso",), "auroraboot", "generic", "amd64", ("iso",)),  # AuroraBoot builds from the image
    (("raw",), "native", "rpi4", "arm64", ("raw", "xz", "kernel", "initrd", "squashfs")),
    (("raw",), "auroraboot", "rpi4", "arm64", ("raw", "xz")),
    (("ipxe",), "auroraboot", "generic", "amd64", ("ipxe", "kernel", "initrd", "squashfs")),
    (("ipxe", "sbom"), "native", "generic", "arm64", ("sbom",)),  # ipxe is amd64 only: nothing implied
])
def test_native_builders_imply_their_inputs(make_build, artifacts, builder, device, arch, kinds):
    b = make_build(arch=arch, device=device, artifacts=artifacts, builder=builder, raw_generic=False)
    assert b.kinds == kinds
