"""convert: base image -> Kairos image, by a generated Dockerfile built with BuildKit.

Two converters:
- kairos-init: the upstream pattern (kairos-init image as a build stage, bind-mounted
  into `RUN /kairos-init -s install ...`, the overlay, then `RUN ... -s init ...`);
- builtin: for offline use; installs the distro's own kernel, dracut and systemd with
  apt, builds a dracut initrd, and writes /etc/kairos-release. It is not kairos-init and
  says so in /etc/kairos-release (KAIROS_CONVERTER) and in the image labels.

Both put the flavor's overlay after the package step, so an overlay change reuses BuildKit's
cached package layer (the builtin converter also keeps its initrd layer unless the overlay
touches an initrd input, INITRD_INPUTS).

The conversion key: base digest + kairos-init digest (file_dep on their small
digest files) + Dockerfile text, scripts, labels, overlay listing and STAGE_VERSION
(config_changed) + overlay file contents (file_dep).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

from .. import epoch, naming
from ..builders import native_iso
from ..graph import Context, action, task
from ..matrix import Build
from ..model import OWN_TAG
from ..run import run, say
from ..state import Paths, build_context, read_digest, safe_id, write_text_atomic
from ..tools import docker, qemu
from . import resolve

STAGE_VERSION = 1
DIGEST = "{digest}"  # placeholder in Dockerfile templates, filled at build time


def kairos_init_flags(b: Build) -> list[str]:
    """Flags for both kairos-init stages (pure). The variant is implied by -p (`-p k3s
    --provider-k3s-version V`, `-p k0s --provider-k0s-version V`)."""
    flags = ["-m", b.device, "-t", "true" if b.flavor.trusted_boot else "false"]
    if b.provider:
        flags += ["-p", b.provider, f"--provider-{b.provider}-version", b.provider_version]
    if b.flavor.fips:
        flags.append("--fips")
    flags += ["--version", b.flavor.version]
    return flags


def _from_line(ref: str, digest: str, alias: str = "") -> str:
    return f"FROM {naming.pinned(ref, digest)}" + (f" AS {alias}" if alias else "")


def dockerfile_kairos_init(b: Build, base_digest: str, init_digest: str, overlay: bool) -> str:
    """The upstream kairos-init Dockerfile pattern for one build (pure): `-s install` (packages),
    the user's overlay, then `-s init` (initrd, services), so an overlay change reuses the
    cached package layer."""
    flags = " ".join(shlex.quote(f) for f in kairos_init_flags(b))
    mount = "RUN --mount=type=bind,from=kairos-init,src=/kairos-init,dst=/kairos-init"
    lines = [
        _from_line(b.flavor.kairos_init_image, init_digest, "kairos-init"),
        _from_line(b.base.ref, base_digest, "base-kairos"),
        f"{mount} /kairos-init -l debug -s install {flags}",
        *(["COPY overlay/ /"] if overlay else []),
        f"{mount} /kairos-init -l debug -s init {flags}",
    ]
    return "\n".join(lines) + "\n"


# the builtin converter's dracut configuration: a generic initrd that boots the Kairos live
# command lines (root=live:CDLABEL=..., root=live:LABEL=..., root=live:http://...)
DRACUT_CONF = "\n".join([
    'hostonly="no"',
    'hostonly_cmdline="no"',
    'compress="zstd"',
    'add_dracutmodules+=" dmsquash-live livenet network-legacy kairos-live "',
]) + "\n"
# Debian's dracut 059 switches a squashfs holding the root tree to OverlayFS but creates no
# /run/overlayfs and /run/ovlwork before sysroot.mount: a pre-mount hook of ours does
DRACUT_MODULE = {
    "module-setup.sh": "\n".join([
        "#!/bin/bash",
        "# kairos-live: written by the kairos-doit builtin converter",
        "check() { return 0; }",
        "depends() { echo dmsquash-live; return 0; }",
        'install() { inst_hook pre-mount 10 "$moddir/kairos-overlay-dirs.sh"; }',
    ]) + "\n",
    "kairos-overlay-dirs.sh": "#!/bin/sh\nmkdir -p /run/overlayfs /run/ovlwork\n",
}
DRACUT_MODULE_DIR = "/usr/lib/dracut/modules.d/90kairos-live"
TPM2_LIBRARIES = ("libtss2-esys-3.0.2-0", "libtss2-mu0", "libtss2-rc0", "libtss2-tcti-device0")  # systemd dlopens them


def builtin_packages(b: Build) -> list[str]:
    """Debian packages the builtin converter installs besides the kernel (pure): dracut with
    its live and network modules (network-legacy needs pgrep and dhclient, livenet curl), zstd
    for the initrd, CA certificates for https netboot, systemd as init, the grub modules the
    native ISO builder takes from generic images of arches the host has no grub for, for Trusted
    Boot the TPM2 libraries systemd loads to measure boot phases into PCR 11 (systemd-pcrphase),
    and the flavor's own."""
    grub = [native_iso.GRUB_FROM_IMAGE[b.arch]] if b.device == "generic" and b.arch in native_iso.GRUB_FROM_IMAGE \
        else []
    tpm2 = list(TPM2_LIBRARIES) if b.flavor.trusted_boot else []
    return ["dracut", "dracut-live", "dracut-network", "zstd", "procps", "isc-dhcp-client", "curl", "ca-certificates",
            "systemd-sysv", *grub, *tpm2, *b.flavor.builtin.packages]


# overlay paths the initrd is made of (dracut and modprobe configuration, dracut modules, kernel
# modules, firmware, the kernel): an overlay touching one of them is copied in before the initrd is
# built; any other overlay after it, so an overlay change does not rebuild the initrd
INITRD_INPUTS = ("etc/dracut.conf", "etc/dracut.conf.d", "usr/lib/dracut", "lib/dracut", "etc/modprobe.d",
                 "usr/lib/modprobe.d", "lib/modprobe.d", "lib/modules", "usr/lib/modules", "lib/firmware",
                 "usr/lib/firmware", "boot")


def overlay_touches_initrd(listing: list[list]) -> bool:
    """Whether an overlay (its `overlay_files` listing) holds an initrd input (pure)."""
    return any(entry[0] == top or entry[0].startswith(top + "/") for entry in listing for top in INITRD_INPUTS)


def builtin_install_script(b: Build) -> str:
    """First step of the builtin converter, run inside the image (pure): the packages.

    Installs the distro kernel with INITRD=No (neither the kernel's postinst nor dracut's
    trigger builds an initrd; `builtin_initrd_script` does, once) and enables a serial getty
    on the arch's console.

    rpi3/rpi4 builds also get the Raspberry Pi boot firmware (Debian raspi-firmware from
    the non-free-firmware component, Ubuntu linux-firmware-raspi); the raw stage copies it
    from /usr/lib/raspi-firmware (or /usr/lib/linux-firmware-raspi) into the firmware
    partition. raspi-firmware's maintainer scripts refuse to run unless /boot/firmware is a
    mount point or ischroot says "chroot"; an image build is the chroot case, so a temporary
    ischroot that says yes comes first on PATH for that install. /boot/firmware is emptied
    afterwards: in the image it would only duplicate the kernel and initrd.
    """
    rpi_firmware = [
        'case "$ID" in ubuntu) firmware=linux-firmware-raspi ;; *) firmware=raspi-firmware ;; esac',
        'if ! apt-cache show "$firmware" >/dev/null 2>&1; then',
        '  echo "builtin converter: package $firmware not found; for Debian bases add the non-free-firmware '
        'component to the apt sources (mmdebstrap: components: [main, non-free-firmware])" >&2; exit 1',
        "fi",
        "mkdir -p /tmp/kairos-chroot-bin",
        "printf '#!/bin/sh\\nexit 0\\n' > /tmp/kairos-chroot-bin/ischroot",
        "chmod 755 /tmp/kairos-chroot-bin/ischroot",
        'PATH="/tmp/kairos-chroot-bin:$PATH" apt-get install -y --no-install-recommends "$firmware"',
        "rm -rf /tmp/kairos-chroot-bin",
        "if [ -d /boot/firmware ]; then find /boot/firmware -mindepth 1 -delete; fi",
    ] if b.device in ("rpi3", "rpi4") else []
    tty = qemu.SERIAL[b.arch]  # a getty where the boot stage watches (the kernel console gets one anyway)
    return "\n".join([
        "set -eu",
        "if ! command -v apt-get >/dev/null 2>&1; then",
        "  echo 'builtin converter: apt-get not found; it supports Debian and Ubuntu bases only' >&2; exit 1",
        "fi",
        ". /etc/os-release",
        'case "$ID" in ubuntu) kernel=linux-image-generic ;; *) kernel="linux-image-$(dpkg --print-architecture)" ;; esac',
        "export DEBIAN_FRONTEND=noninteractive INITRD=No",
        "apt-get update",
        f'apt-get install -y --no-install-recommends "$kernel" {" ".join(builtin_packages(b))}',
        *rpi_firmware,
        "apt-get clean",
        "rm -rf /var/lib/apt/lists/*",
        "mkdir -p /etc/systemd/system/getty.target.wants",
        f"ln -sf /lib/systemd/system/serial-getty@.service /etc/systemd/system/getty.target.wants/serial-getty@{tty}.service",
        # the emptied /etc/machine-id (forget_run_state) makes every boot a first boot, when
        # systemd-firstboot would wait on the console for a locale, time zone and root password
        "ln -sf /dev/null /etc/systemd/system/systemd-firstboot.service",
        *forget_run_state(),
    ]) + "\n"


def builtin_initrd_script() -> str:
    """Second step of the builtin converter (pure): one generic dracut initrd (`--no-hostonly`; a
    `docker build` RUN has /proc and /dev mounted, which dracut needs; `--reproducible`: sorted
    cpio entries dated SOURCE_DATE_EPOCH) that understands the Kairos live command lines, and the
    /boot/vmlinuz and /boot/initrd links."""
    module = []
    for name, text in DRACUT_MODULE.items():
        module += [f"cat > {DRACUT_MODULE_DIR}/{name} <<'KAIROS_EOF'", text.rstrip("\n"), "KAIROS_EOF",
                   f"chmod 755 {DRACUT_MODULE_DIR}/{name}"]
    return "\n".join([
        "set -eu",
        "mkdir -p /etc/dracut.conf.d " + DRACUT_MODULE_DIR,
        "cat > /etc/dracut.conf.d/10-kairos.conf <<'KAIROS_EOF'", DRACUT_CONF.rstrip("\n"), "KAIROS_EOF",
        *module,
        "cd /boot",
        "k=$(ls -1 vmlinuz-* | sort -V | tail -n 1)",
        'kver="${k#vmlinuz-}"',
        'rm -f "initrd.img-$kver"',
        'dracut --no-hostonly --reproducible --force --kver "$kver" "initrd.img-$kver"',
        'chmod 0644 "initrd.img-$kver"',
        'ln -sf "$k" vmlinuz',
        'ln -sf "initrd.img-$kver" initrd',
        'test -s "initrd.img-$kver"',
        *forget_run_state(),
    ]) + "\n"


BUILTIN_STEPS = {"install": "builtin-install.sh", "initrd": "builtin-initrd.sh"}  # step -> file in the context

# what a package installation leaves that depends on the run, not on the packages (reproducible
# builds): logs with times, caches with times or hash seeds, backups of the previous state, and
# the host identity (an empty /etc/machine-id: systemd makes one at each boot, as in upstream images)
RUN_STATE = ("/var/log/dpkg.log", "/var/log/alternatives.log", "/var/log/apt/history.log", "/var/log/apt/term.log",
             "/var/log/apt/eipp.log.xz", "/var/cache/ldconfig/aux-cache", "/var/lib/dpkg/status-old",
             "/var/lib/dpkg/diversions-old", "/var/lib/dpkg/statoverride-old", "/var/cache/debconf/config.dat-old",
             "/var/cache/debconf/templates.dat-old", "/var/cache/debconf/passwords.dat-old",
             "/var/lib/dbus/machine-id", "/var/lib/systemd/random-seed", "/etc/passwd-", "/etc/group-",
             "/etc/shadow-", "/etc/gshadow-", "/etc/subuid-", "/etc/subgid-")


def forget_run_state() -> list[str]:
    """Shell lines removing RUN_STATE and emptying /etc/machine-id (pure)."""
    return ["rm -f " + " ".join(RUN_STATE), "if [ -e /etc/machine-id ]; then : > /etc/machine-id; fi"]


def builtin_scripts(b: Build) -> dict[str, str]:
    """The builtin converter's scripts by build-context file name (pure). Each starts by exporting
    the build's SOURCE_DATE_EPOCH: dracut, useradd and the other tools that honour it stamp that
    time instead of the clock's."""
    head = f"export {epoch.NAME}={epoch.build_epoch(b.flavor)}\n"
    return {BUILTIN_STEPS["install"]: head + builtin_install_script(b),
            BUILTIN_STEPS["initrd"]: head + builtin_initrd_script()}


def issue_text(b: Build) -> str:
    """/etc/issue of builtin images (pure): the console names the build that booted."""
    return f"Kairos {b.stem} (\\l)\n\n"


def kairos_release(b: Build) -> str:
    """/etc/kairos-release written by the builtin converter (pure)."""
    f = b.flavor
    values = {
        "KAIROS_ID": "kairos",
        "KAIROS_NAME": f"kairos-{b.variant}-{f.flavor}-{f.release}",
        "KAIROS_VERSION": b.version,
        "KAIROS_RELEASE": f.version,
        "KAIROS_FLAVOR": f.flavor,
        "KAIROS_FLAVOR_RELEASE": f.release,
        "KAIROS_VARIANT": b.variant,
        "KAIROS_MODEL": b.device,
        "KAIROS_ARCH": b.arch,
        "KAIROS_TARGETARCH": b.arch,
        "KAIROS_ARTIFACT": b.stem,
        "KAIROS_IMAGE_REPO": b.image,
        "KAIROS_CONVERTER": "builtin (kairos-doit offline converter, not kairos-init)",
    }
    if b.provider:
        values["KAIROS_SOFTWARE_VERSION"] = b.provider_version
        values["KAIROS_SOFTWARE_VERSION_PREFIX"] = b.provider
    return "".join(f'{k}="{v}"\n' for k, v in values.items())


def dockerfile_builtin(b: Build, base_digest: str, overlay: bool, overlay_first: bool = False) -> str:
    """The builtin converter's Dockerfile (pure): packages, then the initrd, then the overlay, so
    an overlay change reuses both cached layers; an overlay holding initrd inputs
    (``overlay_first``, see INITRD_INPUTS) goes before the initrd instead."""
    def step(name: str) -> list[str]:
        script = BUILTIN_STEPS[name]
        return [f"COPY {script} /tmp/{script}", f"RUN sh /tmp/{script} && rm -f /tmp/{script}"]
    copy = ["COPY overlay/ /"] if overlay else []
    lines = [_from_line(b.base.ref, base_digest), *step("install"),
             *(copy + step("initrd") if overlay_first else step("initrd") + copy),
             "COPY kairos-release /etc/kairos-release",
             "COPY issue /etc/issue"]
    return "\n".join(lines) + "\n"


def dockerfile(b: Build, base_digest: str, init_digest: str | None, listing: list[list] = ()) -> str:
    """The Dockerfile of ``b``'s converter; ``listing`` is its overlay's (`overlay_files`)."""
    overlay = b.flavor.overlay is not None
    if b.flavor.converter == "kairos-init":
        return dockerfile_kairos_init(b, base_digest, init_digest or DIGEST, overlay)
    return dockerfile_builtin(b, base_digest, overlay, overlay_touches_initrd(list(listing)))


def labels(b: Build) -> dict[str, str]:
    """OCI and Kairos labels of the converted image (pure, no timestamps: reproducible key)."""
    f = b.flavor
    out = {
        "org.opencontainers.image.title": b.stem,
        "org.opencontainers.image.version": b.version,
        "org.opencontainers.image.ref.name": b.image,
        "org.opencontainers.image.base.name": b.base.ref,
        "io.kairos.flavor": f.flavor,
        "io.kairos.flavor-release": f.release,
        "io.kairos.variant": b.variant,
        "io.kairos.arch": b.arch,
        "io.kairos.model": b.device,
        "io.kairos.version": f.version,
        "io.kairos.converter": f.converter,
    }
    if b.provider:
        out["io.kairos.software-version"] = b.provider_version
    if f.kairos_init_image:
        out["io.kairos.kairos-init"] = f.kairos_init_image
    return out


def overlay_files(overlay: Path | None) -> tuple[list[str], list[list]]:
    """(regular files for file_dep, listing with modes and link targets for the key)."""
    if overlay is None:
        return [], []
    files, listing = [], []
    for top, dirs, names in os.walk(overlay):
        dirs.sort()
        for name in sorted(dirs + names):
            path = Path(top) / name
            st = path.lstat()
            rel = str(path.relative_to(overlay))
            if path.is_symlink():
                listing.append([rel, "link", os.readlink(path)])
            elif path.is_dir():
                listing.append([rel, "dir", oct(st.st_mode & 0o7777)])
            else:
                listing.append([rel, "file", oct(st.st_mode & 0o7777)])
                files.append(str(path))
    return files, listing


def init_ident(b: Build) -> str | None:
    return safe_id(b.flavor.kairos_init_image) if b.flavor.kairos_init_image else None



def cache_refs(b: Build) -> tuple[str, ...]:
    """The images whose inline cache the conversion reuses (pure): `cache_from`, `own` being the
    build's own tag (what its last push left in the registry)."""
    return tuple(dict.fromkeys(b.image if ref == OWN_TAG else ref for ref in b.flavor.cache_from))


NO_CACHE = "KAIROS_NO_CACHE"  # 1: conversions read no build cache (rebuild-check's clean builds)


def no_cache() -> bool:
    """Whether the environment asks for conversions without any build cache (KAIROS_NO_CACHE=1).
    Not part of the task key: a build without cache must give what a cached one gives."""
    return os.environ.get(NO_CACHE, "") == "1"


def convert(paths: Paths, b: Build) -> None:
    base_digest = read_digest(paths.pulled(b.base.ident, b.arch))
    resolve.ensure_local(b.base.ref, base_digest, b.arch)
    init_digest = None
    if b.flavor.converter == "kairos-init":
        ident = init_ident(b)
        init_digest = read_digest(paths.pulled(ident, b.arch))
        resolve.ensure_local(b.flavor.kairos_init_image, init_digest, b.arch)

    with build_context(paths, b.stem, keep=True) as ctx_dir:  # kept: the Dockerfile that was built
        (ctx_dir / "Dockerfile").write_text(dockerfile(b, base_digest, init_digest, overlay_files(b.flavor.overlay)[1]))
        if b.flavor.overlay is not None:
            shutil.copytree(b.flavor.overlay, ctx_dir / "overlay", symlinks=True)
        if b.flavor.converter == "builtin":
            for name, text in builtin_scripts(b).items():
                (ctx_dir / name).write_text(text)
            (ctx_dir / "kairos-release").write_text(kairos_release(b))
            (ctx_dir / "issue").write_text(issue_text(b))
        cli = docker.find_build_cli()
        iid = ctx_dir / "iid"
        all_labels = dict(labels(b), **{"org.opencontainers.image.base.digest": base_digest})
        say(f"    docker build ({b.flavor.converter}, {b.platform}) -> {b.image}")
        cache, fresh = cache_refs(b), no_cache()
        if fresh:
            say(f"    {NO_CACHE}=1: every step runs again (docker build --no-cache)")
        elif cache:
            say(f"    build cache from the registry: {', '.join(cache)}")
        run(docker.build_argv(cli, ctx_dir, b.image, b.platform, iid, all_labels, cache, no_cache=fresh),
            env=cli.env(), show=True, what=f"convert {b.stem}")
        image = docker.read_iidfile(iid)
    write_text_atomic(paths.image_id(b), image + "\n")
    say(f"    {b.image} = {image}")


def tasks(ctx: Context):
    for b in ctx.builds:
        files, listing = overlay_files(b.flavor.overlay)
        deps = [ctx.paths.pulled(b.base.ident, b.arch)]
        if b.flavor.converter == "kairos-init":
            deps.append(ctx.paths.pulled(init_ident(b), b.arch))
        key = json.dumps({
            "dockerfile": dockerfile(b, DIGEST, DIGEST, listing),
            "scripts": builtin_scripts(b) if b.flavor.converter == "builtin" else {},
            "release": kairos_release(b) if b.flavor.converter == "builtin" else "",
            "issue": issue_text(b) if b.flavor.converter == "builtin" else "",
            "labels": labels(b), "platform": b.platform, "tag": b.image,
            "overlay": listing, "stage": STAGE_VERSION,
            "inline_cache": bool(b.flavor.cache_from),  # in the image config: another image
        }, sort_keys=True)
        yield task(b.stem, f"convert {b.base.ref} ({b.platform}) with {b.flavor.converter} into {b.image}",
                   action(convert, ctx.paths, b), file_dep=deps + files, targets=[ctx.paths.image_id(b)], key=key)
