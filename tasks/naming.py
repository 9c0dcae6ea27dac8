"""The Kairos naming convention: file stems, artifact file names, image tags.

Pure functions. Examples:
  kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1.iso
  kairos-rocky-9.6-standard-amd64-generic-v3.5.6-k0sv1.32.8+k0s.0.iso
  quay.io/kairos/opensuse:leap-15.6-core-amd64-generic-v3.1.0
"""
from __future__ import annotations

from .kinds import KINDS


def version_string(kairos_version: str, provider: str | None = None, provider_version: str | None = None) -> str:
    """`<kairos version>` or, for standard builds, `<kairos version>-<provider><provider version>`
    (`v3.1.0-k3sv1.28.2+k3s1`, `v4.0.1-k0sv1.34.4+k0s.0`)."""
    return f"{kairos_version}-{provider}{provider_version}" if provider else kairos_version


def stem(flavor: str, release: str, variant: str, arch: str, device: str, version: str) -> str:
    """`kairos-<flavor>-<flavor_release>-<variant>-<arch>-<device>-<version>`."""
    return f"kairos-{flavor}-{release}-{variant}-{arch}-{device}-{version}"


def image_tag(registry: str, flavor: str, release: str, variant: str, arch: str, device: str,
              version: str) -> str:
    """`<registry>/<flavor>:<release>-<variant>-<arch>-<device>-<version>`.

    Docker tags cannot hold '+', so (as upstream Kairos does) it becomes '-':
    `...-v3.1.0-k3sv1.28.2-k3s1`, `...-v4.0.1-k0sv1.34.4-k0s.0`.
    """
    return f"{registry}/{flavor}:{release}-{variant}-{arch}-{device}-{version.replace('+', '-')}"


def repository(ref: str) -> str:
    """The repository of an image reference: without `:tag` and `@digest`."""
    name = ref.split("@", 1)[0]
    head, sep, tail = name.rpartition(":")
    return head if sep and "/" not in tail else name


def pinned(ref: str, digest: str) -> str:
    """`<repository>@<digest>`: the reference that names exactly one image."""
    return f"{repository(ref)}@{digest}"


def carrier_tag(image: str) -> str:
    """The OCI image that carries a raw disk image: the image tag plus `-img`."""
    return f"{image}-img"


def artifact_files(build_stem: str, kind: str) -> list[str]:
    """File names one artifact kind produces for a build, checksums included."""
    return KINDS[kind].files(build_stem)


def binary_name(name: str, version: str, os_name: str, arch: str, ext: str = "") -> str:
    """`<name>-<version>-<os>-<arch>.<ext>`."""
    return f"{name}-{version}-{os_name}-{arch}" + (f".{ext}" if ext else "")
