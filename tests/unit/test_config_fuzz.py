"""Property-based fuzzing of flavor YAML: never a traceback, always a config
error (one `file:...` line per problem) or a valid plan."""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.config import TOP_KEYS, load_flavors
from tasks.kinds import KINDS
from tasks.matrix import duplicate_problems, expand
from tasks.model import ConfigError

VALID = {
    "flavor": "ubuntu", "release": "24.04", "base_image": "ubuntu:24.04", "version": "v3.1.0",
    "variants": ["core"], "arches": ["amd64"], "devices": ["generic"],
    "kairos_init_image": "quay.io/kairos/kairos-init:v4.3.0", "registry": "quay.io/kairos", "artifacts": ["iso"],
}
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                    st.sampled_from(["core", "standard", "amd64", "arm64", "rpi4", "generic", "v3.1.0",
                                     "v1.28.2+k3s1", "v1.34.4+k0s.0", "policy", "builtin", "kairos-init", "iso",
                                     "raw", "enforce"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=10)
keys = st.one_of(st.sampled_from(TOP_KEYS), st.text(max_size=12))


def check(path: Path) -> None:
    try:
        flavors = load_flavors([path])
    except ConfigError as exc:
        assert exc.problems, "a ConfigError must carry problems"
        for problem in exc.problems:
            assert problem.startswith(str(path)), problem
            assert "\n" not in problem
        return
    builds = expand(flavors)
    assert duplicate_problems(builds) == []
    for b in builds:
        assert b.stem.startswith("kairos-") and ":" in b.image
        assert set(b.kinds) <= set(KINDS)
        b.files()


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(changes=st.dictionaries(keys, values, max_size=5), drop=st.lists(st.sampled_from(list(VALID)), max_size=3))
def test_mutated_flavors_give_errors_or_plans(changes, drop):
    doc = {k: v for k, v in VALID.items() if k not in drop}
    doc.update(changes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        check(path)


@SETTINGS
@given(text=st.text(max_size=300))
def test_arbitrary_text_gives_errors_or_plans(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.yaml"
        path.write_text(text)
        check(path)
