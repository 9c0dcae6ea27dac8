"""preflight: check daemon, tools and registries before any work starts."""
from __future__ import annotations

import platform

from ..graph import Context, action
from ..kinds import KINDS
from ..needs import ARM64_BINFMT
from ..matrix import Build
from ..run import UsageError, require_tool
from ..tools import docker


def host_arch() -> str:
    """This machine's architecture in Debian/OCI terms."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def tools_needed(builds: tuple[Build, ...]) -> dict[str, str]:
    """Program -> what it is needed for, for the selected builds (pure)."""
    need: dict[str, str] = {}
    for b in builds:
        if b.base.mmdebstrap is not None:
            need["mmdebstrap"] = f"build the offline base rootfs of {b.flavor.path.name}"
            if b.arch != host_arch():
                need["arch-test"] = f"let mmdebstrap build the {b.arch} base rootfs on this {host_arch()} host"
        if b.arch == "arm64" and host_arch() != "arm64":
            need[ARM64_BINFMT] = f"run the arm64 image's programs on this {host_arch()} host (binfmt_misc)"
        for kind in b.kinds:
            need.update(KINDS[kind].tools_for(b))
    return need


def registries(builds: tuple[Build, ...]) -> list[str]:
    """Registry hosts images are pushed to (and offline bases are seeded in)."""
    return sorted({docker.registry_host(b.image) for b in builds})


def check(builds: tuple[Build, ...]) -> None:
    """Raise one UsageError listing every problem found (one per line)."""
    checks = [docker.client, docker.find_build_cli]
    checks += [lambda t=tool, p=purpose: require_tool(t, p) for tool, purpose in tools_needed(builds).items()]
    checks += [lambda h=host: docker.check_registry(h) for host in registries(builds)]
    problems = []
    for check_one in checks:
        try:
            check_one()
        except UsageError as exc:
            problems.append(str(exc))
    if problems:
        raise UsageError("\n".join(problems))


def task(ctx: Context) -> dict:
    return {
        "actions": [action(check, ctx.builds)],
        "uptodate": [False],
    }
