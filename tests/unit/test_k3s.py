"""k3s version policy: tables incl. the worked example of the release process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import k3s

ROOT = Path(__file__).resolve().parents[2]


def vs(*texts):
    return [k3s.parse(t) for t in texts]


@pytest.mark.parametrize("current, available, expected", [
    # the worked example: a newer minor exists
    (("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"),
     ("v1.30.0+k3s1", "v1.27.4+k3s1", "v1.28.3+k3s1", "v1.29.2+k3s1"),
     ("v1.28.3+k3s1", "v1.29.2+k3s1", "v1.30.0+k3s1")),
    # no new minor: bump each to its latest patch
    (("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"),
     ("v1.27.4+k3s1", "v1.27.5+k3s1", "v1.29.3+k3s1"),
     ("v1.27.5+k3s1", "v1.28.2+k3s1", "v1.29.3+k3s1")),  # 1.28 has no patch data: kept
    # +k3sN orders numerically
    (("v1.28.2+k3s1", "v1.29.1+k3s1", "v1.30.0+k3s1"),
     ("v1.30.0+k3s9", "v1.30.0+k3s10", "v1.29.1+k3s2"),
     ("v1.28.2+k3s1", "v1.29.1+k3s2", "v1.30.0+k3s10")),
    # two newer minors: only the newest is added
    (("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"),
     ("v1.30.2+k3s1", "v1.31.1+k3s1", "v1.31.0+k3s1"),
     ("v1.28.2+k3s1", "v1.29.1+k3s1", "v1.31.1+k3s1")),
    # nothing upstream at all
    (("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"), (),
     ("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1")),
    # an older patch upstream never downgrades
    (("v1.29.5+k3s1",), ("v1.29.4+k3s1",), ("v1.29.5+k3s1",)),
])
def test_next_versions(current, available, expected):
    assert [str(v) for v in k3s.next_versions(vs(*current), vs(*available))] == list(expected)


@pytest.mark.parametrize("text, parsed", [
    ("v1.28.2+k3s1", (1, 28, 2, 1)),
    ("1.28.2+k3s3", (1, 28, 2, 3)),
    ("v1.28.2", (1, 28, 2, 1)),
    ("v1.31.0-rc1+k3s1", None),  # pre-release
    ("v1.28", None),
    ("latest", None),
])
def test_parse(text, parsed):
    got = k3s.parse(text)
    assert (None if got is None else (got.major, got.minor, got.patch, got.build)) == parsed


def test_available_from_lines_and_github_json():
    lines = "v1.30.0+k3s1\n# a comment\n\nv1.31.0-rc2+k3s1\nv1.29.2+k3s1  # trailing\n"
    assert [str(v) for v in k3s.parse_available(lines)] == ["v1.30.0+k3s1", "v1.29.2+k3s1"]
    export = json.dumps([
        {"tag_name": "v1.30.1+k3s1", "prerelease": False, "draft": False},
        {"tag_name": "v1.31.0+k3s1", "prerelease": True},
        {"tag_name": "v1.31.0+k3s2", "draft": True},
        {"tag_name": "v1.29.3+k3s1"},
    ])
    assert [str(v) for v in k3s.parse_available(export)] == ["v1.30.1+k3s1", "v1.29.3+k3s1"]
    with pytest.raises(ValueError):
        k3s.parse_available("[1, 2]")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tasks", "k3s-versions", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_prints_the_worked_example(tmp_path):
    available = tmp_path / "k3s.txt"
    available.write_text("v1.30.0+k3s1\nv1.27.4+k3s1\nv1.28.3+k3s1\nv1.29.2+k3s1\n")
    proc = run_cli("--current", "v1.27.3+k3s1,v1.28.2+k3s1,v1.29.1+k3s1", "--available", str(available))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "v1.28.3+k3s1\nv1.29.2+k3s1\nv1.30.0+k3s1\n"


def test_cli_bad_input_is_exit_2(tmp_path):
    proc = run_cli("--current", "v1.27.3+k3s1,banana", "--available", str(tmp_path / "none"))
    assert proc.returncode == 2 and "banana" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("--current", "v1.27.3+k3s1", "--available", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "missing.txt" in proc.stderr
