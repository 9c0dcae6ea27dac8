"""Providers (k3s, k0s) and their version policy: tables incl. the worked example of the release process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.providers import PROVIDERS, next_versions

ROOT = Path(__file__).resolve().parents[2]
K3S, K0S = PROVIDERS["k3s"], PROVIDERS["k0s"]


def vs(provider, *texts):
    return [provider.parse(t) for t in texts]


POLICY_CASES = [
    # the worked example: a newer minor exists
    pytest.param(K3S, ("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"),
                 ("v1.30.0+k3s1", "v1.27.4+k3s1", "v1.28.3+k3s1", "v1.29.2+k3s1"),
                 ("v1.28.3+k3s1", "v1.29.2+k3s1", "v1.30.0+k3s1"), id="k3s-new-minor"),
    # no new minor: bump each to its latest patch
    pytest.param(K3S, ("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"),
                 ("v1.27.4+k3s1", "v1.27.5+k3s1", "v1.29.3+k3s1"),
                 ("v1.27.5+k3s1", "v1.28.2+k3s1", "v1.29.3+k3s1"), id="k3s-patches"),  # 1.28: no data, kept
    # +k3sN orders numerically
    pytest.param(K3S, ("v1.28.2+k3s1", "v1.29.1+k3s1", "v1.30.0+k3s1"),
                 ("v1.30.0+k3s9", "v1.30.0+k3s10", "v1.29.1+k3s2"),
                 ("v1.28.2+k3s1", "v1.29.1+k3s2", "v1.30.0+k3s10"), id="k3s-build-numbers"),
    # two newer minors: only the newest is added
    pytest.param(K3S, ("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"),
                 ("v1.30.2+k3s1", "v1.31.1+k3s1", "v1.31.0+k3s1"),
                 ("v1.28.2+k3s1", "v1.29.1+k3s1", "v1.31.1+k3s1"), id="k3s-two-new-minors"),
    # nothing upstream at all
    pytest.param(K3S, ("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"), (),
                 ("v1.27.3+k3s1", "v1.28.2+k3s1", "v1.29.1+k3s1"), id="k3s-nothing-upstream"),
    # an older patch upstream never downgrades
    pytest.param(K3S, ("v1.29.5+k3s1",), ("v1.29.4+k3s1",), ("v1.29.5+k3s1",), id="k3s-no-downgrade"),
    # k0s: the same rules
    pytest.param(K0S, ("v1.32.8+k0s.0", "v1.33.4+k0s.0", "v1.34.4+k0s.0"),
                 ("v1.35.1+k0s.0", "v1.35.0+k0s.0", "v1.33.5+k0s.0", "v1.34.5+k0s.0", "v1.32.9+k0s.0"),
                 ("v1.33.5+k0s.0", "v1.34.5+k0s.0", "v1.35.1+k0s.0"), id="k0s-new-minor"),
    pytest.param(K0S, ("v1.32.8+k0s.0", "v1.33.4+k0s.0", "v1.34.4+k0s.0"),
                 ("v1.32.9+k0s.0", "v1.34.5+k0s.0", "v1.34.4+k0s.1"),
                 ("v1.32.9+k0s.0", "v1.33.4+k0s.0", "v1.34.5+k0s.0"), id="k0s-patches"),
    # +k0s.0 < +k0s.1 < +k0s.10
    pytest.param(K0S, ("v1.33.4+k0s.0", "v1.34.4+k0s.0"),
                 ("v1.34.4+k0s.1", "v1.33.4+k0s.9", "v1.33.4+k0s.10"),
                 ("v1.33.4+k0s.10", "v1.34.4+k0s.1"), id="k0s-build-numbers"),
    pytest.param(K0S, ("v1.32.8+k0s.0", "v1.33.4+k0s.0", "v1.34.4+k0s.0"), (),
                 ("v1.32.8+k0s.0", "v1.33.4+k0s.0", "v1.34.4+k0s.0"), id="k0s-nothing-upstream"),
    pytest.param(K0S, ("v1.34.4+k0s.1",), ("v1.34.4+k0s.0", "v1.34.3+k0s.2"), ("v1.34.4+k0s.1",),
                 id="k0s-no-downgrade"),
]


@pytest.mark.parametrize("provider, current, available, expected", POLICY_CASES)
def test_next_versions(provider, current, available, expected):
    assert [str(v) for v in next_versions(vs(provider, *current), vs(provider, *available))] == list(expected)


@pytest.mark.parametrize("provider, text, parsed", [
    (K3S, "v1.28.2+k3s1", (1, 28, 2, 1)),
    (K3S, "1.28.2+k3s3", (1, 28, 2, 3)),
    (K3S, "v1.28.2", (1, 28, 2, 1)),          # the first build: +k3s1
    (K3S, "v1.31.0-rc1+k3s1", None),          # pre-release
    (K3S, "v1.28", None),
    (K3S, "latest", None),
    (K3S, "v1.34.4+k0s.0", None),             # another provider's release
    (K0S, "v1.34.4+k0s.0", (1, 34, 4, 0)),
    (K0S, "v1.34.4+k0s.12", (1, 34, 4, 12)),
    (K0S, "1.32.8+k0s.1", (1, 32, 8, 1)),
    (K0S, "v1.34.4", (1, 34, 4, 0)),          # the first build: +k0s.0
    (K0S, "v1.35.0-rc.1+k0s.0", None),        # pre-release
    (K0S, "v1.35.0-beta.0+k0s.0", None),
    (K0S, "v1.34.4+k0s0", None),              # k0s numbers its builds +k0s.N
    (K0S, "v1.28.2+k3s1", None),
])
def test_parse(provider, text, parsed):
    got = provider.parse(text)
    assert (None if got is None else (got.major, got.minor, got.patch, got.build)) == parsed
    if got is not None and text.startswith("v") and "+" in text:
        assert str(got) == text  # prints back as written


@pytest.mark.parametrize("provider, text, ok", [
    # what a flavor file may list: pre-releases allowed, the build suffix and leading v required
    (K3S, "v1.28.2+k3s1", True), (K3S, "v1.29.0-rc1+k3s2", True), (K3S, "1.28.2+k3s1", False),
    (K3S, "v1.28.2", False), (K3S, "v1.28+k3s1", False), (K3S, "v1.34.4+k0s.0", False),
    (K0S, "v1.34.4+k0s.0", True), (K0S, "v1.32.8+k0s.12", True), (K0S, "v1.35.0-rc.1+k0s.0", True),
    (K0S, "v1.34.4+k0s0", False), (K0S, "v1.34.4", False), (K0S, "1.34.4+k0s.0", False),
    (K0S, "v1.28.2+k3s1", False), (K0S, "v1.34.4+k0s.", False),
])
def test_pattern_of_flavor_versions(provider, text, ok):
    assert bool(provider.pattern.match(text)) == ok


def test_the_table_names_keys_and_examples():
    assert list(PROVIDERS) == ["k3s", "k0s"]
    for name, p in PROVIDERS.items():
        assert (p.name, p.key, p.policy_key) == (name, f"{name}_versions", f"{name}_policy")
        assert p.pattern.match(p.example) and str(p.parse(p.example)) == p.example


def test_available_from_lines_and_github_json():
    lines = "v1.30.0+k3s1\n# a comment\n\nv1.31.0-rc2+k3s1\nv1.29.2+k3s1  # trailing\n"
    assert [str(v) for v in K3S.parse_available(lines)] == ["v1.30.0+k3s1", "v1.29.2+k3s1"]
    export = json.dumps([
        {"tag_name": "v1.30.1+k3s1", "prerelease": False, "draft": False},
        {"tag_name": "v1.31.0+k3s1", "prerelease": True},
        {"tag_name": "v1.31.0+k3s2", "draft": True},
        {"tag_name": "v1.29.3+k3s1"},
    ])
    assert [str(v) for v in K3S.parse_available(export)] == ["v1.30.1+k3s1", "v1.29.3+k3s1"]
    with pytest.raises(ValueError):
        K3S.parse_available("[1, 2]")
    k0s = "v1.34.5+k0s.0\nv1.35.0-rc.1+k0s.0\nv1.30.0+k3s1\nv1.33.5+k0s.1\n"
    assert [str(v) for v in K0S.parse_available(k0s)] == ["v1.34.5+k0s.0", "v1.33.5+k0s.1"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tasks", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("command, current, upstream, expected", [
    (["k3s-versions"], "v1.27.3+k3s1,v1.28.2+k3s1,v1.29.1+k3s1",
     "v1.30.0+k3s1\nv1.27.4+k3s1\nv1.28.3+k3s1\nv1.29.2+k3s1\n", "v1.28.3+k3s1\nv1.29.2+k3s1\nv1.30.0+k3s1\n"),
    (["provider-versions", "k3s"], "v1.27.3+k3s1,v1.28.2+k3s1,v1.29.1+k3s1",
     "v1.30.0+k3s1\nv1.27.4+k3s1\nv1.28.3+k3s1\nv1.29.2+k3s1\n", "v1.28.3+k3s1\nv1.29.2+k3s1\nv1.30.0+k3s1\n"),
    (["provider-versions", "k0s"], "v1.32.8+k0s.0,v1.33.4+k0s.0,v1.34.4+k0s.0",
     "v1.35.0+k0s.0\nv1.35.1-rc.0+k0s.0\nv1.34.4+k0s.1\nv1.33.5+k0s.0\n",
     "v1.33.5+k0s.0\nv1.34.4+k0s.1\nv1.35.0+k0s.0\n"),
])
def test_cli_prints_the_next_three(tmp_path, command, current, upstream, expected):
    available = tmp_path / "available.txt"
    available.write_text(upstream)
    proc = run_cli(*command, "--current", current, "--available", str(available))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected


@pytest.mark.parametrize("command, current, message", [
    (["k3s-versions"], "v1.27.3+k3s1,banana", "'banana' is not a stable k3s version such as v1.28.2+k3s1"),
    (["provider-versions", "k0s"], "v1.34.4+k0s.0,v1.33.4+k3s1",
     "'v1.33.4+k3s1' is not a stable k0s version such as v1.34.4+k0s.0"),
    (["provider-versions", "k0s"], "v1.35.0-rc.1+k0s.0", "is not a stable k0s version"),
])
def test_cli_bad_current_is_exit_2(tmp_path, command, current, message):
    (tmp_path / "none").write_text("")
    proc = run_cli(*command, "--current", current, "--available", str(tmp_path / "none"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("command", [["k3s-versions"], ["provider-versions", "k0s"]])
def test_cli_missing_available_is_exit_2(tmp_path, command):
    proc = run_cli(*command, "--current", K3S.example if command[0] == "k3s-versions" else K0S.example,
                   "--available", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "missing.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unknown_provider_is_a_usage_error():
    proc = run_cli("provider-versions", "rke2", "--current", "v1.30.0", "--available", "x")
    assert proc.returncode == 2 and "invalid choice: 'rke2'" in proc.stderr


@pytest.mark.parametrize("args, needles", [
    (["provider-versions", "--help"], ["k3s", "k0s", "v1.34.4+k0s.0", "Pre-releases", "oldest minor"]),
    (["k3s-versions", "--help"], ["provider-versions k3s", "--current", "--available", "newer minor"]),
    (["--help"], ["provider-versions", "k3s-versions"]),
])
def test_cli_help_explains_the_policy(args, needles):
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for needle in needles:
        assert needle in text, (needle, proc.stdout)
