"""trivy and grype: vulnerability (and, with trivy, secret) reports of the image,
plus the per-flavor policy (`report-only`, or `enforce` at a severity threshold).

Vulnerability databases cannot be downloaded offline: their location is the
flavor's `scan.trivy_db` / `scan.grype_db`. Without one the task fails naming
that setting, unless `scan.vulnerabilities: false` (trivy then scans secrets
only) or `scan.download_db: true` (the scanners fetch their DBs themselves).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..model import SEVERITIES, Flavor
from ..graph import Context, action, task
from ..matrix import Build
from ..run import KairosError, UsageError, run, say
from ..state import Paths, atomic_path
from .push import ensure_image

STAGE_VERSION = 1
GRYPE_ENV = {"GRYPE_CHECK_FOR_APP_UPDATE": "false"}
GRYPE_OFFLINE_ENV = {"GRYPE_DB_AUTO_UPDATE": "false", "GRYPE_DB_VALIDATE_AGE": "false"}


@dataclass(frozen=True)
class Finding:
    scanner: str
    ident: str       # CVE id or secret rule id
    target: str      # package name or file path
    severity: str    # one of SEVERITIES


# --- pure builders ------------------------------------------------------------

def trivy_scanners(flavor: Flavor) -> str:
    return "vuln,secret" if flavor.scan.vulnerabilities else "secret"


def trivy_argv(image: str, cache_dir: Path, flavor: Flavor, out_json: Path) -> list[str]:
    argv = ["trivy", "image", "--image-src", "docker", "--cache-dir", str(cache_dir),
            "--scanners", trivy_scanners(flavor), "--skip-dirs", "/tmp", "--format", "json",
            "--output", str(out_json), "--quiet"]
    if not flavor.scan.download_db:
        argv += ["--skip-db-update", "--skip-java-db-update", "--offline-scan"]
    return argv + [image]


def trivy_convert_argv(report_json: Path, out_sarif: Path) -> list[str]:
    """Second format from the same scan result: no second scan."""
    return ["trivy", "convert", "--format", "sarif", "--output", str(out_sarif), str(report_json)]


def grype_argv(image: str, out_json: Path, out_sarif: Path) -> list[str]:
    return ["grype", f"docker:{image}", "--add-cpes-if-none", "--quiet",
            "-o", f"json={out_json}", "-o", f"sarif={out_sarif}"]


def grype_env(flavor: Flavor) -> dict[str, str]:
    env = dict(GRYPE_ENV)
    if flavor.scan.grype_db is not None:
        env["GRYPE_DB_CACHE_DIR"] = str(flavor.scan.grype_db)
    if not flavor.scan.download_db:
        env.update(GRYPE_OFFLINE_ENV)
    return env


def trivy_findings(report: dict) -> list[Finding]:
    out = []
    for result in report.get("Results") or []:
        for v in result.get("Vulnerabilities") or []:
            out.append(Finding("trivy", v.get("VulnerabilityID", "?"), v.get("PkgName", "?"),
                               (v.get("Severity") or "UNKNOWN").upper()))
        for s in result.get("Secrets") or []:
            out.append(Finding("trivy", f"secret:{s.get('RuleID', '?')}", result.get("Target", "?"),
                               (s.get("Severity") or "UNKNOWN").upper()))
    return out


def grype_findings(report: dict) -> list[Finding]:
    out = []
    for m in report.get("matches") or []:
        vuln = m.get("vulnerability") or {}
        out.append(Finding("grype", vuln.get("id", "?"), (m.get("artifact") or {}).get("name", "?"),
                           (vuln.get("severity") or "UNKNOWN").upper()))
    return out


def over_threshold(findings: list[Finding], threshold: str) -> list[Finding]:
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    limit = rank[threshold]
    return [f for f in findings if rank.get(f.severity, 0) >= limit]


def enforce(flavor: Flavor, stem: str, findings: list[Finding]) -> None:
    """Raise when the flavor enforces and findings cross its threshold (names them)."""
    if flavor.scan.policy != "enforce":
        return
    bad = over_threshold(findings, flavor.scan.severity)
    if bad:
        listed = "; ".join(f"{f.ident} in {f.target} ({f.severity})" for f in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise KairosError(f"{bad[0].scanner}: {len(bad)} finding(s) at or above {flavor.scan.severity} in {stem} "
                          f"(policy enforce, {flavor.path}): {listed}{more}; the reports are in outputs")


# --- actions --------------------------------------------------------------------

def _no_db(flavor: Flavor, scanner: str) -> UsageError:
    return UsageError(
        f"{scanner}: no vulnerability database for {flavor.path}: set scan.{scanner}_db to a {scanner} database "
        "directory (vulnerability databases cannot be downloaded offline), or scan.download_db: true where the "
        "network allows, or scan.vulnerabilities: false to scan secrets only")


def trivy_cache(paths: Paths, flavor: Flavor) -> Path:
    """trivy writes its layer cache into --cache-dir: keep that in the state dir and
    point its db/ at the configured (read-only) database."""
    db = flavor.scan.trivy_db
    tag = hashlib.sha256(str(db).encode()).hexdigest()[:10] if db else "nodb"
    cache = paths.trivy_cache(tag)
    cache.mkdir(parents=True, exist_ok=True)
    if db is not None:
        link = cache / "db"
        source = db / "db"
        if not (source / "trivy.db").is_file():
            raise UsageError(f"trivy: scan.trivy_db {db} holds no db/trivy.db")
        if link.is_symlink() and Path(os.readlink(link)) != source:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(source)
    return cache


def report_files(paths: Paths, b: Build, kind: str) -> tuple[Path, Path]:
    """The JSON and the SARIF report of ``kind`` for ``b``."""
    by_format = {p.suffix: p for p in paths.outputs_of(b, kind)}
    return by_format[".json"], by_format[".sarif"]


def trivy(paths: Paths, b: Build) -> None:
    f = b.flavor
    if f.scan.vulnerabilities and f.scan.trivy_db is None and not f.scan.download_db:
        raise _no_db(f, "trivy")
    ensure_image(paths, b)
    out_json, out_sarif = report_files(paths, b, "trivy")
    say(f"    trivy ({trivy_scanners(f)}) {b.image}")
    with atomic_path(out_json) as tmp_json, atomic_path(out_sarif) as tmp_sarif:
        run(trivy_argv(b.image, trivy_cache(paths, f), f, tmp_json), what=f"trivy {b.stem}")
        run(trivy_convert_argv(tmp_json, tmp_sarif), what=f"trivy convert {b.stem}")
    findings = trivy_findings(json.loads(out_json.read_text()))
    say(f"    trivy: {len(findings)} finding(s)")
    enforce(f, b.stem, findings)


def grype(paths: Paths, b: Build) -> None:
    f = b.flavor
    if f.scan.grype_db is None and not f.scan.download_db:
        raise _no_db(f, "grype")
    ensure_image(paths, b)
    out_json, out_sarif = report_files(paths, b, "grype")
    say(f"    grype {b.image}")
    with atomic_path(out_json) as tmp_json, atomic_path(out_sarif) as tmp_sarif:
        run(grype_argv(b.image, tmp_json, tmp_sarif), env=grype_env(f), what=f"grype {b.stem}")
    findings = grype_findings(json.loads(out_json.read_text()))
    say(f"    grype: {len(findings)} finding(s)")
    enforce(f, b.stem, findings)


def db_files(db: Path | None) -> list[str]:
    """Files whose change means a new database (small metadata where there is one)."""
    if db is None or not db.is_dir():
        return []
    meta = db / "db" / "metadata.json"
    if meta.is_file():
        return [str(meta)]
    return sorted(str(p) for p in db.rglob("*") if p.is_file() and not p.is_symlink())


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        f = b.flavor
        db = f.scan.trivy_db if kind == "trivy" else f.scan.grype_db
        key = json.dumps({"scan": [f.scan.policy, f.scan.severity, f.scan.vulnerabilities, str(db),
                                   f.scan.download_db], "stage": STAGE_VERSION})
        yield task(b.stem, f"{kind} reports of {b.image} (policy {f.scan.policy})",
                   action(trivy if kind == "trivy" else grype, ctx.paths, b),
                   file_dep=[ctx.paths.image_id(b), ctx.paths.pushed(b)] + db_files(db),
                   targets=ctx.paths.targets_of(b, kind), key=key)
