"""The CI files shipped for users (ci/github-actions.yml, ci/gitlab-ci.yml) and the CI
shell scripts: linted by the real linters (actionlint with shellcheck, shellcheck), and
consistent with the pipeline: every shard 1..N is listed, the cache holds what a
restored run needs, the commands are the pipeline's own, the KAIROS_* paths are relative
to the project directory, and the go tools come at the project's pins from pinned
installers or a cache keyed by tool and version, with nothing the build does not need."""
from __future__ import annotations

import re
import shutil
import string
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.matrix import parse_shard
from tasks.needs import GO_TOOLS

CI = Path(__file__).resolve().parents[2] / "ci"
CACHED = {".state", "outputs", ".registry"}
KAIROS_PATHS = ("KAIROS_STATE", "KAIROS_OUTPUTS", "KAIROS_REGISTRY_DIR")
NOT_FOR_BUILDS = ("actionlint", "shellcheck")  # lint this project; users' build jobs never need them
EXACT = re.compile(r"v\d+\.\d+\.\d+")
INSTALLERS = {"cosign": "sigstore/cosign-installer", "grype": "anchore/scan-action/download-grype"}


def project_pins() -> dict[str, str]:
    """The go tools' pinned versions, {name: version}, as the project installs them
    (tasks/needs.py GO_TOOLS, which ci/setup.sh installs from)."""
    pins = {name: tool.version for name, tool in GO_TOOLS.items()}
    assert {"cosign", "grype"} <= set(pins), pins
    return pins


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run bash ci/setup.sh"
    return path


def test_github_workflow_passes_actionlint_with_shellcheck():
    tool("shellcheck")  # actionlint runs shellcheck on every `run:` script when it is on PATH
    proc = subprocess.run([tool("actionlint"), str(CI / "github-actions.yml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ["setup.sh", "reproduce.sh"])
def test_ci_scripts_pass_shellcheck(script):
    proc = subprocess.run([tool("shellcheck"), str(CI / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_github_workflow_fans_out_over_every_shard_and_caches_the_state():
    wf = yaml.safe_load((CI / "github-actions.yml").read_text())
    count = int(wf["env"]["SHARDS"])
    job = wf["jobs"]["build"]
    shards = job["strategy"]["matrix"]["shard"]
    assert shards == list(range(1, count + 1))
    assert all(parse_shard(f"{s}/{count}") == (s, count) for s in shards)
    steps = {s.get("name", s.get("uses")): s for s in job["steps"]}
    restore = steps["Restore the pipeline cache (state, outputs, registry storage)"]["with"]
    save = steps["Save the pipeline cache"]["with"]
    assert set(restore["path"].split()) == set(save["path"].split()) == CACHED
    assert save["key"] == restore["key"] and restore["restore-keys"] in restore["key"]
    assert (wf["env"]["KAIROS_STATE"], wf["env"]["KAIROS_OUTPUTS"], wf["env"]["KAIROS_REGISTRY_DIR"]) == (
        ".state", "outputs", ".registry")
    run = steps[next(n for n in steps if str(n).startswith("Build shard"))]["run"]
    assert "python -m doit shard=" in run and "$SHARDS" in run
    assert steps["Save the pipeline cache"]["if"] == "always()"


def test_gitlab_pipeline_fans_out_over_every_shard_and_caches_the_state():
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    count = int(doc["variables"]["SHARDS"])
    job = doc["kairos"]
    (entry,) = job["parallel"]["matrix"]
    assert [int(s) for s in entry["SHARD"]] == list(range(1, count + 1))
    (cache,) = [c for c in job["cache"] if "$SHARD" in c["key"]]
    assert set(cache["paths"]) == CACHED and cache["when"] == "always"
    assert (doc["variables"]["KAIROS_STATE"], doc["variables"]["KAIROS_OUTPUTS"],
            doc["variables"]["KAIROS_REGISTRY_DIR"]) == (".state", "outputs", ".registry")
    assert any(line.startswith('python3 -m doit shard="$SHARD/$SHARDS"') for line in job["script"])
    assert "bash ci/setup.sh" in job["before_script"]
    assert job["artifacts"]["paths"] == ["outputs/"]


def github_steps() -> tuple[dict, list[dict]]:
    wf = yaml.safe_load((CI / "github-actions.yml").read_text())
    return wf, wf["jobs"]["build"]["steps"]


def gitlab_job() -> tuple[dict, dict]:
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    return doc, doc["kairos"]


def test_kairos_paths_are_relative_to_the_project_directory():
    # $CI_PROJECT_DIR is not the job's directory under gitlab-ci-local's shell executor (an
    # empty cache every run); a relative path means the project directory on every executor
    wf, _ = github_steps()
    doc, _ = gitlab_job()
    for env in (wf["env"], doc["variables"]):
        for name in KAIROS_PATHS:
            value = str(env[name])
            assert not value.startswith(("/", "$", "~")) and "$" not in value, (name, value)
            assert "github.workspace" not in value and "CI_PROJECT_DIR" not in value, (name, value)


def test_github_workflow_installs_the_project_pins_with_pinned_installers():
    wf, steps = github_steps()
    pins = project_pins()
    assert wf["env"]["COSIGN_VERSION"] == pins["cosign"] and wf["env"]["GRYPE_VERSION"] == pins["grype"]
    by_action = {s["uses"].split("@")[0]: s for s in steps if "uses" in s}
    cosign, grype = by_action[INSTALLERS["cosign"]], by_action[INSTALLERS["grype"]]
    assert cosign["with"]["cosign-release"] == "${{ env.COSIGN_VERSION }}"
    assert grype["with"]["grype-version"] == "${{ env.GRYPE_VERSION }}"
    for step in (cosign, grype):
        assert EXACT.fullmatch(step["uses"].split("@")[1]), step["uses"]  # a release tag, not a branch
    # each only when the flavors need it; Go only for a tool no installer covers and not cached
    needs = next(s for s in steps if s.get("id") == "tools")
    assert "python -m tasks needs" in needs["run"] and "pip install" in needs["run"]
    assert cosign["if"] == "steps.tools.outputs.cosign != ''"
    assert grype["if"] == "steps.tools.outputs.grype != ''"
    setup_go = by_action["actions/setup-go"]
    assert "steps.tools.outputs.build != ''" in setup_go["if"] and "cache-hit" in setup_go["if"]
    gotools = next(s for s in steps if s.get("id") == "gotools")
    assert "steps.tools.outputs.build-key" in gotools["with"]["key"]
    # the tool steps come before ci/setup.sh, which then finds them on PATH; root sees that PATH
    names = [s.get("name", s.get("uses")) for s in steps]
    setup = names.index("Set up the machine")
    assert max(steps.index(s) for s in (needs, cosign, grype, setup_go, gotools)) < setup
    assert steps[setup]["run"].startswith('sudo -E env "PATH=$PATH"')


def test_gitlab_pipeline_caches_the_go_tools_per_tool_and_version():
    doc, job = gitlab_job()
    pins = project_pins()
    variables = doc["variables"]
    assert variables["COSIGN_VERSION"] == pins["cosign"] and variables["GRYPE_VERSION"] == pins["grype"]
    (tools,) = [c for c in job["cache"] if c["paths"] == [".tools/bin"]]
    key = string.Template(tools["key"]).substitute(variables)
    assert key == f"tools-cosign-{pins['cosign']}-grype-{pins['grype']}"
    # GOBIN and PATH point into the cached directory before ci/setup.sh, which builds what is missing
    before = job["before_script"]
    gobin = next(i for i, line in enumerate(before) if 'GOBIN="$PWD/.tools/bin"' in line)
    assert 'PATH="$PWD/.tools/bin:$PATH"' in before[gobin]
    assert gobin < before.index("bash ci/setup.sh")
    assert "go" in doc["default"]["image"]  # the toolchain for that fallback build


def test_gitlab_before_script_suits_parallel_jobs_on_one_shell_runner():
    # gitlab-ci-local's shell executor (tests/integration/test_gitlab_ci.py) runs the four shard jobs at
    # once on one machine: apt only when something is missing (apt's lock), each job its own venv
    _, job = gitlab_job()
    before = job["before_script"]
    (apt,) = [line for line in before if "apt-get" in line]
    assert apt.index("||") < apt.index("apt-get update"), apt
    (venv,) = [line for line in before if "-m venv" in line]
    assert venv.startswith("python3 -m venv .venv ") and 'PATH="$PWD/.venv/bin:$PATH"' in venv, venv
    assert before.index(venv) < before.index("bash ci/setup.sh")


def test_build_jobs_install_nothing_the_build_does_not_need():
    _, steps = github_steps()
    _, job = gitlab_job()
    texts = [yaml.safe_dump(s) for s in steps] + job["before_script"] + job["script"]
    for text in texts:
        for tool in NOT_FOR_BUILDS:
            assert tool not in text, (tool, text)
        assert "setup.sh --all" not in text, text  # --all is the test suite's set


def test_installers_and_versions_are_pinned_exactly():
    wf, steps = github_steps()
    doc, _ = gitlab_job()
    for step in steps:
        if "uses" in step:
            ref = step["uses"].split("@")[1]
            assert ref not in ("main", "master", "latest", "HEAD"), step["uses"]
    for text in (CI / "github-actions.yml").read_text(), (CI / "gitlab-ci.yml").read_text():
        assert not re.search(r"@(main|master|latest)\b", text)
    for version in (wf["env"]["COSIGN_VERSION"], wf["env"]["GRYPE_VERSION"],
                    doc["variables"]["COSIGN_VERSION"], doc["variables"]["GRYPE_VERSION"]):
        assert EXACT.fullmatch(version), version
