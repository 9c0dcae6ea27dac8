"""`python -m tasks plan`: in-process via main(), and as a real subprocess on flavors/upstream."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.__main__ import main
from tasks.model import parse_ref

ROOT = Path(__file__).resolve().parents[2]

FLAVOR = {
    "flavor": "ubuntu",
    "release": "23.04",
    "base_image": "ubuntu:23.04",
    "version": "v3.1.0",
    "variants": ["core", "standard"],
    "k3s_versions": ["v1.28.2+k3s1"],
    "arches": ["amd64", "arm64"],
    "devices": ["generic", "rpi4"],
    "kairos_init_image": "quay.io/kairos/kairos-init:v4.3.0",
    "registry": "quay.io/kairos",
    "artifacts": ["iso", "raw", "kernel", "initrd", "trivy", "sign"],
    "sign": {"keyless": True},
}
RPI4_STANDARD = "kairos-ubuntu-23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1"
DROP = object()  # flavor(base, key=DROP) removes the key


def write(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def plan_json(capsys, *args) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return json.loads(out)


def test_plan_json(tmp_path, capsys, monkeypatch):
    write(tmp_path / "flavors", "ubuntu.yaml", FLAVOR)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1712345678")  # no flavor key: the environment's
    plan = plan_json(capsys, "--flavors", str(tmp_path / "flavors"))
    builds = plan["builds"]
    assert {b["source_date_epoch"] for b in builds} == {1712345678}
    assert {b["raw_xz_level"] for b in builds} == {6, None}  # the rpi4 builds' raw images (xz); none for generic
    assert [(b["variant"], b["arch"], b["device"]) for b in builds] == [
        ("core", "amd64", "generic"), ("core", "arm64", "generic"), ("core", "arm64", "rpi4"),
        ("standard", "amd64", "generic"), ("standard", "arm64", "generic"), ("standard", "arm64", "rpi4")]
    record = builds[-1]
    assert record["stem"] == RPI4_STANDARD
    assert record["image"] == "quay.io/kairos/ubuntu:23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2-k3s1"
    assert record["version"] == "v3.1.0-k3sv1.28.2+k3s1"
    assert (record["provider"], record["provider_version"]) == ("k3s", "v1.28.2+k3s1")
    assert (builds[0]["provider"], builds[0]["provider_version"]) == (None, None)
    assert record["base_image"] == "ubuntu:23.04" and record["converter"] == "kairos-init"
    assert record["flavor_file"] == str(tmp_path / "flavors" / "ubuntu.yaml")
    assert record["artifacts"] == {
        "raw": [f"{RPI4_STANDARD}.img", f"{RPI4_STANDARD}.img.sha256"],
        # raw_compression: xz (the default) comes with raw
        "xz": [f"{RPI4_STANDARD}.img.xz", f"{RPI4_STANDARD}.img.xz.sha256"],
        "kernel": [f"{RPI4_STANDARD}-kernel", f"{RPI4_STANDARD}-kernel.sha256"],
        "initrd": [f"{RPI4_STANDARD}-initrd", f"{RPI4_STANDARD}-initrd.sha256"],
        # the native raw and ISO builders are made from the squashfs: implied
        "squashfs": [f"{RPI4_STANDARD}.squashfs", f"{RPI4_STANDARD}.squashfs.sha256"],
        "trivy": [f"{RPI4_STANDARD}-trivy.sarif", f"{RPI4_STANDARD}-trivy.json"],
    }
    generic = builds[0]
    assert list(generic["artifacts"]) == ["iso", "kernel", "initrd", "squashfs", "trivy"]
    assert generic["artifacts"]["iso"][0] == "kairos-ubuntu-23.04-core-amd64-generic-v3.1.0.iso"


def test_plan_text(tmp_path, capsys):
    write(tmp_path / "flavors", "ubuntu.yaml", FLAVOR)
    assert main(["plan", "--flavors", str(tmp_path / "flavors")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1] == "6 build(s)"
    assert RPI4_STANDARD in lines
    assert "  image     quay.io/kairos/ubuntu:23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2-k3s1" in lines
    assert f"  raw       {RPI4_STANDARD}.img" in lines


K0S_FLAVOR = {**FLAVOR, "flavor": "rocky", "release": "9.6", "base_image": "rockylinux:9.6", "version": "v3.5.6",
              "variants": ["standard"], "k3s_versions": DROP, "k0s_versions": ["v1.34.4+k0s.0"],
              "arches": ["amd64"], "devices": ["generic"], "artifacts": ["iso"], "sign": DROP}


def flavor(base: dict, **changes) -> dict:
    return {k: v for k, v in {**base, **changes}.items() if v is not DROP}


def test_python_m_tasks_plan_lists_the_k0s_iso_and_tag(tmp_path):
    write(tmp_path / "flavors", "rocky.yaml", flavor(K0S_FLAVOR))
    proc = _python_m_tasks("plan", "--flavors", str(tmp_path / "flavors"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    stem = "kairos-rocky-9.6-standard-amd64-generic-v3.5.6-k0sv1.34.4+k0s.0"
    assert lines[0] == stem and lines[-1] == "1 build(s)"
    assert f"  iso       {stem}.iso" in lines
    assert "  image     quay.io/kairos/rocky:9.6-standard-amd64-generic-v3.5.6-k0sv1.34.4-k0s.0" in lines


def test_plan_json_with_k3s_and_k0s(tmp_path, capsys):
    """A flavor listing both providers: one standard build per provider version, k3s first."""
    write(tmp_path / "flavors", "hadron.yaml", flavor(
        K0S_FLAVOR, flavor="hadron", release="v0.0.4", version="v4.0.1", variants=["core", "standard"],
        k3s_versions=["v1.33.4+k3s1"], k0s_versions=["v1.33.4+k0s.0", "v1.34.4+k0s.0"]))
    builds = plan_json(capsys, "--flavors", str(tmp_path / "flavors"))["builds"]
    assert [(b["variant"], b["provider"], b["provider_version"], b["version"]) for b in builds] == [
        ("core", None, None, "v4.0.1"),
        ("standard", "k3s", "v1.33.4+k3s1", "v4.0.1-k3sv1.33.4+k3s1"),
        ("standard", "k0s", "v1.33.4+k0s.0", "v4.0.1-k0sv1.33.4+k0s.0"),
        ("standard", "k0s", "v1.34.4+k0s.0", "v4.0.1-k0sv1.34.4+k0s.0")]
    last = builds[-1]
    assert last["stem"] == "kairos-hadron-v0.0.4-standard-amd64-generic-v4.0.1-k0sv1.34.4+k0s.0"
    assert last["artifacts"]["iso"][0] == "kairos-hadron-v0.0.4-standard-amd64-generic-v4.0.1-k0sv1.34.4+k0s.0.iso"
    assert last["image"] == "quay.io/kairos/hadron:v0.0.4-standard-amd64-generic-v4.0.1-k0sv1.34.4-k0s.0"


def test_plan_markdown_names_both_providers(tmp_path, capsys):
    write(tmp_path / "flavors", "rocky.yaml", flavor(K0S_FLAVOR, variants=["core", "standard"],
                                                      k3s_versions=["v1.33.4+k3s1"]))
    assert main(["plan", "--flavors", str(tmp_path / "flavors"), "--markdown"]) == 0
    page = capsys.readouterr().out
    (row,) = [line for line in page.splitlines() if line.startswith("| rocky | 9.6 |")]
    assert "| core, standard (k3s v1.33.4+k3s1; k0s v1.34.4+k0s.0) |" in row
    assert "| `quay.io/kairos/rocky:9.6-standard-amd64-generic-v3.5.6-k0sv1.34.4-k0s.0` | " \
           "`kairos-rocky-9.6-standard-amd64-generic-v3.5.6-k0sv1.34.4+k0s.0.iso`" in page
    assert "| `quay.io/kairos/rocky:9.6-standard-amd64-generic-v3.5.6-k3sv1.33.4-k3s1` | " in page


def test_plan_several_sources_separated_by_pathsep(tmp_path, capsys):
    a = write(tmp_path / "one", "ubuntu.yaml", FLAVOR)
    b = write(tmp_path / "two", "debian.yaml", {**FLAVOR, "flavor": "debian", "release": "12"})
    plan = plan_json(capsys, "--flavors", f"{a.parent}{os.pathsep}{b}")
    assert {r["flavor"] for r in plan["builds"]} == {"ubuntu", "debian"}
    assert len(plan["builds"]) == 12


@pytest.mark.parametrize("count", [1, 2, 4])
def test_plan_shards_cover_the_matrix(tmp_path, capsys, count):
    write(tmp_path / "flavors", "ubuntu.yaml", FLAVOR)
    src = str(tmp_path / "flavors")
    everything = [r["stem"] for r in plan_json(capsys, "--flavors", src)["builds"]]
    parts = [[r["stem"] for r in plan_json(capsys, "--flavors", src, "--shard", f"{i}/{count}")["builds"]]
             for i in range(1, count + 1)]
    assert sorted(s for p in parts for s in p) == sorted(everything)


def test_plan_selects_like_doit_from_the_environment(tmp_path, capsys, monkeypatch):
    """Without --flavors/--shard, KAIROS_FLAVORS and KAIROS_SHARD (what doit builds: a CI job's plan
    step shows that job's builds); the options win."""
    write(tmp_path / "env", "ubuntu.yaml", FLAVOR)
    write(tmp_path / "opt", "debian.yaml", {**FLAVOR, "flavor": "debian", "release": "12"})
    monkeypatch.setenv("KAIROS_FLAVORS", str(tmp_path / "env"))
    assert {r["flavor"] for r in plan_json(capsys)["builds"]} == {"ubuntu"}
    monkeypatch.setenv("KAIROS_SHARD", "2/4")
    assert len(plan_json(capsys)["builds"]) == 2
    assert {r["flavor"] for r in plan_json(capsys, "--flavors", str(tmp_path / "opt"), "--shard", "1/1")["builds"]} \
        == {"debian"}


@pytest.mark.parametrize("files, args, expected", [
    pytest.param({"bad.yaml": {**FLAVOR, "colour": "blue"}}, [], ["bad.yaml:", "colour: unknown key"],
                 id="unknown-key"),
    pytest.param({"bad.yaml": "flavor: [x\n"}, [], ["bad.yaml:2: malformed YAML"], id="malformed"),
    pytest.param({"a.yaml": FLAVOR, "b.yaml": {**FLAVOR, "registry": "127.0.0.1:5000/k"}}, [],
                 ["b.yaml: build kairos-ubuntu-23.04-core-amd64-generic-v3.1.0 is also produced by"],
                 id="duplicate-builds"),
    pytest.param({"ok.yaml": FLAVOR}, ["--shard", "0/2"], ["shard: shard '0/2': need 1 <= I <= N"], id="bad-shard"),
    pytest.param({"ok.yaml": FLAVOR}, ["--shard", "two"], ["shard must look like I/N"], id="shard-syntax"),
    pytest.param({}, [], ["no flavor files (*.yaml) in this directory"], id="empty-dir"),
    pytest.param({"bad.yaml": {**FLAVOR, "raw_compression": "zip"}}, [],
                 [f"bad.yaml:{len(yaml.safe_dump(FLAVOR).splitlines()) + 1}: raw_compression: unknown raw "
                  "compression 'zip' (allowed: xz, none)"],  # the last line of the file
                 id="raw-compression"),
])
def test_plan_reports_problems_without_traceback(tmp_path, capsys, files, args, expected):
    folder = tmp_path / "flavors"
    folder.mkdir()
    for name, data in files.items():
        write(folder, name, data)
    assert main(["plan", "--flavors", str(folder), "--json", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    for text in expected:
        assert any(text in line for line in lines), (text, err)


def test_plan_nonexistent_flavors_path(tmp_path, capsys):
    assert main(["plan", "--flavors", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'nope'}: no such flavor file or directory\n"


def _python_m_tasks(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_python_m_tasks_plan_upstream():
    proc = _python_m_tasks("plan", "--flavors", "flavors/upstream", "--json")
    assert proc.returncode == 0, proc.stderr
    builds = json.loads(proc.stdout)["builds"]
    assert len(builds) == 28
    assert all(b["stem"].startswith("kairos-") for b in builds)
    assert not [b["stem"] for b in builds if b["arch"] == "amd64" and b["device"] in ("rpi3", "rpi4")]
    assert len({b["stem"] for b in builds}) == 28
    assert all("+" not in b["image"] for b in builds)
    assert all(b["flavor_file"].startswith("flavors/upstream/") for b in builds)
    for b in builds:
        assert ("iso" in b["artifacts"]) == (b["device"] == "generic")
        assert ("raw" in b["artifacts"]) == ("xz" in b["artifacts"]) == (b["device"] != "generic")
        assert all(name.startswith(b["stem"]) for names in b["artifacts"].values() for name in names)


@pytest.mark.parametrize("args", [["--help"], ["plan", "--help"]])
def test_python_m_tasks_help(args):
    proc = _python_m_tasks(*args)
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m tasks" in proc.stdout
    assert "plan" in proc.stdout


def test_python_m_tasks_without_command_is_a_usage_error():
    proc = _python_m_tasks()
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "usage:" in proc.stderr


def test_plan_markdown_support_matrix_of_the_shipped_flavors(capsys):
    assert main(["plan", "--flavors", str(Path(__file__).resolve().parents[2] / "flavors" / "upstream"),
                 "--markdown"]) == 0
    page = capsys.readouterr().out
    assert page.startswith("# Image support matrix\n")
    rows = [l for l in page.splitlines() if l.startswith("| ") and "`quay.io/kairos/" in l and " | `" in l
            and l.count("|") == 8]
    assert [r.split(" | ")[0][2:] for r in rows] == ["alpine", "debian", "fedora", "opensuse", "rockylinux",
                                                     "ubuntu"]
    rocky = next(r for r in rows if r.startswith("| rockylinux | 9 |"))
    assert "| amd64, arm64 | generic | `quay.io/kairos/rockylinux` |" in rocky and "raw" not in rocky
    assert "## rockylinux 9" in page
    assert "`quay.io/kairos/rockylinux:9-standard-arm64-generic-v3.1.0-k3sv1.28.2-k3s1` | " in page
    assert "`kairos-rockylinux-9-core-amd64-generic-v3.1.0.iso`" in page
    ubuntu = next(r for r in rows if r.startswith("| ubuntu | 24.04 |"))
    assert "core, standard (k3s v1.28.2+k3s1)" in ubuntu and "generic, rpi4 (arm64)" in ubuntu
    assert "`quay.io/kairos/ubuntu:24.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2-k3s1` | " in page
    assert "`kairos-ubuntu-24.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1.img`" in page
    assert "`kairos-ubuntu-24.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2+k3s1.img.xz`" in page
    assert "amd64-rpi4" not in page


def test_images_lists_tags_and_the_digests_the_state_recorded(tmp_path, monkeypatch, capsys):
    flavors = write(tmp_path / "flavors", "u.yaml", FLAVOR)
    state = tmp_path / "state"
    stem = RPI4_STANDARD
    for kind, ident, value in [("image", stem, "sha256:" + "1" * 64), ("pushed", stem, "sha256:" + "2" * 64),
                               ("carrier", stem, "sha256:" + "3" * 64),
                               ("resolved", "ubuntu-23.04", "sha256:" + "4" * 64)]:
        (state / kind).mkdir(parents=True, exist_ok=True)
        (state / kind / f"{ident}.digest").write_text(value + "\n")
    monkeypatch.setenv("KAIROS_STATE", str(state))
    assert main(["images", "--flavors", str(flavors)]) == 0
    lines = capsys.readouterr().out.splitlines()
    tag = "quay.io/kairos/ubuntu:23.04-standard-arm64-rpi4-v3.1.0-k3sv1.28.2-k3s1"
    assert tag in lines and "sha256:" + "1" * 64 in lines
    assert "quay.io/kairos/ubuntu@sha256:" + "2" * 64 in lines
    assert f"{tag}-img" in lines and "quay.io/kairos/ubuntu@sha256:" + "3" * 64 in lines
    assert len(lines) == len(set(lines))  # each once
    assert "ubuntu:23.04" in lines and "quay.io/kairos/kairos-init:v4.3.0" in lines
    assert f"{parse_ref('ubuntu:23.04')[0]}@sha256:" + "4" * 64 in lines
    # the other builds have no recorded digests: their tags only, and no carrier (no raw)
    assert "quay.io/kairos/ubuntu:23.04-core-amd64-generic-v3.1.0" in lines
    assert "quay.io/kairos/ubuntu:23.04-core-amd64-generic-v3.1.0-img" not in lines
    assert sum(l.startswith("sha256:") for l in lines) == 1


@pytest.mark.parametrize("key_line, problem", [
    ("k0s_versions: [v1.34.4+k0s0]", "k0s_versions[0]: invalid value 'v1.34.4+k0s0': a k0s release such as "
     "v1.34.4+k0s.0, or the word policy (see k0s_policy)"),
    ("k0s_versions: []", "k0s_versions: gives no k0s version; the standard variant needs at least one "
     "(e.g. [v1.34.4+k0s.0])"),
])
def test_python_m_tasks_plan_bad_k0s_versions_exit_2(tmp_path, key_line, problem):
    text = yaml.safe_dump(flavor(K0S_FLAVOR, k0s_versions=DROP), sort_keys=False) + key_line + "\n"
    path = write(tmp_path / "flavors", "rocky.yaml", text)
    proc = _python_m_tasks("plan", "--flavors", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {path}:{len(text.splitlines())}: {problem}\n"


def test_python_m_tasks_plan_k0s_on_a_core_only_flavor_exit_2(tmp_path):
    text = yaml.safe_dump(flavor(K0S_FLAVOR, variants=["core"], k0s_versions=DROP), sort_keys=False)
    path = write(tmp_path / "flavors", "rocky.yaml", text + "k0s_versions: [v1.34.4+k0s.0]\n")
    proc = _python_m_tasks("plan", "--flavors", str(path))
    assert proc.returncode == 2
    assert proc.stderr == (f"error: {path}:{len(text.splitlines()) + 1}: k0s_versions: k0s versions are only used by "
                           "the standard variant, which variants does not list\n")
