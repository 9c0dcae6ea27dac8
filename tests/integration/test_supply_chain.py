"""Supply chain on the real tools: syft SBOM, trivy secret scanning, cosign
signing/attestation/verification against the local registry, manifest.

The flavor converts with the kairos-init stand-in (fast) and plants a fake
private key in its overlay for trivy's secret scanner to find.
"""
from __future__ import annotations

import base64
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tasks.config import load_flavors
from tasks.matrix import expand

from tests.harness import LZ4, Workspace, standin_doc, write_flavor

pytestmark = pytest.mark.integration
PASSWORD = "test-only-password"


def fake_private_key() -> str:
    """PEM-shaped text that is not a key of anything (random bytes)."""
    body = base64.encodebytes(random.Random(7).randbytes(600)).decode()
    return f"-----BEGIN RSA PRIVATE KEY-----\n{body}-----END RSA PRIVATE KEY-----\n"


def cosign_keys(folder: Path, password: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cosign", "generate-key-pair"], cwd=folder, check=True, capture_output=True,
                   env=dict(os.environ, COSIGN_PASSWORD=password))
    return folder / "cosign.key"


@pytest.fixture(scope="module")
def sc(tmp_path_factory, ns, bases, standin):
    root = tmp_path_factory.mktemp("sc")
    ws = Workspace(root=root, ns=ns)
    overlay = ws.flavors / "overlay-sc" / "etc" / "kairos"  # trivy skips paths named like tests
    overlay.mkdir(parents=True)
    (overlay / "deploy-key.pem").write_text(fake_private_key())
    cosign_keys(ws.flavors / "keys", PASSWORD)
    write_flavor(ws.flavors / "sc.yaml", standin_doc(
        "supplychain", bases["b"], standin, f"{ns}/kairos", ["squashfs", "sbom", "trivy", "sign"],
        overlay="overlay-sc", squashfs=LZ4, scan={"vulnerabilities": False},
        sign={"key": "keys/cosign.key", "password_env": "SC_KEY_PASSWORD"}))
    (b,) = expand(load_flavors([ws.flavors]))
    env = {"SC_KEY_PASSWORD": PASSWORD}
    first = ws.doit(env=env)
    assert first.rc == 0, first.err
    return ws, b, env, first


def out(ws: Workspace, name: str) -> Path:
    return ws.outputs / "v3.1.0" / name


def test_sbom_lists_exactly_the_packages_dpkg_reports(sc, engine):
    ws, b, _, _ = sc
    dpkg = set(engine.containers.run(b.image, ["dpkg-query", "-W", "-f", "${Package}\n"], remove=True)
               .decode().split())
    syft = json.loads(out(ws, f"{b.stem}-sbom.syft.json").read_text())
    debs = {a["name"] for a in syft["artifacts"] if a["type"] == "deb"}
    assert len(dpkg) > 50 and debs == dpkg
    spdx = json.loads(out(ws, f"{b.stem}-sbom.spdx.json").read_text())
    assert spdx["spdxVersion"].startswith("SPDX-")
    assert dpkg <= {p["name"] for p in spdx["packages"]}


def test_trivy_secret_scanner_finds_the_planted_key(sc):
    ws, b, _, _ = sc
    report = json.loads(out(ws, f"{b.stem}-trivy.json").read_text())
    secrets = [(r["Target"], s["RuleID"]) for r in report.get("Results") or [] for s in r.get("Secrets") or []]
    assert any("deploy-key.pem" in target for target, _ in secrets), secrets
    sarif = json.loads(out(ws, f"{b.stem}-trivy.sarif").read_text())
    assert any("deploy-key.pem" in json.dumps(res) for run in sarif["runs"] for res in run["results"])


def test_enforce_policy_fails_naming_the_secret(sc):
    ws, b, env, _ = sc
    path = ws.flavors / "sc.yaml"
    original = path.read_text()
    path.write_text(original.replace("  vulnerabilities: false", "  vulnerabilities: false\n  policy: enforce\n"
                                     "  severity: HIGH"))
    try:
        result = ws.doit(env=env)
        assert result.rc == 1, result.out
        assert result.build_actions == {f"trivy:{b.stem}"}
        assert "at or above HIGH" in result.err and "secret:private-key" in result.err, result.err
        assert "Traceback" not in result.err
    finally:
        path.write_text(original)
    again = ws.doit(env=env)
    assert again.rc == 0, again.err
    assert again.build_actions == {f"trivy:{b.stem}", "manifest:v3.1.0"}


def test_no_vulnerability_db_names_the_setting(sc, tmp_path):
    ws, b, env, _ = sc
    flavors = tmp_path / "flavors"
    flavors.mkdir()
    text = (ws.flavors / "sc.yaml").read_text().replace("  vulnerabilities: false\n", "  policy: report-only\n")
    (flavors / "sc.yaml").write_text(text.replace("overlay: overlay-sc", f"overlay: {ws.flavors}/overlay-sc")
                                     .replace("key: keys/cosign.key", f"key: {ws.flavors}/keys/cosign.key"))
    result = ws.doit(f"trivy:{b.stem}", env=env, flavors=flavors, state=ws.state, outputs=tmp_path / "out")
    assert result.rc == 2
    assert "trivy: no vulnerability database" in result.err and "scan.trivy_db" in result.err
    assert "scan.vulnerabilities: false" in result.err
    # the failed task is forgotten by doit: the regular flavor runs it again
    restore = ws.doit(env=env)
    assert restore.rc == 0 and restore.build_actions == {f"trivy:{b.stem}", "manifest:v3.1.0"}


def test_verify_passes_on_a_fresh_build(sc):
    ws, b, env, _ = sc
    result = ws.doit("verify", env=env)
    assert result.rc == 0, result.err
    assert f"verified {b.stem}: 1 checksum(s)" in result.out
    assert "2 attestation(s)" in result.out


def test_second_run_runs_nothing(sc):
    ws, _, env, _ = sc
    result = ws.doit(env=env)
    assert result.rc == 0 and result.build_actions == set(), result.build_actions


def test_tampered_artifact_fails_verify_naming_the_file(sc):
    ws, b, env, _ = sc
    squashfs = out(ws, f"{b.stem}.squashfs")
    data = bytearray(squashfs.read_bytes())
    data[len(data) // 2] ^= 0x01
    original_stat = squashfs.stat()
    squashfs.write_bytes(bytes(data))
    try:
        result = ws.doit("verify", env=env)
        assert result.rc == 1
        assert f"{b.stem}.squashfs: does not match {b.stem}.squashfs.sha256" in result.err, result.err
    finally:
        data[len(data) // 2] ^= 0x01
        squashfs.write_bytes(bytes(data))
        os.utime(squashfs, ns=(original_stat.st_atime_ns, original_stat.st_mtime_ns))
    sha = out(ws, f"{b.stem}.squashfs.sha256")
    text = sha.read_text()
    sha.write_text(("0" if text[0] != "0" else "1") + text[1:])
    try:
        result = ws.doit("verify", env=env)
        assert result.rc == 1
        assert f"{b.stem}.squashfs.sha256: blob signature" in result.err, result.err
    finally:
        sha.write_text(text)


def test_wrong_key_fails_verify(sc):
    ws, b, env, _ = sc
    other = cosign_keys(ws.root / "other-keys", "other")
    result = ws.doit("verify", env=dict(env, KAIROS_VERIFY_KEY=str(other.with_suffix(".pub"))))
    assert result.rc == 1
    assert "image signature of" in result.err and "does not verify" in result.err
    assert "provenance attestation" in result.err


def test_missing_password_is_a_clean_error_and_never_printed(sc):
    ws, b, env, first = sc
    assert PASSWORD not in first.out + first.err
    assert ws.doit("forget", f"sign:{b.stem}").rc == 0
    result = ws.doit(f"sign:{b.stem}")  # SC_KEY_PASSWORD is not in the environment
    assert result.rc == 2, result.out
    assert "environment variable SC_KEY_PASSWORD" in result.err and "Traceback" not in result.err
    again = ws.doit(f"sign:{b.stem}", env=env)
    assert again.rc == 0 and again.build_actions == {f"sign:{b.stem}"}
    assert PASSWORD not in again.out + again.err


def test_manifest_records_inputs_outputs_and_tools(sc, engine):
    ws, b, env, _ = sc
    # earlier tests re-signed by hand (`doit sign:`): the default run refreshes the manifest only
    refresh = ws.doit(env=env)
    assert refresh.rc == 0 and refresh.build_actions <= {"manifest:v3.1.0"}
    manifest = json.loads(out(ws, "manifest.json").read_text())
    (record,) = manifest["builds"]
    assert record["stem"] == b.stem
    assert record["inputs"]["base"]["digest"].startswith("sha256:")
    assert record["inputs"]["kairos_init"]["ref"].endswith("kairos-init-standin:v0")
    assert record["inputs"]["flags"] == ["-m", "generic", "-t", "false", "--version", "v3.1.0"]
    assert len(record["inputs"]["overlay_sha256"]) == 64
    assert engine.images.get_registry_data(b.image).id == record["image_digest"]
    names = {o["name"]: o for o in record["outputs"]}
    squash = names[f"{b.stem}.squashfs"]
    assert squash["signature"] == f"{b.stem}.squashfs.sha256.sig"
    assert squash["size"] == out(ws, f"{b.stem}.squashfs").stat().st_size
    for name in (f"{b.stem}-sbom.spdx.json", f"{b.stem}-trivy.sarif", f"{b.stem}-provenance.json"):
        assert name in names
    for tool in ("syft", "trivy", "cosign", "docker"):
        assert manifest["tools"].get(tool), tool
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out(ws, ""), capture_output=True, text=True)
    assert sums.returncode == 0, sums.stdout + sums.stderr


# --- vulnerability path against an offline DB fixture built by the scanners' own Go libraries

CVE = "CVE-2099-0001"


@pytest.fixture(scope="module")
def vuln(tmp_path_factory, ns, bases, standin, engine):
    from tests.fixtures.vulndb.build import build_tool, build_vulndb

    from tests.harness import CACHE

    sed = engine.containers.run(bases["b"], ["dpkg-query", "-W", "-f", "${Version}\n", "sed"],
                                remove=True).decode().strip()
    assert sed, "no sed version in the base image"
    tool = build_tool(CACHE / "vulndb-tool")
    root = tmp_path_factory.mktemp("vuln")
    trivy_db, grype_db = build_vulndb(root / "db", "sed", f"{sed}+kairos1", CVE, "Critical", tool=tool)
    ws = Workspace(root=root, ns=ns)
    write_flavor(ws.flavors / "vuln.yaml", standin_doc(
        "vulnscan", bases["b"], standin, f"{ns}/kairos", ["trivy", "grype"],
        scan={"policy": "report-only", "severity": "CRITICAL", "trivy_db": str(trivy_db), "grype_db": str(grype_db)}))
    (b,) = expand(load_flavors([ws.flavors]))
    first = ws.doit()
    assert first.rc == 0, first.err
    return ws, b, sed, (tool, root)


def test_trivy_and_grype_report_the_fixture_advisory(vuln):
    ws, b, sed, _ = vuln
    trivy = json.loads(out(ws, f"{b.stem}-trivy.json").read_text())
    found = [(v["VulnerabilityID"], v["PkgName"], v["InstalledVersion"], v["Severity"])
             for r in trivy["Results"] for v in r.get("Vulnerabilities") or []]
    assert found == [(CVE, "sed", sed, "CRITICAL")]
    grype = json.loads(out(ws, f"{b.stem}-grype.json").read_text())
    matches = [(m["vulnerability"]["id"], m["artifact"]["name"], m["vulnerability"]["severity"])
               for m in grype["matches"]]
    assert matches == [(CVE, "sed", "Critical")]
    for name in (f"{b.stem}-trivy.sarif", f"{b.stem}-grype.sarif"):
        assert CVE in out(ws, name).read_text()


def test_enforce_fails_the_build_naming_the_finding(vuln):
    ws, b, _, _ = vuln
    path = ws.flavors / "vuln.yaml"
    original = path.read_text()
    path.write_text(original.replace("policy: report-only", "policy: enforce"))
    try:
        result = ws.doit()
        assert result.rc == 1
        assert f"{CVE} in sed (CRITICAL)" in result.err and "at or above CRITICAL" in result.err, result.err
        assert "Traceback" not in result.err
    finally:
        path.write_text(original)


def test_new_database_reruns_the_scans_only(vuln):
    ws, b, sed, (tool, root) = vuln
    assert ws.doit().rc == 0  # back to report-only after the enforce test
    from tests.fixtures.vulndb.build import build_vulndb

    # the same advisory with a fix below the installed version: a new DB, no finding
    build_vulndb(root / "db", "sed", f"{sed}~kairos1", CVE, "Critical", tool=tool)
    result = ws.doit()
    assert result.rc == 0, result.err
    assert result.build_actions == {f"trivy:{b.stem}", f"grype:{b.stem}", "manifest:v3.1.0"}
    grype = json.loads(out(ws, f"{b.stem}-grype.json").read_text())
    assert grype["matches"] == []


def test_new_key_resigns_only(sc):
    """A new key pair: signing and the manifest rerun, nothing else; verify passes with it."""
    ws, b, env, _ = sc
    assert ws.doit(env=env).build_actions == set()
    for name in ("cosign.key", "cosign.pub"):
        (ws.flavors / "keys" / name).unlink()
    cosign_keys(ws.flavors / "keys", PASSWORD)
    result = ws.doit(env=env)
    assert result.rc == 0, result.err
    assert result.build_actions == {f"sign:{b.stem}", "manifest:v3.1.0"}
    verified = ws.doit("verify", env=env)
    assert verified.rc == 0, verified.err
