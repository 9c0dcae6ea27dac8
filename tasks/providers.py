"""Providers: the Kubernetes distributions kairos-init installs into standard images (k3s, k0s),
and their version policy.

PROVIDERS says once what a provider is: its name (kairos-init `-p <name>`, the
`<name>_versions` and `<name>_policy` flavor keys, the `-<name><version>` part of artifact
names) and how its releases are numbered (`v1.28.2+k3s1`, `v1.34.4+k0s.0`).

Version policy: every release ships three versions of a provider (three minors). Given
the current three and the upstream releases, the next three are:
- no newer minor upstream: each current minor bumped to its latest patch;
- a newer minor upstream: the oldest minor dropped, the newest minor added at
  its latest patch, the other two bumped to their latest patches.
Pre-releases (`-rc1`, `-rc.1`) and drafts are ignored; the build number orders numerically
(`+k3s10` after `+k3s9`, `+k0s.1` after `+k0s.0`); a minor with no upstream data keeps its
current version.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_NUMBER = r"(0|[1-9]\d*)"
_PRE_RELEASE = r"(-[0-9A-Za-z]+(?:\.[0-9A-Za-z]+)*)?"


@dataclass(frozen=True)
class Provider:
    """One provider: ``name`` is kairos-init's `-p` value; a release is `v<x.y.z>+<build><N>`."""

    name: str
    build: str         # what precedes the build number after '+': k3s -> +k3s1, k0s. -> +k0s.0
    first_build: int   # the build number of a release's first build (assumed when a version lacks one)
    example: str       # a release, for messages and help

    @property
    def key(self) -> str:
        """The flavor key listing its versions."""
        return f"{self.name}_versions"

    @property
    def policy_key(self) -> str:
        """The flavor key configuring `<key>: policy`."""
        return f"{self.name}_policy"

    @property
    def pattern(self) -> re.Pattern:
        """A release as flavor files name it (pre-releases allowed: a flavor may pin one)."""
        return re.compile(rf"^v{_NUMBER}\.{_NUMBER}\.{_NUMBER}{_PRE_RELEASE}\+{re.escape(self.build)}\d+$")

    @property
    def hint(self) -> str:
        return f"a {self.name} release such as {self.example}"

    def parse(self, text: str) -> Version | None:
        """A stable release, or None for a pre-release or something else (lenient: the leading
        `v` and the build suffix may be left out)."""
        match = re.match(rf"^v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?(?:\+{re.escape(self.build)}(\d+))?$",
                         text.strip())
        if not match or match.group(4):
            return None
        major, minor, patch, _, build = match.groups()
        return Version(int(major), int(minor), int(patch), self.first_build if build is None else int(build), self)

    def parse_available(self, text: str) -> list[Version]:
        """One version per line, or a GitHub releases JSON export (tag_name, prerelease, draft)."""
        stripped = text.strip()
        names: list[str] = []
        if stripped.startswith("["):
            try:
                releases = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
            for release in releases:
                if not isinstance(release, dict):
                    raise ValueError("a GitHub releases export is a list of objects with tag_name")
                if release.get("prerelease") or release.get("draft"):
                    continue
                names.append(str(release.get("tag_name") or release.get("name") or ""))
        else:
            names = [line.split("#", 1)[0].strip() for line in stripped.splitlines()]
        return [v for v in (self.parse(n) for n in names if n) if v is not None]


@dataclass(frozen=True, order=True)
class Version:
    """A stable provider release; orders by (major, minor, patch, build)."""

    major: int
    minor: int
    patch: int
    build: int  # the N of +k3sN, +k0s.N
    provider: Provider = field(compare=False, repr=False)

    @property
    def line(self) -> tuple[int, int]:
        return self.major, self.minor

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}.{self.patch}+{self.provider.build}{self.build}"


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("k3s", build="k3s", first_build=1, example="v1.28.2+k3s1"),
    Provider("k0s", build="k0s.", first_build=0, example="v1.34.4+k0s.0"),
)}


def next_versions(current: list[Version], available: list[Version]) -> list[Version]:
    """The next three (or as many as given) versions of one provider, oldest first (pure)."""
    if not current:
        raise ValueError("no current versions given")
    lines = sorted({v.line for v in current})
    newest = max((v.line for v in available), default=None)
    if newest is not None and newest > lines[-1]:
        lines = lines[1:] + [newest]
    pool = list(current) + list(available)
    return [max(v for v in pool if v.line == line) for line in lines]
