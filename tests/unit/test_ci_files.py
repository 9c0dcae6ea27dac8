"""The CI files shipped for users (ci/github-actions.yml, ci/gitlab-ci.yml) and the CI
shell scripts: linted by the real linters (actionlint with shellcheck, shellcheck), and
consistent with the pipeline: every shard 1..N is listed, the cache holds what a
restored run needs, the commands are the pipeline's own, and the KAIROS_* paths are
relative to the project directory."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.matrix import parse_shard

CI = Path(__file__).resolve().parents[2] / "ci"
CACHED = {".state", "outputs", ".registry"}
KAIROS_PATHS = ("KAIROS_STATE", "KAIROS_OUTPUTS", "KAIROS_REGISTRY_DIR")


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
    assert set(job["cache"]["paths"]) == CACHED and "$SHARD" in job["cache"]["key"]
    assert (doc["variables"]["KAIROS_STATE"], doc["variables"]["KAIROS_OUTPUTS"],
            doc["variables"]["KAIROS_REGISTRY_DIR"]) == (".state", "outputs", ".registry")
    assert any(line.startswith('python3 -m doit shard="$SHARD/$SHARDS"') for line in job["script"])
    assert "bash ci/setup.sh" in job["before_script"]
    assert job["artifacts"]["paths"] == ["outputs/"]


def test_kairos_paths_are_relative_to_the_project_directory():
    # $CI_PROJECT_DIR is not the job's directory under gitlab-ci-local's shell executor (an
    # empty cache every run); a relative path means the project directory on every executor
    wf = yaml.safe_load((CI / "github-actions.yml").read_text())
    doc = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    for env in (wf["env"], doc["variables"]):
        for name in KAIROS_PATHS:
            value = str(env[name])
            assert not value.startswith(("/", "$", "~")) and "$" not in value, (name, value)
            assert "github.workspace" not in value and "CI_PROJECT_DIR" not in value, (name, value)
