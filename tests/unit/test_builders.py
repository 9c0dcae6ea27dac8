"""Pure argv / Dockerfile / file-picking functions of the stages and tools (no Docker needed)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.model import BuiltinOptions, MmdebstrapBase, SquashfsOptions
from tasks.run import run
from tasks.stages import preflight
from tasks.stages.base import mmdebstrap_argv
from tasks.epoch import build_epoch
from tasks.stages.convert import (DIGEST, cache_refs, builtin_initrd_script, builtin_scripts, dockerfile, forget_run_state,
                                  dockerfile_builtin, dockerfile_kairos_init, overlay_touches_initrd,
                                  kairos_init_flags, kairos_release, labels, overlay_files)
from tasks.stages.extract import mksquashfs_argv, mksquashfs_env, pick_boot_file, squashfs_key
from tasks.tools.docker import BuildCli, build_argv, is_local_host, registry_host

K3S = "v1.28.2+k3s1"
K0S = "v1.34.4+k0s.0"
BASE = "sha256:" + "a" * 64
INIT = "sha256:" + "b" * 64
BUILTIN = dict(converter="builtin", kairos_init_image=None)

# --- convert: kairos-init flags and Dockerfile ------------------------------------

FLAG_CASES = [
    # device, trusted_boot, fips, provider version (k3s or k0s) -> flags
    ("generic", False, False, None, ["-m", "generic", "-t", "false", "--version", "v3.1.0"]),
    ("generic", True, False, None, ["-m", "generic", "-t", "true", "--version", "v3.1.0"]),
    ("rpi4", False, False, K3S,
     ["-m", "rpi4", "-t", "false", "-p", "k3s", "--provider-k3s-version", K3S, "--version", "v3.1.0"]),
    ("rpi3", False, True, None, ["-m", "rpi3", "-t", "false", "--fips", "--version", "v3.1.0"]),
    ("generic", True, True, "v1.29.0-rc1+k3s2",
     ["-m", "generic", "-t", "true", "-p", "k3s", "--provider-k3s-version", "v1.29.0-rc1+k3s2", "--fips",
      "--version", "v3.1.0"]),
    ("generic", False, False, K0S,
     ["-m", "generic", "-t", "false", "-p", "k0s", "--provider-k0s-version", K0S, "--version", "v3.1.0"]),
    ("rpi4", True, True, "v1.35.0-rc.1+k0s.0",
     ["-m", "rpi4", "-t", "true", "-p", "k0s", "--provider-k0s-version", "v1.35.0-rc.1+k0s.0", "--fips",
      "--version", "v3.1.0"]),
]


@pytest.mark.parametrize("device, trusted, fips, provider_version, flags", FLAG_CASES)
def test_kairos_init_flags(make_build, device, trusted, fips, provider_version, flags):
    arch = "amd64" if device == "generic" else "arm64"
    b = make_build("standard" if provider_version else "core", provider_version, arch, device,
                   trusted_boot=trusted, fips=fips)
    assert kairos_init_flags(b) == flags


def _run_command(text: str) -> list[str]:
    """The RUN instruction of a Dockerfile, continuation lines joined, split like a shell would."""
    run_line = text[text.index("\nRUN ") + len("\nRUN "):]
    return shlex.split(run_line.replace("\\\n", " "))


@pytest.mark.parametrize("base_image, init_image, base_repo, init_repo", [
    ("ubuntu:24.04", "quay.io/kairos/kairos-init:v4.3.0", "ubuntu", "quay.io/kairos/kairos-init"),
    ("opensuse/leap:15.6", f"quay.io/kairos/kairos-init@{INIT}", "opensuse/leap", "quay.io/kairos/kairos-init"),
    (f"ubuntu:24.04@{BASE}", "127.0.0.1:5000/mirror/kairos-init:v4.3.0", "ubuntu",
     "127.0.0.1:5000/mirror/kairos-init"),
])
@pytest.mark.parametrize("variant, provider_version, arch, device", [
    ("core", None, "amd64", "generic"),
    ("standard", K3S, "arm64", "rpi4"),
    ("standard", K0S, "amd64", "generic"),
])
@pytest.mark.parametrize("overlay", [False, True])
def test_dockerfile_kairos_init(make_build, base_image, init_image, base_repo, init_repo, variant, provider_version,
                                arch, device, overlay):
    b = make_build(variant, provider_version, arch, device, base_image=base_image, kairos_init_image=init_image)
    text = dockerfile_kairos_init(b, BASE, INIT, overlay)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[0] == f"FROM {init_repo}@{INIT} AS kairos-init"
    assert lines[1] == f"FROM {base_repo}@{BASE} AS base-kairos"
    mount = "RUN --mount=type=bind,from=kairos-init,src=/kairos-init,dst=/kairos-init"
    flags = kairos_init_flags(b)
    install, init = (f"{mount} {shlex.join(['/kairos-init', '-l', 'debug', '-s', step, *flags])}"
                     for step in ("install", "init"))
    # upstream's pattern: packages, then the user's changes, then initrd and services
    assert lines[2:] == [install, *(["COPY overlay/ /"] if overlay else []), init]
    assert shlex.split(lines[2])[2:] == ["/kairos-init", "-l", "debug", "-s", "install", *flags]
    if provider_version:
        provider = b.provider
        assert f" -p {provider} --provider-{provider}-version {provider_version} " in lines[2]
        assert f" -p {provider} --provider-{provider}-version {provider_version} " in lines[-1]


@pytest.mark.parametrize("overlay", [None, Path("/srv/overlay")])
def test_dockerfile_dispatch(make_build, overlay):
    init = make_build(overlay=overlay)
    text = dockerfile(init, BASE, None)
    assert text.splitlines()[0] == f"FROM quay.io/kairos/kairos-init@{DIGEST} AS kairos-init"
    assert ("COPY overlay/ /\n" in text) == (overlay is not None)
    builtin = make_build(overlay=overlay, **BUILTIN)
    text = dockerfile(builtin, BASE, None)
    assert text == dockerfile_builtin(builtin, BASE, overlay is not None)
    assert "kairos-init" not in text


INSTALL = ("COPY builtin-install.sh /tmp/builtin-install.sh\n"
           "RUN sh /tmp/builtin-install.sh && rm -f /tmp/builtin-install.sh\n")
INITRD = ("COPY builtin-initrd.sh /tmp/builtin-initrd.sh\n"
          "RUN sh /tmp/builtin-initrd.sh && rm -f /tmp/builtin-initrd.sh\n")
RELEASE = "COPY kairos-release /etc/kairos-release\nCOPY issue /etc/issue\n"


@pytest.mark.parametrize("base_image, overlay, overlay_first, expected", [
    ("ubuntu:24.04", False, False, f"FROM ubuntu@{BASE}\n" + INSTALL + INITRD + RELEASE),
    # the overlay after the initrd: an overlay change reuses the package and initrd layers
    ("debian:12", True, False, f"FROM debian@{BASE}\n" + INSTALL + INITRD + "COPY overlay/ /\n" + RELEASE),
    # an overlay with initrd inputs (dracut/modprobe config, modules, firmware) goes before the initrd
    ("debian:12", True, True, f"FROM debian@{BASE}\n" + INSTALL + "COPY overlay/ /\n" + INITRD + RELEASE),
])
def test_dockerfile_builtin(make_build, base_image, overlay, overlay_first, expected):
    assert dockerfile_builtin(make_build(base_image=base_image, **BUILTIN), BASE, overlay, overlay_first) == expected


@pytest.mark.parametrize("listing, touches", [
    ([], False),
    ([["etc", "dir", "0o755"], ["etc/motd", "file", "0o644"], ["etc/ssh/sshd_config", "file", "0o600"]], False),
    ([["etc/dracut.conf.d", "dir", "0o755"], ["etc/dracut.conf.d/x.conf", "file", "0o644"]], True),
    ([["etc/dracut.conf", "file", "0o644"]], True),
    ([["etc/modprobe.d/blacklist.conf", "file", "0o644"]], True),
    ([["usr/lib/firmware/brcm/x.bin", "file", "0o644"]], True),
    ([["lib/modules", "link", "usr/lib/modules"]], True),
    ([["boot", "dir", "0o755"]], True),
    ([["etc/dracut.conf.bak", "file", "0o644"], ["bootstrap.sh", "file", "0o755"]], False),  # names, not prefixes
    ([["usr/lib/dracutish", "file", "0o644"]], False),
])
def test_overlay_touches_initrd(listing, touches):
    assert overlay_touches_initrd(listing) is touches


def test_dockerfile_puts_an_initrd_overlay_first(make_build, tmp_path):
    (tmp_path / "etc/modprobe.d").mkdir(parents=True)
    (tmp_path / "etc/modprobe.d/x.conf").write_text("blacklist x\n")
    b = make_build(overlay=tmp_path, **BUILTIN)
    listing = overlay_files(tmp_path)[1]
    assert dockerfile(b, BASE, None, listing) == dockerfile_builtin(b, BASE, True, overlay_first=True)
    (tmp_path / "etc/modprobe.d/x.conf").unlink()
    (tmp_path / "etc/modprobe.d").rmdir()
    (tmp_path / "etc/motd").write_text("hi\n")
    assert dockerfile(b, BASE, None, overlay_files(tmp_path)[1]) == dockerfile_builtin(b, BASE, True)


def test_dockerfile_builtin_from_mmdebstrap_seed(make_build):
    b = make_build(base_image=MmdebstrapBase(suite="bookworm"), registry="127.0.0.1:5000/kairos", **BUILTIN)
    first = dockerfile_builtin(b, BASE, False).splitlines()[0]
    assert re.fullmatch(rf"FROM 127\.0\.0\.1:5000/kairos/base-mmdebstrap@{BASE}", first), first


@pytest.mark.parametrize("packages, arch, device, tty, grub", [
    ((), "amd64", "generic", "ttyS0", []),                    # the host's grub builds amd64 ISOs
    (("openssh-server", "vim"), "arm64", "generic", "ttyAMA0", ["grub-efi-arm64-bin"]),  # arm64 ISOs: the image's
    ((), "arm64", "rpi4", "ttyAMA0", []),                     # firmware boot, no grub
])
def test_builtin_scripts_are_valid_shell(make_build, packages, arch, device, tty, grub):
    b = make_build(builtin=BuiltinOptions(packages=packages), arch=arch, device=device, **BUILTIN)
    scripts = builtin_scripts(b)
    assert list(scripts) == ["builtin-install.sh", "builtin-initrd.sh"]
    for text in scripts.values():
        run(["sh", "-n"], feed=[text.encode()])  # syntax check by a real shell
        assert "initramfs-tools" not in text and "kairos-init" not in text
    script, initrd = scripts.values()
    install = next(l for l in script.splitlines() if l.startswith("apt-get install"))
    assert install.split()[4:] == ['"$kernel"', "dracut", "dracut-live", "dracut-network", "zstd", "procps",
                                   "isc-dhcp-client", "curl", "ca-certificates", "systemd-sysv", *grub, *packages]
    assert "export DEBIAN_FRONTEND=noninteractive INITRD=No" in script  # no initrd from the kernel postinst
    assert "dracut --" not in script                                     # the initrd is the next step's
    assert 'dracut --no-hostonly --reproducible --force --kver "$kver" "initrd.img-$kver"' in initrd
    # the same for every build of one epoch, which both scripts export first
    head = f"export SOURCE_DATE_EPOCH={build_epoch(b.flavor)}\n"
    assert "apt-get" not in initrd and initrd == head + builtin_initrd_script()
    assert script.startswith(head + "set -eu\n")
    assert f"getty.target.wants/serial-getty@{tty}.service" in script
    # both steps end by forgetting what the run left (logs, caches, the machine's identity)
    for text in (script, initrd):
        assert text.rstrip().splitlines()[-2:] == forget_run_state()
    assert "/var/log/apt/history.log" in forget_run_state()[0] and "/var/cache/ldconfig/aux-cache" in forget_run_state()[0]


def test_builtin_scripts_stamp_the_flavors_epoch(make_build, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    own = builtin_scripts(make_build(source_date_epoch=1234, **BUILTIN))
    assert all(text.startswith("export SOURCE_DATE_EPOCH=1234\n") for text in own.values())
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "99")
    assert builtin_scripts(make_build(**BUILTIN))["builtin-install.sh"].startswith("export SOURCE_DATE_EPOCH=99\n")


def test_builtin_script_writes_the_dracut_config_and_module(make_build, tmp_path):
    """Run the file-writing part of the script in a shell: the here-documents land verbatim."""
    from tasks.stages.convert import DRACUT_CONF, DRACUT_MODULE, DRACUT_MODULE_DIR
    script = builtin_initrd_script()
    lines = script.splitlines()
    part = "\n".join(lines[lines.index("mkdir -p /etc/dracut.conf.d " + DRACUT_MODULE_DIR):lines.index("cd /boot")])
    part = part.replace("/etc/", f"{tmp_path}/etc/").replace("/usr/lib/", f"{tmp_path}/usr/lib/")
    run(["sh", "-euc", part])
    assert (tmp_path / "etc/dracut.conf.d/10-kairos.conf").read_text() == DRACUT_CONF
    assert 'hostonly="no"' in DRACUT_CONF and "dmsquash-live livenet network-legacy kairos-live" in DRACUT_CONF
    for name, text in DRACUT_MODULE.items():
        written = tmp_path / DRACUT_MODULE_DIR.lstrip("/") / name
        assert written.read_text() == text and os.access(written, os.X_OK)
    run(["bash", "-n", str(tmp_path / DRACUT_MODULE_DIR.lstrip("/") / "module-setup.sh")])
    assert "mkdir -p /run/overlayfs /run/ovlwork" in DRACUT_MODULE["kairos-overlay-dirs.sh"]


def _release_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        m = re.fullmatch(r'([A-Z_]+)="([^"$`\\]*)"', line)
        assert m, f"not a KEY=\"value\" line: {line!r}"
        assert m[1] not in values
        values[m[1]] = m[2]
    return values


@pytest.mark.parametrize("variant, provider_version, prefix, arch, device", [
    ("core", None, None, "amd64", "generic"),
    ("standard", K3S, "k3s", "arm64", "rpi4"),
    ("standard", K0S, "k0s", "amd64", "generic"),
])
def test_kairos_release(make_build, tmp_path, variant, provider_version, prefix, arch, device):
    b = make_build(variant, provider_version, arch, device, flavor="debian", release="12", **BUILTIN)
    text = kairos_release(b)
    values = _release_values(text)
    expected = {
        "KAIROS_ID": "kairos",
        "KAIROS_NAME": f"kairos-{variant}-debian-12",
        "KAIROS_VERSION": b.version,
        "KAIROS_RELEASE": "v3.1.0",
        "KAIROS_FLAVOR": "debian",
        "KAIROS_FLAVOR_RELEASE": "12",
        "KAIROS_VARIANT": variant,
        "KAIROS_MODEL": device,
        "KAIROS_ARCH": arch,
        "KAIROS_TARGETARCH": arch,
        "KAIROS_ARTIFACT": b.stem,
        "KAIROS_IMAGE_REPO": b.image,
    }
    if provider_version:
        expected |= {"KAIROS_SOFTWARE_VERSION": provider_version, "KAIROS_SOFTWARE_VERSION_PREFIX": prefix}
    converter = values.pop("KAIROS_CONVERTER")
    assert values == expected
    assert converter.startswith("builtin") and "not kairos-init" in converter
    # the file is sourced by shells like os-release: check a real shell reads the same values
    (tmp_path / "kairos-release").write_text(text)
    shown = run(["sh", "-c", '. ./kairos-release && echo "$KAIROS_VERSION|$KAIROS_IMAGE_REPO"'],
                cwd=tmp_path, capture=True)
    assert shown == f"{b.version}|{b.image}"


def test_labels(make_build):
    b = make_build("standard", K3S, "arm64", "rpi4", flavor="ubuntu", release="23.04")
    assert labels(b) == {
        "org.opencontainers.image.title": "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1",
        "org.opencontainers.image.version": "v3.1.0-k3sv1.28.2+k3s1",
        "org.opencontainers.image.ref.name": "quay.io/kairos/ubuntu:23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2-k3s1",
        "org.opencontainers.image.base.name": "ubuntu:24.04",
        "io.kairos.flavor": "ubuntu",
        "io.kairos.flavor-release": "23.04",
        "io.kairos.variant": "standard",
        "io.kairos.arch": "arm64",
        "io.kairos.model": "rpi4",
        "io.kairos.version": "v3.1.0",
        "io.kairos.converter": "kairos-init",
        "io.kairos.software-version": K3S,
        "io.kairos.kairos-init": "quay.io/kairos/kairos-init:v4.3.0",
    }


@pytest.mark.parametrize("variant, provider_version, fields", [
    ("core", None, {}),
    ("standard", K3S, {}),
    ("standard", K0S, {}),
    ("core", None, BUILTIN),
])
def test_labels_have_no_timestamps_and_are_reproducible(make_build, variant, provider_version, fields):
    first = labels(make_build(variant, provider_version, **fields))
    again = labels(make_build(variant, provider_version, **fields))
    assert first == again
    assert not any(word in key for key in first for word in ("created", "date", "time", "build-id"))
    assert not any(re.search(r"\d{4}-\d{2}-\d{2}|\d{2}:\d{2}:\d{2}|\b1[6-9]\d{8}\b", v) for v in first.values())
    assert ("io.kairos.kairos-init" in first) == (fields != BUILTIN)
    assert first.get("io.kairos.software-version") == provider_version


def _tree(root: Path) -> None:
    """An overlay with files, dirs, modes and symlinks (relative, absolute, dangling, to a dir)."""
    for d in ("etc/ssh/sshd_config.d", "usr/local/bin"):
        (root / d).mkdir(parents=True)
    (root / "a.txt").write_text("a\n")
    (root / "etc/motd").write_text("welcome\n")
    (root / "etc/ssh/sshd_config.d/10-kairos.conf").write_text("PermitRootLogin no\n")
    (root / "usr/local/bin/hello").write_text("#!/bin/sh\necho hello\n")
    os.symlink("motd", root / "etc/motd.link")
    os.symlink("/nonexistent/target", root / "usr/local/bin/dangling")
    os.symlink("local", root / "usr/lib")
    for d in ("", "etc", "etc/ssh", "etc/ssh/sshd_config.d", "usr", "usr/local", "usr/local/bin"):
        os.chmod(root / d, 0o755)
    os.chmod(root / "a.txt", 0o644)
    os.chmod(root / "etc/motd", 0o644)
    os.chmod(root / "etc/ssh/sshd_config.d/10-kairos.conf", 0o600)
    os.chmod(root / "usr/local/bin/hello", 0o4755)


def test_overlay_files(tmp_path):
    root = tmp_path / "overlay"
    _tree(root)
    files, listing = overlay_files(root)
    assert files == [str(root / p) for p in ("a.txt", "etc/motd", "etc/ssh/sshd_config.d/10-kairos.conf",
                                             "usr/local/bin/hello")]
    assert listing == [
        ["a.txt", "file", "0o644"],
        ["etc", "dir", "0o755"],
        ["usr", "dir", "0o755"],
        ["etc/motd", "file", "0o644"],
        ["etc/motd.link", "link", "motd"],
        ["etc/ssh", "dir", "0o755"],
        ["etc/ssh/sshd_config.d", "dir", "0o755"],
        ["etc/ssh/sshd_config.d/10-kairos.conf", "file", "0o600"],
        ["usr/lib", "link", "local"],
        ["usr/local", "dir", "0o755"],
        ["usr/local/bin", "dir", "0o755"],
        ["usr/local/bin/dangling", "link", "/nonexistent/target"],
        ["usr/local/bin/hello", "file", "0o4755"],
    ]


@pytest.mark.parametrize("change", ["chmod", "retarget-link", "add-file", "rename"])
def test_overlay_listing_changes_with_modes_links_and_names(tmp_path, change):
    root = tmp_path / "overlay"
    _tree(root)
    before = overlay_files(root)
    if change == "chmod":
        os.chmod(root / "etc/motd", 0o600)
    elif change == "retarget-link":
        os.unlink(root / "etc/motd.link")
        os.symlink("/etc/issue", root / "etc/motd.link")
    elif change == "add-file":
        (root / "etc/new").write_text("")
    else:
        os.rename(root / "a.txt", root / "b.txt")
    assert overlay_files(root) != before


@pytest.mark.parametrize("names", [[f"d{i:02}" for i in range(20)]])
def test_overlay_listing_does_not_depend_on_creation_order(tmp_path, names):
    listings = []
    for order, folder in ((names, "first"), (names[::-1], "second")):
        root = tmp_path / folder
        for name in order:
            (root / name / "sub").mkdir(parents=True)
            (root / name / "sub" / "f").write_text(name)
            (root / name / "g").write_text(name)
        listings.append([entry[:2] for entry in overlay_files(root)[1]])
    assert listings[0] == listings[1]
    assert len(listings[0]) == 4 * len(names)
    visited = [path for path, kind in listings[0] if path.endswith("/sub")]  # directories walked in name order
    assert visited == sorted(visited)


def test_overlay_files_none():
    assert overlay_files(None) == ([], [])


# --- extract: picking the kernel and initrd in /boot ----------------------------------

F = ("file", "")
D = ("dir", "")


def L(target):  # noqa: N802 - reads like the other table markers
    return ("link", target)


BOOT_CASES = [
    # /boot entries -> (kernel, initrd)
    pytest.param({"vmlinuz": L("vmlinuz-6.8.0-45-generic"), "vmlinuz-6.8.0-45-generic": F, "initrd": F,
                  "config-6.8.0-45-generic": F, "grub": D, "grub/grub.cfg": F},
                 "vmlinuz-6.8.0-45-generic", "initrd", id="kairos-layout-symlink"),
    pytest.param({"vmlinuz": F, "initrd": F, "vmlinuz-6.1.0-1-amd64": F, "initrd.img-6.1.0-1-amd64": F},
                 "vmlinuz", "initrd", id="kairos-layout-files-win"),
    pytest.param({"vmlinuz-6.1.0-1-amd64": F, "initrd.img-6.1.0-1-amd64": F, "System.map-6.1.0-1-amd64": F,
                  "config-6.1.0-1-amd64": F},
                 "vmlinuz-6.1.0-1-amd64", "initrd.img-6.1.0-1-amd64", id="debian"),
    pytest.param({"vmlinuz-6.1.0-9-amd64": F, "vmlinuz-6.1.0-10-amd64": F, "vmlinuz-6.1.0-2-amd64": F,
                  "initrd.img-6.1.0-9-amd64": F, "initrd.img-6.1.0-10-amd64": F, "initrd.img-6.1.0-2-amd64": F},
                 "vmlinuz-6.1.0-10-amd64", "initrd.img-6.1.0-10-amd64", id="debian-natural-sort"),
    pytest.param({"vmlinuz-6.9.0-1-arm64": F, "vmlinuz-6.12.0-1-arm64": F,
                  "initrd.img-6.9.0-1-arm64": F, "initrd.img-6.12.0-1-arm64": F},
                 "vmlinuz-6.12.0-1-arm64", "initrd.img-6.12.0-1-arm64", id="debian-6.12-over-6.9"),
    pytest.param({"vmlinuz": L("vmlinuz-6.8.0-45-generic"), "vmlinuz.old": L("vmlinuz-6.8.0-40-generic"),
                  "initrd.img": L("initrd.img-6.8.0-45-generic"), "initrd.img.old": L("initrd.img-6.8.0-40-generic"),
                  "vmlinuz-6.8.0-45-generic": F, "vmlinuz-6.8.0-40-generic": F,
                  "initrd.img-6.8.0-45-generic": F, "initrd.img-6.8.0-40-generic": F},
                 "vmlinuz-6.8.0-45-generic", "initrd.img-6.8.0-45-generic", id="ubuntu-symlinks"),
    pytest.param({"vmlinuz": L("/boot/vmlinuz-x"), "vmlinuz-x": F, "initrd": L("/boot/initrd.img-x"),
                  "initrd.img-x": F},
                 "vmlinuz-x", "initrd.img-x", id="absolute-symlink-into-boot"),
    pytest.param({"vmlinuz": L("/boot/efi/linux-6.1"), "efi": D, "efi/linux-6.1": F, "vmlinuz-9.9": F,
                  "initrd": L("/boot/ramdisk-6.1"), "ramdisk-6.1": F, "initrd.img-9.9": F},
                 "efi/linux-6.1", "ramdisk-6.1", id="absolute-symlink-followed-before-globs"),
    pytest.param({"vmlinuz": L("./vmlinuz-x"), "vmlinuz-x": F, "initrd": L("./initrd.img-x"), "initrd.img-x": F},
                 "vmlinuz-x", "initrd.img-x", id="dot-slash-symlink"),
    pytest.param({"vmlinuz": L("/usr/lib/modules/6.1/vmlinuz"), "vmlinuz-6.1": F,
                  "initrd": L("/usr/lib/modules/6.1/initrd"), "initrd-6.1": F},
                 "vmlinuz-6.1", "initrd-6.1", id="absolute-symlink-outside-boot-falls-back"),
    pytest.param({"vmlinuz": L("vmlinuz-gone"), "vmlinuz-6.1.0-1-amd64": F,
                  "initrd": L("initrd.img-gone"), "initrd.img-6.1.0-1-amd64": F},
                 "vmlinuz-6.1.0-1-amd64", "initrd.img-6.1.0-1-amd64", id="dangling-symlink-falls-back"),
    pytest.param({"vmlinuz": L("grub"), "grub": D, "vmlinuz-6.1": F, "initrd": L("grub"), "initrd.img-6.1": F},
                 "vmlinuz-6.1", "initrd.img-6.1", id="symlink-to-dir-falls-back"),
    pytest.param({"vmlinuz": L("vmlinuz-a"), "vmlinuz-a": L("vmlinuz"), "initrd": L("initrd")},
                 None, None, id="symlink-loop"),
    pytest.param({"Image": F, "initrd": F}, "Image", "initrd", id="arm64-Image"),
    pytest.param({"Image": L("Image-6.6.0"), "Image-6.6.0": F, "initramfs": F}, "Image-6.6.0", "initramfs",
                 id="arm64-Image-symlink"),
    pytest.param({"vmlinuz-6.14.0-63.fc42.x86_64": F, "initramfs-6.14.0-63.fc42.x86_64.img": F,
                  "vmlinuz-0-rescue-0123456789abcdef": F, "initramfs-0-rescue-0123456789abcdef.img": F,
                  "symvers-6.14.0-63.fc42.x86_64.xz": F, "loader": D, "loader/entries": D},
                 "vmlinuz-6.14.0-63.fc42.x86_64", "initramfs-6.14.0-63.fc42.x86_64.img", id="fedora"),
    pytest.param({"vmlinuz-6.9.4-200.fc42.x86_64": F, "vmlinuz-6.14.0-63.fc42.x86_64": F,
                  "initramfs-6.9.4-200.fc42.x86_64.img": F, "initramfs-6.14.0-63.fc42.x86_64.img": F},
                 "vmlinuz-6.14.0-63.fc42.x86_64", "initramfs-6.14.0-63.fc42.x86_64.img", id="fedora-two-kernels"),
    pytest.param({"initrd.img-6.1": F}, None, "initrd.img-6.1", id="initrd-only"),
    pytest.param({"grub": D, "efi": D, "grub/vmlinuz": F}, None, None, id="nothing-but-dirs"),
    pytest.param({}, None, None, id="empty"),
]


@pytest.mark.parametrize("entries, kernel, initrd", BOOT_CASES)
def test_pick_boot_file(entries, kernel, initrd):
    assert pick_boot_file(entries, "kernel") == kernel
    assert pick_boot_file(entries, "initrd") == initrd


@pytest.mark.parametrize("compression, block, arch, extra", [
    ("gzip", "1024k", "amd64", []),
    ("xz", "1024k", "amd64", ["-Xbcj", "x86"]),
    ("xz", "1024k", "arm64", []),
    ("zstd", "256k", "amd64", []),
    ("lz4", "131072", "arm64", []),
])
def test_mksquashfs_argv(compression, block, arch, extra):
    argv = mksquashfs_argv(Path("/state/rootfs"), Path("/out/x.squashfs"),
                           SquashfsOptions(compression=compression, block_size=block), arch)
    assert argv == ["mksquashfs", "/state/rootfs", "/out/x.squashfs", "-noappend", "-no-xattrs", "-reproducible",
                    "-comp", compression, "-b", block, *extra]


@pytest.mark.parametrize("epoch, env", [(0, {"SOURCE_DATE_EPOCH": "0"}),
                                        (1700000000, {"SOURCE_DATE_EPOCH": "1700000000"})])
def test_mksquashfs_env_dates_and_clamps_at_the_epoch(epoch, env):
    assert mksquashfs_env(epoch) == env


def test_squashfs_key_tracks_the_epoch(make_build, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    default, own = make_build(), make_build(source_date_epoch=1650000000)
    assert squashfs_key(default) != squashfs_key(own)
    assert '"SOURCE_DATE_EPOCH": "1650000000"' in squashfs_key(own)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1650000000")
    assert squashfs_key(default) == squashfs_key(own)


# --- base: mmdebstrap -----------------------------------------------------------------

@pytest.mark.parametrize("base, arch, expected", [
    (MmdebstrapBase(suite="bookworm"), "amd64",
     ["mmdebstrap", "--variant=minbase", "--arch=amd64", "--format=tar", "--components=main",
      "bookworm", "/tmp/out.tar", "http://deb.debian.org/debian"]),
    (MmdebstrapBase(suite="trixie", arch="arm64", variant="apt", mirror="http://mirror.example/debian",
                    components=("main", "contrib", "non-free-firmware"), include=("ca-certificates", "vim")),
     "arm64",
     ["mmdebstrap", "--variant=apt", "--arch=arm64", "--format=tar", "--components=main,contrib,non-free-firmware",
      "--include=ca-certificates,vim", "trixie", "/tmp/out.tar", "http://mirror.example/debian"]),
    (MmdebstrapBase(suite="bookworm", include=("systemd",)), "arm64",
     ["mmdebstrap", "--variant=minbase", "--arch=arm64", "--format=tar", "--components=main",
      "--include=systemd", "bookworm", "/tmp/out.tar", "http://deb.debian.org/debian"]),
])
def test_mmdebstrap_argv(base, arch, expected):
    assert mmdebstrap_argv(base, arch, Path("/tmp/out.tar")) == expected


# --- tools/docker ---------------------------------------------------------------------

@pytest.mark.parametrize("cli, platform, label_map, expected", [
    (BuildCli("docker", "buildx"), "linux/amd64", {"b.key": "2", "a.key": "x=y z"},
     ["docker", "buildx", "build", "--load", "--platform", "linux/amd64", "--progress", "plain",
      "--iidfile", "/ctx/iid", "--tag", "quay.io/kairos/ubuntu:24.04-core", "--label", "a.key=x=y z",
      "--label", "b.key=2", "/ctx"]),
    (BuildCli("/usr/bin/docker", "classic"), "linux/arm64", None,
     ["/usr/bin/docker", "build", "--platform", "linux/arm64", "--progress", "plain",
      "--iidfile", "/ctx/iid", "--tag", "quay.io/kairos/ubuntu:24.04-core", "/ctx"]),
    (BuildCli("/usr/bin/docker", "classic"), "linux/amd64", {"z": "1", "m": "2", "a": "3"},
     ["/usr/bin/docker", "build", "--platform", "linux/amd64", "--progress", "plain",
      "--iidfile", "/ctx/iid", "--tag", "quay.io/kairos/ubuntu:24.04-core",
      "--label", "a=3", "--label", "m=2", "--label", "z=1", "/ctx"]),
])
def test_build_argv(cli, platform, label_map, expected):
    assert build_argv(cli, Path("/ctx"), "quay.io/kairos/ubuntu:24.04-core", platform, Path("/ctx/iid"),
                      label_map) == expected


@pytest.mark.parametrize("cache_from, expected", [
    (("own",), ["{image}"]),
    ((), []),
    (("r.io/k/x:cache", "own", "r.io/k/x:cache"), ["r.io/k/x:cache", "{image}"]),
])
def test_cache_refs_name_the_builds_own_tag_for_own(make_build, cache_from, expected):
    b = make_build(cache_from=cache_from)
    assert cache_refs(b) == tuple(e.format(image=b.image) for e in expected)


@pytest.mark.parametrize("cli", [BuildCli("docker", "buildx"), BuildCli("/usr/bin/docker", "classic")])
def test_build_argv_with_registry_cache(cli):
    """The image carries the inline cache, and the build reads that of each cache_from image."""
    argv = build_argv(cli, Path("/ctx"), "r/x:1", "linux/amd64", Path("/ctx/iid"), None, ("r/x:1", "r/y:cache"))
    assert argv[-7:] == ["--build-arg", "BUILDKIT_INLINE_CACHE=1", "--cache-from", "r/x:1",
                         "--cache-from", "r/y:cache", "/ctx"]
    assert "--cache-from" not in build_argv(cli, Path("/ctx"), "r/x:1", "linux/amd64", Path("/ctx/iid"))


@pytest.mark.parametrize("cache_from, tail", [
    (("r/x:1",), ["--build-arg", "BUILDKIT_INLINE_CACHE=1", "--no-cache", "/ctx"]),
    ((), ["--tag", "r/x:1", "--no-cache", "/ctx"]),
])
def test_build_argv_without_cache(cache_from, tail):
    """--no-cache reads no image's cache; the image carries the inline cache as a normal build's would."""
    argv = build_argv(BuildCli("/usr/bin/docker", "classic"), Path("/ctx"), "r/x:1", "linux/amd64",
                      Path("/ctx/iid"), None, cache_from, no_cache=True)
    assert argv[-len(tail):] == tail and "--cache-from" not in argv


@pytest.mark.parametrize("cli, env", [
    (BuildCli("docker", "buildx"), {}),
    (BuildCli("/usr/bin/docker", "classic"), {"DOCKER_BUILDKIT": "1"}),
])
def test_build_cli_env(cli, env):
    assert cli.env() == env


@pytest.mark.parametrize("ref, host", [
    ("ubuntu:24.04", "docker.io"),
    ("ubuntu", "docker.io"),
    ("library/ubuntu", "docker.io"),
    ("opensuse/leap:15.6", "docker.io"),
    ("quay.io/kairos/x:1", "quay.io"),
    ("quay.io/kairos/ubuntu:24.04-core-amd64-generic-v3.1.0", "quay.io"),
    ("127.0.0.1:5000/a/b:1", "127.0.0.1:5000"),
    ("localhost:5000/x", "localhost:5000"),
    ("localhost/x", "localhost"),
    ("ghcr.io/me/os@sha256:" + "c" * 64, "ghcr.io"),
])
def test_registry_host(ref, host):
    assert registry_host(ref) == host


@pytest.mark.parametrize("host, local", [
    ("localhost", True),
    ("localhost:5000", True),
    ("127.0.0.1", True),
    ("127.0.0.1:5000", True),
    ("127.1.2.3:443", True),
    ("[::1]", True),
    ("[::1]:5000", True),
    ("docker.io", False),
    ("quay.io", False),
    ("10.0.0.5:5000", False),
    ("registry.local:5000", False),
    ("localhost.example.com:5000", False),
])
def test_is_local_host(host, local):
    assert is_local_host(host) is local


# --- preflight: what tools the selected builds need ---------------------------------------

@pytest.mark.parametrize("base_image, artifacts, tools", [
    # the native ISO implies kernel, initrd and squashfs
    ("ubuntu:24.04", ("iso",), {"grub-mkrescue", "xorriso", "mformat", "faketime", "mksquashfs", "tar"}),
    ("ubuntu:24.04", ("sbom", "trivy", "sign"), {"syft", "trivy", "cosign"}),
    ("ubuntu:24.04", ("kernel", "squashfs"), {"mksquashfs", "tar"}),
    (MmdebstrapBase(suite="bookworm"), ("kernel",), {"mmdebstrap"}),
    (MmdebstrapBase(suite="bookworm"), ("squashfs",), {"mmdebstrap", "mksquashfs", "tar"}),
])
def test_tools_needed(make_build, base_image, artifacts, tools):
    b = make_build(base_image=base_image, artifacts=artifacts, path=Path("flavors/debian-12.yaml"))
    need = preflight.tools_needed((b,))
    assert set(need) == tools
    if "mmdebstrap" in need:
        assert need["mmdebstrap"].endswith("of debian-12.yaml")


def test_foreign_arch_mmdebstrap_needs_arch_test(make_build, monkeypatch):
    monkeypatch.setattr(preflight.platform, "machine", lambda: "x86_64")
    arm = make_build(base_image=MmdebstrapBase(suite="bookworm"), arch="arm64", artifacts=("kernel",))
    assert preflight.tools_needed((arm,))["arch-test"] == \
        "let mmdebstrap build the arm64 base rootfs on this amd64 host"
    native = make_build(base_image=MmdebstrapBase(suite="bookworm"), artifacts=("kernel",))
    assert "arch-test" not in preflight.tools_needed((native,))


def test_preflight_registries(make_build):
    builds = (make_build(registry="quay.io/kairos"), make_build(arch="arm64", registry="127.0.0.1:5000/kairos"),
              make_build(device="rpi4", arch="arm64", registry="quay.io/other"))
    assert preflight.registries(builds) == ["127.0.0.1:5000", "quay.io"]


def test_stage_modules_import_without_a_daemon():
    """Importing the stages (as doit does when it loads tasks) must not contact Docker."""
    out = subprocess.run([sys.executable, "-c", "import tasks.stages.convert, tasks.stages.extract, tasks.stages.base"],
                         cwd=Path(__file__).resolve().parents[2], env={**os.environ, "DOCKER_HOST": "tcp://0.0.0.0:9"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
