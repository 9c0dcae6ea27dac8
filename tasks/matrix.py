"""Flavors -> builds (the expanded matrix), matrix rules and shards."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from . import naming
from .kinds import KINDS
from .model import DEVICES, Flavor, MmdebstrapBase
from .providers import PROVIDERS
from .state import safe_id


@dataclass(frozen=True)
class Build:
    """One row of the expanded flavor matrix. A standard build names its provider (a key of
    tasks.providers.PROVIDERS: k3s, k0s) and the provider's version; a core build neither."""

    flavor: Flavor
    variant: str
    arch: str
    device: str
    provider: str | None = field(default=None, kw_only=True)
    provider_version: str | None = field(default=None, kw_only=True)

    def __post_init__(self):
        if (self.provider is None) != (self.provider_version is None) or \
                (self.provider is not None and self.provider not in PROVIDERS):
            raise ValueError(f"a build needs a known provider and its version, or neither: "
                             f"{self.provider!r} {self.provider_version!r}")

    @property
    def version(self) -> str:
        return naming.version_string(self.flavor.version, self.provider, self.provider_version)

    @property
    def provider_fields(self) -> dict[str, str | None]:
        """The provider and its version as the plan, the manifest and the provenance record them."""
        return {"provider": self.provider, "provider_version": self.provider_version}

    @property
    def stem(self) -> str:
        f = self.flavor
        return naming.stem(f.flavor, f.release, self.variant, self.arch, self.device, self.version)

    @property
    def image(self) -> str:
        f = self.flavor
        return naming.image_tag(f.registry, f.flavor, f.release, self.variant, self.arch, self.device,
                                self.version)

    @property
    def platform(self) -> str:
        return f"linux/{self.arch}"

    @property
    def kinds(self) -> tuple[str, ...]:
        """Artifact kinds this build produces: the flavor's list with the registry's matrix
        rules applied, plus the kinds they are built from and the kinds they imply, in
        registry order."""
        wanted = {name for name in self.flavor.artifacts if KINDS[name].for_build(self)}
        wanted |= {src for name in wanted for src in KINDS[name].inputs(self)}
        wanted |= {k.name for k in KINDS.values() if set(k.implied_by) & wanted and k.for_build(self)}
        wanted = {k for k in wanted if not KINDS[k].requires_any or set(KINDS[k].requires_any) & wanted}
        return tuple(k for k in KINDS if k in wanted)

    def files(self) -> dict[str, list[str]]:
        """Kind -> its file names for this build (kinds that write no files left out)."""
        return {kind: names for kind in self.kinds if (names := KINDS[kind].files(self.stem))}

    @property
    def base(self) -> "BaseSource":
        return base_source(self.flavor, self.arch)


@dataclass(frozen=True)
class BaseSource:
    """Where a build's base image comes from, identified for task names."""

    ref: str                                  # registry reference that is resolved and pulled
    ident: str                                # task-name-safe id of ref
    mmdebstrap: MmdebstrapBase | None = None  # set when the ref is seeded by mmdebstrap
    arch: str | None = None                   # arch of the mmdebstrap rootfs


def base_source(flavor: Flavor, arch: str) -> BaseSource:
    base = flavor.base_image
    if isinstance(base, MmdebstrapBase):
        # the seeded image lives under the flavor's registry path, keyed by options and registry
        opts = hashlib.sha256(json.dumps([base.options(), flavor.registry], sort_keys=True).encode()
                              ).hexdigest()[:10]
        ref = f"{flavor.registry}/base-mmdebstrap:{base.suite}-{base.variant}-{arch}-{opts}"
        return BaseSource(ref=ref, ident=safe_id(f"mmdebstrap-{base.suite}-{base.variant}-{arch}-{opts}"),
                          mmdebstrap=base, arch=arch)
    return BaseSource(ref=base, ident=safe_id(base))


def expand(flavors: tuple[Flavor, ...]) -> list[Build]:
    """Every build of every flavor, in file order; one standard build per provider version (k3s
    versions, then k0s versions); arm64-only devices skip amd64."""
    builds = []
    for f in flavors:
        for variant in f.variants:
            providers = f.provider_versions() if variant == "standard" else ((None, None),)
            for provider, provider_version in providers:
                for arch in f.arches:
                    for device in f.devices:
                        if arch not in DEVICES[device]:
                            continue
                        builds.append(Build(f, variant, arch, device, provider=provider,
                                            provider_version=provider_version))
    return builds


def duplicate_problems(builds: list[Build]) -> list[str]:
    """Two flavor files that would write the same artifacts are an error."""
    seen: dict[str, Build] = {}
    problems = []
    for b in builds:
        other = seen.get(b.stem)
        if other is not None:
            problems.append(f"{b.flavor.path}: build {b.stem} is also produced by {other.flavor.path}")
        else:
            seen[b.stem] = b
    return problems


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1-based) -> (I, N); raises ValueError with a readable message."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like I/N, e.g. 2/4, got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise ValueError(f"shard {text!r}: need 1 <= I <= N")
    return i, n


def shard(builds: list[Build], index: int, count: int) -> list[Build]:
    """Builds of shard index/count: round robin over the stems sorted, stable across runs."""
    ordered = sorted(builds, key=lambda b: b.stem)
    mine = {b.stem for k, b in enumerate(ordered) if k % count == index - 1}
    return [b for b in builds if b.stem in mine]
