"""AuroraBoot back end: the real upstream container (quay.io/kairos/auroraboot) builds
the ISO, the raw disk image or the netboot files from the converted image.

Selected per flavor with `builder: auroraboot` (image: `auroraboot_image`). The
container reads the image from the local Docker daemon (`docker:<image>`, the
daemon socket is bind-mounted) and writes into a bind-mounted /output directory.
AuroraBoot names its outputs from the image's /etc/kairos-release, not from our
convention, so each runner lets it write into an empty scratch directory, finds
the one file of the expected kind there (pick_output) and renames it to our name,
then writes our own `<file>.sha256` (bare file name).

Honest limits: this back end needs the AuroraBoot image (quay.io, or loaded into
the daemon beforehand) and a local daemon (bind mounts). On an offline machine
the image pull fails and the task says so; the native builder is what runs there.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath

from ..run import CommandError, KairosError, UsageError, require_tool, run, say
from ..state import atomic_path, scratch_dir, write_checksum

DOCKER_SOCK = "/var/run/docker.sock"
OUTPUT = "/output"
INPUT = "/input"

# kind -> file name endings AuroraBoot writes, most specific first
OUTPUT_SUFFIXES = {"iso": (".iso",), "raw": (".raw", ".img")}
NETBOOT_SUFFIXES = (".squashfs", "-kernel", "-initrd")


def docker_source(image: str) -> str:
    """AuroraBoot's image source for an image in the local daemon (pure)."""
    return f"docker:{image}"


def run_prefix(auroraboot_image: str, out_dir: Path, *, privileged: bool = False, socket: str = DOCKER_SOCK,
               mounts: tuple[tuple[str, str], ...] = ()) -> list[str]:
    """`docker run` of the AuroraBoot container up to its arguments (pure)."""
    argv = ["docker", "run", "--rm"]
    if privileged:
        argv.append("--privileged")
    argv += ["-v", f"{socket}:{DOCKER_SOCK}", "-v", f"{out_dir}:{OUTPUT}"]
    for host, container in mounts:
        argv += ["-v", f"{host}:{container}"]
    argv.append(auroraboot_image)
    return argv


CLOUD_CONFIG = "/cloud-config.yaml"


def iso_argv(auroraboot_image: str, image: str, out_dir: Path, cloud_config: Path | None = None,
             socket: str = DOCKER_SOCK) -> list[str]:
    """ISO: `... --debug build-iso --output /output/ [--cloud-config F] docker:<image>` (pure);
    a cloud-config file on the host is mounted read-only into the container."""
    mounts = ((f"{cloud_config}", f"{CLOUD_CONFIG}:ro"),) if cloud_config else ()
    argv = run_prefix(auroraboot_image, out_dir, socket=socket, mounts=mounts) + [
        "--debug", "build-iso", "--output", OUTPUT + "/"]
    if cloud_config:
        argv += ["--cloud-config", CLOUD_CONFIG]
    argv.append(docker_source(image))
    return argv


def raw_argv(auroraboot_image: str, image: str, out_dir: Path, arch: str, socket: str = DOCKER_SOCK) -> list[str]:
    """Raw disk: privileged container, everything set with `--set key=value` (pure)."""
    argv = run_prefix(auroraboot_image, out_dir, privileged=True, socket=socket) + ["--debug"]
    settings = ["disable_http_server=true", "disable_netboot=true", f"container_image={docker_source(image)}",
                f"state_dir={OUTPUT}", "disk.raw=true"]
    if arch == "arm64":
        settings.append("arch=arm64")
    for setting in settings:
        argv += ["--set", setting]
    return argv


def netboot_argv(auroraboot_image: str, iso: Path, out_dir: Path, prefix: str,
                 socket: str = DOCKER_SOCK) -> list[str]:
    """Netboot files from an ISO: `... netboot /input/<iso> /output <prefix>`; the ISO's
    directory is mounted read-only at /input (pure)."""
    iso = Path(iso)
    argv = run_prefix(auroraboot_image, out_dir, socket=socket, mounts=((f"{iso.parent}", f"{INPUT}:ro"),))
    return argv + ["--debug", "netboot", str(PurePosixPath(INPUT) / iso.name), OUTPUT, prefix]


def pick_output(names: list[str], kind: str) -> str:
    """The one file of ``kind`` among the relative paths AuroraBoot left in its output
    directory (pure). Its name comes from /etc/kairos-release, so we look by ending."""
    for suffix in OUTPUT_SUFFIXES[kind]:
        found = sorted(n for n in names if n.endswith(suffix) and not PurePosixPath(n).name.startswith("."))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise KairosError(f"AuroraBoot wrote several {suffix} files, cannot tell which is the {kind}: "
                              f"{', '.join(found)}")
    listing = ", ".join(sorted(names)) or "nothing"
    raise KairosError(f"AuroraBoot wrote no {' or '.join(OUTPUT_SUFFIXES[kind])} file (its output holds: {listing})")


def netboot_outputs(prefix: str) -> dict[str, str]:
    """File AuroraBoot's netboot writes -> our artifact suffix (pure; same names by construction)."""
    return {prefix + s: s for s in NETBOOT_SUFFIXES}


# --- runners ---------------------------------------------------------------------

def daemon_socket() -> str:
    """The daemon's unix socket on this host (the container bind-mounts it)."""
    host = os.environ.get("DOCKER_HOST", "")
    if not host:
        return DOCKER_SOCK
    if host.startswith("unix://"):
        return host[len("unix://"):]
    raise UsageError(f"builder auroraboot needs a Docker daemon on this machine (it bind-mounts the daemon socket "
                     f"and the output directory), but DOCKER_HOST is {host}; use `builder: native` or a local daemon")


def ensure_auroraboot(ref: str) -> None:
    """Pull the AuroraBoot image, or fail saying clearly that it is the missing piece."""
    require_tool("docker", "run the AuroraBoot container (builder: auroraboot)")
    try:
        run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], what="inspect AuroraBoot image",
            capture=True)
        return
    except CommandError:
        pass
    say(f"    pulling {ref}")
    try:
        run(["docker", "pull", ref], what=f"pull {ref}")
    except CommandError as exc:
        raise UsageError(
            f"cannot pull the AuroraBoot image {ref} (builder: auroraboot needs it; the daemon said: "
            f"{exc.tail.strip().splitlines()[-1] if exc.tail.strip() else f'exit status {exc.status}'}); "
            "make the registry reachable, `docker load` the image, point auroraboot_image at a mirror, "
            "or use `builder: native`") from None


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _move_into_place(src: Path, out: Path) -> None:
    with atomic_path(out) as tmp:
        shutil.move(str(src), str(tmp))
    write_checksum(out)
    say(f"    {out.name}: {out.stat().st_size} bytes")


def _run_container(argv: list[str], what: str) -> None:
    run(argv, what=what, show=True)


def _build_one(auroraboot_image: str, out: Path, kind: str, what: str, source: str, make_argv) -> None:
    """Run AuroraBoot into an empty scratch dir, then rename the one ``kind`` file it wrote to ``out``.
    ``make_argv(scratch, socket)`` builds the container's argv."""
    out = Path(out)
    socket = daemon_socket()
    ensure_auroraboot(auroraboot_image)
    with scratch_dir(out.parent, f"{out.name}.auroraboot") as scratch:
        say(f"    {what} {source}")
        _run_container(make_argv(scratch, socket), f"{what} {out.name}")
        found = pick_output(_listing(scratch), kind)
        say(f"    AuroraBoot wrote {found}; renaming to {out.name}")
        _move_into_place(scratch / found, out)


def build_iso(auroraboot_image: str, image: str, out: Path, cloud_config: Path | None = None) -> None:
    """Run build-iso for ``image`` (a tag in the local daemon) and rename its ISO to ``out``."""
    _build_one(auroraboot_image, out, "iso", "AuroraBoot build-iso", docker_source(image),
               lambda scratch, socket: iso_argv(auroraboot_image, image, scratch, cloud_config, socket=socket))


def build_raw(auroraboot_image: str, image: str, arch: str, out: Path) -> None:
    """Run the raw-disk build for ``image`` and rename its disk image to ``out``."""
    _build_one(auroraboot_image, out, "raw", "AuroraBoot raw disk", f"({arch}) {docker_source(image)}",
               lambda scratch, socket: raw_argv(auroraboot_image, image, scratch, arch, socket=socket))


def netboot(auroraboot_image: str, iso: Path, out_dir: Path, stem: str) -> list[Path]:
    """Extract `<stem>.squashfs`, `<stem>-kernel`, `<stem>-initrd` from ``iso`` into ``out_dir``."""
    out_dir = Path(out_dir)
    socket = daemon_socket()
    ensure_auroraboot(auroraboot_image)
    written = []
    with scratch_dir(out_dir, f"{stem}-netboot.auroraboot") as scratch:
        say(f"    AuroraBoot netboot {Path(iso).name}")
        _run_container(netboot_argv(auroraboot_image, iso, scratch, stem, socket=socket),
                       f"AuroraBoot netboot {Path(iso).name}")
        names = _listing(scratch)
        for produced, suffix in netboot_outputs(stem).items():
            if produced not in names:
                raise KairosError(f"AuroraBoot netboot wrote no {produced} (its output holds: "
                                  f"{', '.join(names) or 'nothing'})")
            target = out_dir / (stem + suffix)
            _move_into_place(scratch / produced, target)
            written.append(target)
    return written
