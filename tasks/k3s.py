"""k3s version policy: every release ships three k3s versions (three minors).

Given the current three and the upstream releases, the next three are:
- no newer minor upstream: each current minor bumped to its latest patch;
- a newer minor upstream: the oldest minor dropped, the newest minor added at
  its latest patch, the other two bumped to their latest patches.
Pre-releases (`-rc1`) and drafts are ignored; `+k3sN` orders numerically
(`+k3s10` after `+k3s9`); a minor with no upstream data keeps its current version.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?(?:\+k3s(\d+))?$")


@dataclass(frozen=True, order=True)
class K3sVersion:
    major: int
    minor: int
    patch: int
    build: int  # the N of +k3sN

    @property
    def line(self) -> tuple[int, int]:
        return self.major, self.minor

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}.{self.patch}+k3s{self.build}"


def parse(text: str) -> K3sVersion | None:
    """A stable k3s version, or None for a pre-release or something else."""
    match = VERSION_RE.match(text.strip())
    if not match or match.group(4):
        return None
    major, minor, patch, _, build = match.groups()
    return K3sVersion(int(major), int(minor), int(patch), int(build or 1))


def parse_available(text: str) -> list[K3sVersion]:
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
    return [v for v in (parse(n) for n in names if n) if v is not None]


def next_versions(current: list[K3sVersion], available: list[K3sVersion]) -> list[K3sVersion]:
    """The next three (or as many as given) k3s versions, oldest first (pure)."""
    if not current:
        raise ValueError("no current k3s versions given")
    lines = sorted({v.line for v in current})
    newest = max((v.line for v in available), default=None)
    if newest is not None and newest > lines[-1]:
        lines = lines[1:] + [newest]
    pool = list(current) + list(available)
    return [max(v for v in pool if v.line == line) for line in lines]
