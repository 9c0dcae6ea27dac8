"""AuroraBoot back end: argv of the three upstream commands and output picking (pure)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks.builders.auroraboot import (daemon_socket, iso_argv, netboot_argv, netboot_outputs, pick_output,
                                       raw_argv)
from tasks.run import KairosError, UsageError

AB = "quay.io/kairos/auroraboot:v0.19.4"
IMG = "127.0.0.1:5000/kairos/debian:12-core-amd64-generic-v3.1.0"
PREFIX = ["docker", "run", "--rm", "-v", "/var/run/docker.sock:/var/run/docker.sock", "-v", "/out/x:/output", AB]

ISO_CASES = [
    (None, "/var/run/docker.sock", PREFIX + ["--debug", "build-iso", "--output", "/output/", f"docker:{IMG}"]),
    # a host cloud-config is mounted read-only and passed by its path in the container
    (Path("/srv/cc.yaml"), "/var/run/docker.sock",
     PREFIX[:-1] + ["-v", "/srv/cc.yaml:/cloud-config.yaml:ro", AB, "--debug", "build-iso", "--output", "/output/",
                    "--cloud-config", "/cloud-config.yaml", f"docker:{IMG}"]),
    (None, "/run/user/0/docker.sock",
     ["docker", "run", "--rm", "-v", "/run/user/0/docker.sock:/var/run/docker.sock", "-v", "/out/x:/output", AB,
      "--debug", "build-iso", "--output", "/output/", f"docker:{IMG}"]),
]


@pytest.mark.parametrize("cloud_config, socket, expected", ISO_CASES)
def test_iso_argv(cloud_config, socket, expected):
    assert iso_argv(AB, IMG, Path("/out/x"), cloud_config, socket) == expected


RAW_SETS = ["--set", "disable_http_server=true", "--set", "disable_netboot=true",
            "--set", f"container_image=docker:{IMG}", "--set", "state_dir=/output", "--set", "disk.raw=true"]
PRIV = ["docker", "run", "--rm", "--privileged", "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", "/out/x:/output", AB, "--debug"]


@pytest.mark.parametrize("arch, expected", [
    ("amd64", PRIV + RAW_SETS),
    ("arm64", PRIV + RAW_SETS + ["--set", "arch=arm64"]),
])
def test_raw_argv(arch, expected):
    assert raw_argv(AB, IMG, Path("/out/x"), arch) == expected


def test_netboot_argv():
    argv = netboot_argv(AB, Path("/out/v3.1.0/k.iso"), Path("/out/x"), "k")
    assert argv == ["docker", "run", "--rm", "-v", "/var/run/docker.sock:/var/run/docker.sock",
                    "-v", "/out/x:/output", "-v", "/out/v3.1.0:/input:ro", AB,
                    "--debug", "netboot", "/input/k.iso", "/output", "k"]


def test_netboot_outputs_keep_our_names():
    assert netboot_outputs("kairos-x") == {"kairos-x.squashfs": ".squashfs", "kairos-x-kernel": "-kernel",
                                           "kairos-x-initrd": "-initrd"}


PICK_CASES = [
    # names in the output dir, kind -> picked file (or error text)
    (["kairos-debian-12-core-amd64-generic-v3.1.0.iso", "kairos-debian-12-core-amd64-generic-v3.1.0.iso.sha256"],
     "iso", "kairos-debian-12-core-amd64-generic-v3.1.0.iso"),
    (["iso/kairos.iso", "iso/kairos.iso.sha256", "iso/config.yaml"], "iso", "iso/kairos.iso"),
    (["build/.tmp.iso", "kairos.iso"], "iso", "kairos.iso"),
    (["kairos-ubuntu-24.04.raw", "build/efi.img"], "raw", "kairos-ubuntu-24.04.raw"),
    (["disk.img"], "raw", "disk.img"),
    (["a.iso", "b.iso"], "iso", "several .iso files"),
    (["kairos.iso.sha256", "config.yaml"], "iso", "wrote no .iso file (its output holds: config.yaml, kairos.iso.sha256)"),
    ([], "raw", "wrote no .raw or .img file (its output holds: nothing)"),
]


@pytest.mark.parametrize("names, kind, expected", PICK_CASES)
def test_pick_output(names, kind, expected):
    if expected.endswith((".iso", ".raw", ".img")):
        assert pick_output(names, kind) == expected
    else:
        with pytest.raises(KairosError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            pick_output(names, kind)


@pytest.mark.parametrize("host, expected", [
    (None, "/var/run/docker.sock"),
    ("unix:///run/docker.sock", "/run/docker.sock"),
    ("tcp://10.0.0.1:2376", UsageError),
    ("ssh://build@host", UsageError),
])
def test_daemon_socket(monkeypatch, host, expected):
    if host is None:
        monkeypatch.delenv("DOCKER_HOST", raising=False)
    else:
        monkeypatch.setenv("DOCKER_HOST", host)
    if expected is UsageError:
        with pytest.raises(UsageError, match="needs a Docker daemon on this machine"):
            daemon_socket()
    else:
        assert daemon_socket() == expected
