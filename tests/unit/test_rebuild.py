"""rebuild-check (tasks/rebuild.py): its pure parts, and the comparison of two real output trees
(with the real diffoscope where installed)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import rebuild
from tasks.model import SignOptions
from tasks.rebuild import DIFFERENT, EXCEPTION, IDENTICAL, MISSING, Row


def test_kind_of_names_every_file_and_checksum(make_build):
    b = make_build(artifacts=("kernel", "squashfs", "iso", "sbom", "boot"))
    kinds = rebuild.kind_of([b])
    assert kinds[f"{b.stem}-kernel"] == kinds[f"{b.stem}-kernel.sha256"] == "kernel"
    assert kinds[f"{b.stem}-sbom.spdx.json"] == "sbom"
    assert kinds[f"{b.stem}-boot.json"] == "boot"
    assert f"{b.stem}.iso.sha256.sig" not in kinds  # not signed
    signed = make_build(artifacts=("iso", "sign"), sign=SignOptions(key=Path("/k/cosign.key")))
    kinds = rebuild.kind_of([signed])
    assert kinds[f"{signed.stem}.iso"] == "iso"
    assert kinds[f"{signed.stem}.iso.sha256.sig"] == kinds[f"{signed.stem}.iso.sha256.bundle"] == "sign"
    assert kinds[f"{signed.stem}-provenance.json"] == "sign"


@pytest.mark.parametrize("name, kind, excepted", [
    ("x.squashfs", "squashfs", False), ("x.iso", "iso", False), ("x.img", "raw", False),
    ("x-sbom.spdx.json", "sbom", True), ("x-trivy.json", "trivy", True), ("x-boot.log", "boot", True),
    ("manifest.json", None, True), ("RELEASE.md", None, True), ("SHA256SUMS", None, True),
    ("stray.txt", None, False),
])
def test_exceptions_are_by_kind_and_aggregate(name, kind, excepted):
    assert (rebuild.exception_of(name, kind) is not None) == excepted


@pytest.mark.parametrize("a, b, expected", [
    (b"abc", b"abc", None), (b"abc", b"abd", 2), (b"abc", b"abcd", 3), (b"", b"x", 0),
    (b"x" * (3 << 20), b"x" * (3 << 20) + b"y", 3 << 20), (b"x" * (2 << 20) + b"a", b"x" * (2 << 20) + b"b", 2 << 20),
])
def test_first_difference(tmp_path, a, b, expected):
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    assert rebuild.first_difference(tmp_path / "a", tmp_path / "b") == expected


def test_inner_names_of_a_diffoscope_report():
    report = "\n".join([
        "--- /r1/outputs/v3.1.0/x.squashfs", "+++ /r2/outputs/v3.1.0/x.squashfs",
        "├── file list", "│ @@ -1 +1 @@", "│ -a", "│ +b",
        "├── /var/log/apt/history.log", "│ @@ -1 +1 @@", "│   ├── inner", "│ -Start-Date: 1", "│ +Start-Date: 2",
        "├── stat {}", "│ -Modify: 1",
    ])
    assert rebuild.inner_names(report) == ["/var/log/apt/history.log", "inner"]


def test_render_counts_and_names_exceptions():
    rows = [Row("v3.1.0/x.iso", "iso", IDENTICAL, "a" * 64),
            Row("v3.1.0/x-sbom.spdx.json", "sbom", EXCEPTION, "b" * 64, "why"),
            Row("v3.1.0/x.squashfs", "squashfs", DIFFERENT, "c" * 64, "first difference inside: ./etc/x")]
    text = rebuild.render(rows)
    assert "v3.1.0/x.iso" in text and "aaaaaaaaaaaaaaaa  identical" in text
    assert "known exception (sbom): why" in text
    assert "DIFFERENT: first difference inside: ./etc/x" in text
    assert text.rstrip().endswith("1 identical, 1 DIFFERENT, 0 MISSING, 1 known exception")
    assert not rebuild.passed(rows) and rebuild.passed(rows[:2]) and not rebuild.passed([])


def test_run_env_isolates_each_run(tmp_path):
    env = rebuild.run_env({"PATH": "/bin", "KAIROS_STATE": "/old"}, tmp_path / "run1", "flavors/a.yaml", None)
    assert env == {"PATH": "/bin", "KAIROS_STATE": str(tmp_path / "run1" / "state"),
                   "KAIROS_OUTPUTS": str(tmp_path / "run1" / "outputs"), "KAIROS_NO_CACHE": "1",
                   "KAIROS_FLAVORS": "flavors/a.yaml"}
    assert rebuild.run_env({}, tmp_path, None, "1/2")["KAIROS_SHARD"] == "1/2"
    assert rebuild.doit_argv(["iso:x"]) == [sys.executable, "-m", "doit", "iso:x"]


def test_compare_two_output_trees(tmp_path, make_build):
    """identical, known exception, MISSING and DIFFERENT rows from real files; a squashfs that
    differs in one file inside is named by diffoscope where it is installed."""
    b = make_build(artifacts=("kernel", "squashfs", "sbom"))
    one, two = tmp_path / "one" / "v3.1.0", tmp_path / "two" / "v3.1.0"
    for out in (one, two):
        out.mkdir(parents=True)
        (out / f"{b.stem}-kernel").write_bytes(b"kernel")
    (one / f"{b.stem}-sbom.spdx.json").write_text('{"created": "1"}')
    (two / f"{b.stem}-sbom.spdx.json").write_text('{"created": "2"}')
    (one / f"{b.stem}-initrd").write_bytes(b"only in run 1")
    trees = {}
    for name, out in (("one", one), ("two", two)):
        tree = tmp_path / f"tree-{name}"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "same.conf").write_text("same\n")
        (tree / "etc" / "stamp").write_text(f"built by run {name}\n")
        trees[name] = tree
        subprocess.run(["mksquashfs", str(tree), str(out / f"{b.stem}.squashfs"), "-noappend", "-quiet",
                        "-all-time", "1700000000", "-mkfs-time", "1700000000", "-all-root"], check=True,
                       capture_output=True)
    rows = {r.name: r for r in rebuild.compare(tmp_path / "one", tmp_path / "two", rebuild.kind_of([b]),
                                                tmp_path / "reports")}
    assert rows[f"v3.1.0/{b.stem}-kernel"].verdict == IDENTICAL
    assert rows[f"v3.1.0/{b.stem}-sbom.spdx.json"].verdict == EXCEPTION
    assert rows[f"v3.1.0/{b.stem}-initrd"].verdict == MISSING
    squash = rows[f"v3.1.0/{b.stem}.squashfs"]
    assert squash.verdict == DIFFERENT and squash.kind == "squashfs"
    if shutil.which("diffoscope"):
        assert squash.detail.startswith("first difference inside: /etc/stamp"), squash.detail
    else:
        assert "first differing byte at offset" in squash.detail


def test_cli_refuses_a_used_work_directory_and_bad_flavors(tmp_path, capsys):
    from tasks.__main__ import main
    (tmp_path / "work" / "run1").mkdir(parents=True)
    flavor = Path(__file__).resolve().parents[2] / "flavors" / "debian-12.yaml"
    assert main(["rebuild-check", "--flavors", str(flavor), "--work", str(tmp_path / "work")]) == 2
    assert f"--work {tmp_path / 'work'}: {tmp_path / 'work' / 'run1'} exists" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("flavor: Debian\n")
    assert main(["rebuild-check", "--flavors", str(bad), "--work", str(tmp_path / "w2")]) == 2
    assert f"{bad}:1: flavor:" in capsys.readouterr().err
    assert not (tmp_path / "w2").exists()  # nothing built, nothing made



def test_help_lists_the_known_exceptions():
    out = subprocess.run([sys.executable, "-m", "tasks", "rebuild-check", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout
    assert "known exceptions:\n  sbom: names the converted image by its digest" in out
    assert "\n  SHA256SUMS: it lists the checksums of the known exceptions as well\n" in out
    assert "KAIROS_NO_CACHE=1" in out
