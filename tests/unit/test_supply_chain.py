"""Pure builders of the sbom, trivy/grype and cosign stages: argv tables, report parsing, policy."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tasks.matrix import expand
from tasks.model import MmdebstrapBase, ScanOptions, SignOptions
from tasks.run import KairosError
from tasks.stages import convert, manifest, scan, sign
from tasks.stages.manifest import release_notes
from tasks.stages.sbom import syft_argv
from tasks.state import Paths

REF = "127.0.0.1:5000/kairos/debian@sha256:" + "a" * 64


def test_syft_writes_both_formats_in_one_run():
    assert syft_argv("reg/x:1", Path("/o/a.spdx.json"), Path("/o/a.syft.json")) == [
        "syft", "docker:reg/x:1", "--quiet", "-o", "spdx-json=/o/a.spdx.json", "-o", "json=/o/a.syft.json"]


@pytest.mark.parametrize("scan_opts, scanners, offline", [
    (ScanOptions(), "vuln,secret", True),
    (ScanOptions(vulnerabilities=False), "secret", True),
    (ScanOptions(download_db=True), "vuln,secret", False),
])
def test_trivy_argv(make_flavor, scan_opts, scanners, offline):
    f = make_flavor(scan=scan_opts)
    argv = scan.trivy_argv("reg/x:1", Path("/c"), f, Path("/o/r.json"))
    assert argv[:6] == ["trivy", "image", "--image-src", "docker", "--cache-dir", "/c"]
    assert argv[argv.index("--scanners") + 1] == scanners
    assert argv[argv.index("--skip-dirs") + 1] == "/tmp"
    assert argv[argv.index("--format") + 1] == "json" and argv[argv.index("--output") + 1] == "/o/r.json"
    assert ("--skip-db-update" in argv and "--offline-scan" in argv) == offline
    assert argv[-1] == "reg/x:1"


def test_trivy_sarif_is_converted_from_the_same_scan():
    assert scan.trivy_convert_argv(Path("/o/r.json"), Path("/o/r.sarif")) == [
        "trivy", "convert", "--format", "sarif", "--output", "/o/r.sarif", "/o/r.json"]


@pytest.mark.parametrize("scan_opts, expected", [
    (ScanOptions(grype_db=Path("/db")), {"GRYPE_CHECK_FOR_APP_UPDATE": "false", "GRYPE_DB_CACHE_DIR": "/db",
                                         "GRYPE_DB_AUTO_UPDATE": "false", "GRYPE_DB_VALIDATE_AGE": "false"}),
    (ScanOptions(download_db=True), {"GRYPE_CHECK_FOR_APP_UPDATE": "false"}),
])
def test_grype_env(make_flavor, scan_opts, expected):
    assert scan.grype_env(make_flavor(scan=scan_opts)) == expected


def test_grype_argv():
    assert scan.grype_argv("reg/x:1", Path("/j"), Path("/s")) == [
        "grype", "docker:reg/x:1", "--add-cpes-if-none", "--quiet", "-o", "json=/j", "-o", "sarif=/s"]


TRIVY_REPORT = {"Results": [
    {"Target": "img (debian 12)", "Vulnerabilities": [
        {"VulnerabilityID": "CVE-1", "PkgName": "libssl3", "Severity": "CRITICAL"},
        {"VulnerabilityID": "CVE-2", "PkgName": "apt", "Severity": "LOW"}]},
    {"Target": "/etc/kairos/deploy-key.pem", "Secrets": [{"RuleID": "private-key", "Severity": "HIGH"}]},
    {"Target": "empty", "Vulnerabilities": None},
]}
GRYPE_REPORT = {"matches": [
    {"vulnerability": {"id": "CVE-3", "severity": "Medium"}, "artifact": {"name": "libc6"}},
    {"vulnerability": {"id": "CVE-4", "severity": "Critical"}, "artifact": {"name": "zlib1g"}},
]}


def test_report_parsing():
    assert scan.trivy_findings(TRIVY_REPORT) == [
        scan.Finding("trivy", "CVE-1", "libssl3", "CRITICAL"), scan.Finding("trivy", "CVE-2", "apt", "LOW"),
        scan.Finding("trivy", "secret:private-key", "/etc/kairos/deploy-key.pem", "HIGH")]
    assert scan.grype_findings(GRYPE_REPORT) == [
        scan.Finding("grype", "CVE-3", "libc6", "MEDIUM"), scan.Finding("grype", "CVE-4", "zlib1g", "CRITICAL")]
    assert scan.trivy_findings({}) == [] and scan.grype_findings({"matches": None}) == []


@pytest.mark.parametrize("threshold, ids", [
    ("CRITICAL", ["CVE-1"]),
    ("HIGH", ["CVE-1", "secret:private-key"]),
    ("LOW", ["CVE-1", "CVE-2", "secret:private-key"]),
])
def test_over_threshold(threshold, ids):
    assert [f.ident for f in scan.over_threshold(scan.trivy_findings(TRIVY_REPORT), threshold)] == ids


def test_enforce_names_the_findings_and_report_only_never_fails(make_flavor):
    findings = scan.trivy_findings(TRIVY_REPORT)
    scan.enforce(make_flavor(scan=ScanOptions(policy="report-only", severity="LOW")), "s", findings)
    with pytest.raises(KairosError) as info:
        scan.enforce(make_flavor(scan=ScanOptions(policy="enforce", severity="HIGH")), "stem-x", findings)
    message = str(info.value)
    assert "2 finding(s) at or above HIGH in stem-x" in message
    assert "CVE-1 in libssl3 (CRITICAL)" in message and "secret:private-key" in message
    assert "CVE-2" not in message
    scan.enforce(make_flavor(scan=ScanOptions(policy="enforce", severity="CRITICAL")), "s", [])


KEYED = SignOptions(key=Path("/k/cosign.key"))


@pytest.mark.parametrize("options, argv", [
    (KEYED, ["cosign", "sign", "--key", "/k/cosign.key", "--tlog-upload=false", "--yes", REF]),
    (SignOptions(keyless=True), ["cosign", "sign", "--yes", REF]),
])
def test_sign_argv(make_flavor, options, argv):
    assert sign.sign_argv(make_flavor(sign=options), REF) == argv


def test_attest_and_blob_argv(make_flavor):
    f = make_flavor(sign=KEYED)
    assert sign.attest_argv(f, REF, Path("/o/p.json"), "slsaprovenance1") == [
        "cosign", "attest", "--key", "/k/cosign.key", "--tlog-upload=false", "--yes", "--type", "slsaprovenance1",
        "--predicate", "/o/p.json", REF]
    assert sign.sign_blob_argv(f, Path("/o/a.iso.sha256"), Path("/o/s"), Path("/o/b")) == [
        "cosign", "sign-blob", "--key", "/k/cosign.key", "--tlog-upload=false", "--yes",
        "--output-signature", "/o/s", "--bundle", "/o/b", "/o/a.iso.sha256"]


def test_verify_argv_uses_the_public_key_or_the_override(make_flavor, monkeypatch):
    f = make_flavor(sign=KEYED)
    monkeypatch.delenv("KAIROS_VERIFY_KEY", raising=False)
    assert sign.verify_argv(f, REF) == ["cosign", "verify", "--key", "/k/cosign.pub",
                                        "--insecure-ignore-tlog=true", REF]
    monkeypatch.setenv("KAIROS_VERIFY_KEY", "/other.pub")
    assert sign.verify_blob_argv(f, Path("/o/a.sha256"), Path("/o/a.sha256.sig")) == [
        "cosign", "verify-blob", "--key", "/other.pub", "--insecure-ignore-tlog=true",
        "--signature", "/o/a.sha256.sig", "/o/a.sha256"]


def test_password_comes_from_the_named_variable_only(make_flavor, monkeypatch):
    f = make_flavor(sign=replace(KEYED, password_env="MY_PASS"))
    monkeypatch.delenv("MY_PASS", raising=False)
    with pytest.raises(KairosError, match="environment variable MY_PASS"):
        sign.cosign_env(f)
    monkeypatch.setenv("MY_PASS", "s3cret")
    assert sign.cosign_env(f) == {"COSIGN_YES": "true", "COSIGN_PASSWORD": "s3cret"}


def test_checksum_files_cover_every_checksummed_kind(make_build, tmp_path):
    b = make_build(artifacts=("iso", "sbom", "sign"))  # the ISO pulls in kernel, initrd, squashfs
    names = [p.name for p in Paths(tmp_path / "s", tmp_path / "o").checksums(b)]
    assert names == [f"{b.stem}.iso.sha256", f"{b.stem}-kernel.sha256", f"{b.stem}-initrd.sha256",
                     f"{b.stem}.squashfs.sha256"]


def test_provenance_predicate_shape(make_build):
    b = make_build()
    deps = [{"uri": "oci://ubuntu:24.04", "digest": {"sha256": "b" * 64}}]
    p = sign.provenance(b, deps, "t0", "t1")
    assert p["buildDefinition"]["buildType"] == sign.BUILD_TYPE
    assert p["buildDefinition"]["resolvedDependencies"] == deps
    assert p["buildDefinition"]["externalParameters"]["kairos_init_flags"][-2:] == ["--version", "v3.1.0"]
    assert p["runDetails"]["metadata"] == {"startedOn": "t0", "finishedOn": "t1"}


@pytest.mark.parametrize("variant, provider_version, provider, flags", [
    ("core", None, None, []),
    ("standard", "v1.28.2+k3s1", "k3s", ["-p", "k3s", "--provider-k3s-version", "v1.28.2+k3s1"]),
    ("standard", "v1.34.4+k0s.0", "k0s", ["-p", "k0s", "--provider-k0s-version", "v1.34.4+k0s.0"]),
])
def test_provenance_and_manifest_name_the_provider_and_its_version(make_build, tmp_path, monkeypatch, variant,
                                                                     provider_version, provider, flags):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    b = make_build(variant, provider_version, artifacts=())
    params = sign.provenance(b, [], "t0", "t1")["buildDefinition"]["externalParameters"]
    assert (params["provider"], params["provider_version"]) == (provider, provider_version)
    assert params["kairos_init_flags"] == ["-m", "generic", "-t", "false", *flags, "--version", "v3.1.0"]
    paths = Paths(tmp_path / "s", tmp_path / "o")
    for digest_file in (paths.resolved(b.base.ident), paths.resolved(convert.init_ident(b)), paths.image_id(b),
                        paths.pushed(b)):
        digest_file.parent.mkdir(parents=True, exist_ok=True)
        digest_file.write_text("sha256:" + "c" * 64 + "\n")
    record = manifest.build_record(paths, b)
    assert (record["provider"], record["provider_version"]) == (provider, provider_version)
    assert record["inputs"]["flags"] == params["kairos_init_flags"]
    assert record["inputs"]["source_date_epoch"] == 1700000000  # the default: no flavor key, no variable
    notes = release_notes("v3.1.0", [b], [{**record, "outputs": []}], {})
    assert "Dated SOURCE_DATE_EPOCH=1700000000 (squashfs, ISO, raw disk images, UKI)." in notes
    assert "mmdebstrap" not in record["inputs"]["base"] and "Packages (" not in notes  # a registry base
    assert record["inputs"]["raw_xz_level"] is None and "compressed with xz" not in notes  # no raw image


def test_manifest_and_release_notes_record_the_xz_level(make_build, tmp_path):
    b = make_build(artifacts=("raw",), raw_generic=True, raw_xz_level=0, kairos_init_image=None, converter="builtin")
    paths = Paths(tmp_path / "s", tmp_path / "o")
    for digest_file in (paths.resolved(b.base.ident), paths.image_id(b), paths.pushed(b)):
        digest_file.parent.mkdir(parents=True, exist_ok=True)
        digest_file.write_text("sha256:" + "c" * 64 + "\n")
    for sha in paths.checksums(b):  # the .img and .img.xz with their checksums
        artifact = sha.with_name(sha.name.removesuffix(".sha256"))
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_bytes(b"x")
        sha.write_text(f"{'d' * 64}  {artifact.name}\n")
    record = manifest.build_record(paths, b)
    assert record["inputs"]["raw_xz_level"] == 0
    notes = release_notes("v3.1.0", [b], [{**record, "outputs": []}], {})
    assert "Raw disk images compressed with xz -0 (`.img.xz`)." in notes


def test_manifest_and_release_notes_record_the_package_mirror(make_build, tmp_path):
    """An mmdebstrap base's mirror pins the package set (a dated snapshot): the manifest records it with
    the other mmdebstrap options, RELEASE.md names it."""
    mirror = "http://snapshot.debian.org/archive/debian/20241101T000000Z"
    b = make_build(base_image=MmdebstrapBase(suite="bookworm", mirror=mirror), converter="builtin", kairos_init_image=None,
                   artifacts=())
    paths = Paths(tmp_path / "s", tmp_path / "o")
    for digest_file in (paths.resolved(b.base.ident), paths.image_id(b), paths.pushed(b)):
        digest_file.parent.mkdir(parents=True, exist_ok=True)
        digest_file.write_text("sha256:" + "c" * 64 + "\n")
    record = manifest.build_record(paths, b)
    assert record["inputs"]["base"]["mmdebstrap"] == {"suite": "bookworm", "variant": "minbase", "mirror": mirror,
                                                     "components": ["main"], "include": []}
    notes = release_notes("v3.1.0", [b], [{**record, "outputs": []}], {})
    assert f"Packages (mmdebstrap bases, and apt in the conversion) from: bookworm at {mirror}." in notes


def test_release_notes_list_each_provider_and_its_versions(make_flavor):
    f = make_flavor(variants=("core", "standard"), k3s_versions=("v1.29.1+k3s1", "v1.28.2+k3s1"),
                    k0s_versions=("v1.34.4+k0s.0",), arches=("amd64", "arm64"))
    builds = expand((f,))
    records = [{"stem": b.stem, "image_digest": "sha256:" + "a" * 64, "outputs": []} for b in builds]
    text = release_notes("v3.1.0", builds, records, {})
    section = text.split("## Providers\n\n", 1)[1].split("\n\n", 1)[0]
    assert section.splitlines() == ["- k3s v1.28.2+k3s1", "- k3s v1.29.1+k3s1", "- k0s v1.34.4+k0s.0"]
    core = [b for b in builds if b.variant == "core"]
    text = release_notes("v3.1.0", core, records[:len(core)], {})
    assert "## Providers\n\n- none (core images only)\n" in text
