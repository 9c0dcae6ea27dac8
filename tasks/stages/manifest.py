"""manifest: `outputs/<version>/manifest.json`, `SHA256SUMS` and `RELEASE.md` for every version.

For each build: its inputs (base reference and digest, kairos-init image and
digest, converter flags, overlay hash) and each output file (name, size,
sha256, signature files), plus the versions of the tools used. Big artifacts
are never hashed again: their sha256 comes from their `.sha256` file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from .. import naming
from ..graph import Context, action
from ..matrix import Build
from ..state import Paths, read_digest, sha256_file, write_text_atomic
from . import carrier, convert, sign

# tool -> argv printing its version
TOOL_VERSIONS = {
    "docker": ["docker", "version", "--format", "{{.Server.Version}}"],
    "mmdebstrap": ["mmdebstrap", "--version"],
    "mksquashfs": ["mksquashfs", "-version"],
    "grub-mkrescue": ["grub-mkrescue", "--version"],
    "xorriso": ["xorriso", "-version"],
    "syft": ["syft", "version"],
    "trivy": ["trivy", "--version"],
    "grype": ["grype", "version"],
    "cosign": ["cosign", "version"],
}
REPORT_SUFFIXES = {"sbom": ("-sbom.spdx.json", "-sbom.syft.json"), "trivy": ("-trivy.json", "-trivy.sarif"),
                   "grype": ("-grype.json", "-grype.sarif")}


def go_module_version(program: str) -> str | None:
    """The module version a `go install`ed binary was built from (its own
    `version` command may say "[not provided]")."""
    path = shutil.which(program)
    if not path or not shutil.which("go"):
        return None
    try:
        proc = subprocess.run(["go", "version", "-m", path], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in proc.stdout.splitlines():
        fields = line.split()
        if fields[:1] == ["mod"] and len(fields) >= 3:
            return fields[2]
    return None


def tool_version(argv: list[str]) -> str | None:
    """First line that names a version, or None if the tool is not installed."""
    if argv[0] in ("cosign", "grype"):
        found = go_module_version(argv[0])
        if found:
            return found
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [l.strip() for l in (proc.stdout + proc.stderr).splitlines() if any(c.isdigit() for c in l)]
    preferred = [l for l in lines if "version" in l.lower()] or lines
    if not preferred or proc.returncode != 0:
        return None
    return preferred[0].replace("GitVersion:", "").replace("Version:", "").strip()


def small_outputs(paths: Paths, b: Build) -> list[Path]:
    """Files hashed directly (reports, SBOMs, signatures, provenance, .sha256 files)."""
    out = []
    for kind in b.kinds:
        out += [paths.artifact(b, s) for s in REPORT_SUFFIXES.get(kind, ())]
    shas = sign.checksum_files(paths, b)
    out += shas
    if "sign" in b.kinds:
        out.append(paths.artifact(b, "-provenance.json"))
        for sha in shas:
            out += list(sign.blob_sig(sha))
    return out


def file_record(path: Path, sha: str | None = None) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha or sha256_file(path)}


def build_record(paths: Paths, b: Build) -> dict:
    f = b.flavor
    base = {"ref": b.base.ref, "digest": read_digest(paths.resolved(b.base.ident))}
    init = None
    if f.kairos_init_image:
        init = {"ref": f.kairos_init_image,
                "digest": read_digest(paths.resolved(convert.init_ident(b)))}
    files = []
    for kind in b.kinds:
        if kind not in naming.CHECKSUMMED:
            continue
        for name in naming.artifact_files(b.stem, kind):
            if name.endswith(".sha256"):
                continue
            artifact = paths.version_dir(f.version) / name
            sha_file = artifact.with_name(name + ".sha256")
            record = file_record(artifact, sha_file.read_text().split()[0])
            if "sign" in b.kinds:
                sig, bundle = sign.blob_sig(sha_file)
                record["signature"], record["bundle"] = sig.name, bundle.name
            files.append(record)
    files += [file_record(p) for p in small_outputs(paths, b)]
    return {
        "stem": b.stem,
        "flavor_file": f.path.name,
        "image": b.image,
        "image_id": read_digest(paths.image_id(b)),
        "image_digest": read_digest(paths.pushed(b)),
        "inputs": {
            "base": base,
            "kairos_init": init,
            "converter": f.converter,
            "flags": convert.kairos_init_flags(b) if f.converter == "kairos-init" else None,
            "builtin_script_sha256": None if f.converter == "kairos-init" else
            hashlib.sha256(convert.builtin_script(b).encode()).hexdigest(),
            "overlay_sha256": sign.overlay_digest(f.overlay) if f.overlay else None,
        },
        "outputs": files,
    }


def release_notes(version: str, builds: list[Build], records: list[dict], carriers: dict[str, str]) -> str:
    """outputs/<version>/RELEASE.md (pure): artifacts with size and sha256, k3s versions,
    cosign verify commands to paste, extraction commands of the -img carrier images."""
    k3s = sorted({b.k3s_version for b in builds if b.k3s_version})
    out = [f"# Kairos {version}", ""]
    out += ["## k3s versions", ""] + ([f"- {v}" for v in k3s] or ["- none (core images only)"]) + [""]
    out += ["## Artifacts", "", "| File | Size | sha256 |", "|---|---:|---|"]
    for record in records:
        for o in record["outputs"]:
            out.append(f"| `{o['name']}` | {o['size']} | `{o['sha256']}` |")
    out += ["", "## Images", ""]
    for b, record in zip(builds, records):
        out.append(f"- `{b.image}` = `{naming.pinned(b.image, record['image_digest'])}`")
    signed = [(b, r) for b, r in zip(builds, records) if "sign" in b.kinds]
    if signed:
        out += ["", "## Verify", "", "Signatures were made with cosign"
                + (" (key-based, no transparency log: hence `--insecure-ignore-tlog=true`)."
                   if not signed[0][0].flavor.sign.keyless else " (keyless)."), "", "```sh"]
        for b, record in signed:
            ref = naming.pinned(b.image, record['image_digest'])
            args = "--key cosign.pub --insecure-ignore-tlog=true" if not b.flavor.sign.keyless else \
                "--certificate-identity <identity> --certificate-oidc-issuer <issuer>"
            out.append(f"cosign verify {args} {ref}")
            if "sbom" in b.kinds:
                out.append(f"cosign verify-attestation {args} --type spdxjson {ref}")
            out.append(f"cosign verify-attestation {args} --type {sign.PROVENANCE_TYPE} {ref}")
            for o in record["outputs"]:
                if o.get("signature"):
                    out.append(f"cosign verify-blob {args} --signature {o['signature']} {o['name']}.sha256")
        out += ["sha256sum -c SHA256SUMS", "```"]
    if carriers:
        out += ["", "## Raw disk images as OCI images", "",
                "Each `.img` is also pushed as an image holding only that file; get it back with:", "", "```sh"]
        out += [carrier.extract_command(ref, name) for name, ref in sorted(carriers.items())]
        out += ["```"]
    return "\n".join(out) + "\n"


def manifest(paths: Paths, version: str, builds: list[Build]) -> None:
    records = [build_record(paths, b) for b in builds]
    tools = {name: tool_version(argv) for name, argv in TOOL_VERSIONS.items()}
    doc = {"version": version, "builds": records, "tools": {k: v for k, v in tools.items() if v}}
    out = paths.version_dir(version)
    write_text_atomic(out / "manifest.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")
    lines = sorted({f"{o['sha256']}  {o['name']}" for r in records for o in r["outputs"]},
                   key=lambda line: line.split("  ", 1)[1])
    write_text_atomic(out / "SHA256SUMS", "\n".join(lines) + "\n")
    carriers = {f"{b.stem}.img": carrier.carrier_ref(paths, b) for b in builds if "raw" in b.kinds}
    write_text_atomic(out / "RELEASE.md", release_notes(version, builds, records, carriers))


def tasks(ctx: Context):
    by_version: dict[str, list[Build]] = {}
    for b in ctx.builds:
        by_version.setdefault(b.flavor.version, []).append(b)
    for version, builds in sorted(by_version.items()):
        deps: list[str] = []
        for b in builds:
            deps += [str(ctx.paths.image_id(b)), str(ctx.paths.pushed(b))]
            if "raw" in b.kinds:
                deps.append(str(ctx.paths.carrier(b)))
            deps += [str(p) for p in small_outputs(ctx.paths, b)]
        out = ctx.paths.version_dir(version)
        yield {
            "name": version,
            "doc": f"manifest.json, SHA256SUMS and RELEASE.md of {len(builds)} build(s) of {version}",
            "actions": [action(manifest, ctx.paths, version, builds)],
            "file_dep": deps,
            "task_dep": [f"build:{b.stem}" for b in builds],
            "targets": [str(out / "manifest.json"), str(out / "SHA256SUMS"), str(out / "RELEASE.md")],
            "clean": True,
            "verbosity": 2,
        }
