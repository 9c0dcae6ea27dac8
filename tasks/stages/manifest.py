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
from ..epoch import build_epoch
from ..graph import Context, action, task
from ..kinds import CHECKSUM_SUFFIX, KINDS, PROGRAMS
from ..matrix import Build
from ..providers import PROVIDERS
from ..state import Paths, read_digest, sha256_file, signature_files, write_text_atomic
from . import boot, carrier, convert, sign

# tool -> argv printing its version
TOOL_VERSIONS = {name: list(p.version) for name, p in PROGRAMS.items() if p.version}
MANIFEST_FILES = ("manifest.json", "SHA256SUMS", "RELEASE.md")  # per version, in outputs/<version>/


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
    """Files hashed directly: reports and SBOMs (kinds without checksums), the `.sha256`
    files, and what the sign stage writes (provenance, blob signatures)."""
    out = [p for kind in b.kinds if not KINDS[kind].checksummed for p in paths.outputs_of(b, kind)]
    shas = paths.checksums(b)
    out += shas
    if "sign" in b.kinds:
        out += [paths.artifact(b, s) for s in KINDS["sign"].also_writes]
        for sha in shas:
            out += list(signature_files(sha))
    return out


def file_record(path: Path, sha: str | None = None) -> dict:
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha or sha256_file(path)}


def build_record(paths: Paths, b: Build) -> dict:
    f = b.flavor
    base = {"ref": b.base.ref, "digest": read_digest(paths.resolved(b.base.ident))}
    if b.base.mmdebstrap is not None:  # the package pin: its mirror (a dated snapshot), also apt's in the conversion
        base["mmdebstrap"] = b.base.mmdebstrap.options()
    init = None
    if f.kairos_init_image:
        init = {"ref": f.kairos_init_image,
                "digest": read_digest(paths.resolved(convert.init_ident(b)))}
    files = []
    for sha_file in paths.checksums(b):
        artifact = sha_file.with_name(sha_file.name.removesuffix(CHECKSUM_SUFFIX))
        record = file_record(artifact, sha_file.read_text().split()[0])
        if "sign" in b.kinds:
            record["signature"], record["bundle"] = (p.name for p in signature_files(sha_file))
        files.append(record)
    files += [file_record(p) for p in small_outputs(paths, b)]
    return {
        "stem": b.stem,
        "flavor_file": f.path.name,
        "image": b.image,
        "image_id": read_digest(paths.image_id(b)),
        "image_digest": read_digest(paths.pushed(b)),
        **b.provider_fields,
        "inputs": {
            "base": base,
            "kairos_init": init,
            "converter": f.converter,
            "flags": convert.kairos_init_flags(b) if f.converter == "kairos-init" else None,
            "builtin_scripts_sha256": None if f.converter == "kairos-init" else
            {name: hashlib.sha256(text.encode()).hexdigest() for name, text in convert.builtin_scripts(b).items()},
            "overlay_sha256": sign.overlay_digest(f.overlay) if f.overlay else None,
            "source_date_epoch": build_epoch(f),
            "raw_xz_level": f.raw_xz_level if "xz" in b.kinds else None,
        },
        "outputs": files,
        "boot": [{k: r[k] for k in ("artifact", "firmware", "passed", "seconds", "skipped") if k in r}
                 for r in boot.results(paths, b)] if "boot" in b.kinds else None,
    }


def release_notes(version: str, builds: list[Build], records: list[dict], carriers: dict[str, str]) -> str:
    """outputs/<version>/RELEASE.md (pure): artifacts with size and sha256, the providers (k3s, k0s)
    and their versions, the boot checks, cosign verify commands to paste, extraction commands of the
    -img carrier images."""
    shipped = [f"- {name} {v}" for name in PROVIDERS
               for v in sorted({b.provider_version for b in builds if b.provider == name})]
    out = [f"# Kairos {version}", ""]
    out += ["## Providers", ""] + (shipped or ["- none (core images only)"]) + [""]
    out += ["## Artifacts", ""]
    epochs = sorted({r["inputs"]["source_date_epoch"] for r in records if "inputs" in r})
    if epochs:
        out += [f"Dated SOURCE_DATE_EPOCH={', '.join(map(str, epochs))} (squashfs, ISO, raw disk images, UKI).", ""]
    levels = sorted({level for r in records if (level := r.get("inputs", {}).get("raw_xz_level")) is not None})
    if levels:
        out += [f"Raw disk images compressed with xz -{', -'.join(map(str, levels))} (`.img.xz`).", ""]
    bases = [r["inputs"]["base"] for r in records if "inputs" in r]
    mirrors = sorted({(m["suite"], m["mirror"]) for base in bases if (m := base.get("mmdebstrap"))})
    if mirrors:
        out += ["Packages (mmdebstrap bases, and apt in the conversion) from: "
                + ", ".join(f"{suite} at {mirror}" for suite, mirror in mirrors) + ".", ""]
    out += ["| File | Size | sha256 |", "|---|---:|---|"]
    for record in records:
        for o in record["outputs"]:
            out.append(f"| `{o['name']}` | {o['size']} | `{o['sha256']}` |")
    boots = [one for r in records for one in (r.get("boot") or [])]
    if boots:
        out += ["", "## Boot checks", "", "Each bootable artifact was booted in qemu to its login prompt.", "",
                "| Artifact | Firmware | Result |", "|---|---|---|"]
        for one in boots:
            result = f"skipped: {one['skipped']}" if one.get("skipped") else f"login prompt after {one['seconds']:.0f} s"
            out.append(f"| `{one['artifact']}` | {one['firmware']} | {result} |")
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
                f"Each raw disk image is also pushed as an image `FROM scratch` holding only "
                f"`{carrier.DIRECTORY}/<file>`. Unpack it with crane (Go module "
                f"`github.com/google/go-containerregistry/cmd/crane`) into `{carrier.DIRECTORY}/` in the current "
                f"directory and write it to a disk or SD card "
                f"(replace `{carrier.DEVICE}`), or take `{carrier.DIRECTORY}/` out with the docker CLI instead of crane:"]
        for name, ref in sorted(carriers.items()):
            lines = carrier.extract_commands(ref, name)
            out += ["", f"`{name}`:", "", "```sh", lines["crane"], lines["write"], "```", "", "```sh",
                    "# without crane", lines["docker"], "```"]
    return "\n".join(out) + "\n"


def manifest(paths: Paths, version: str, builds: list[Build]) -> None:
    records = [build_record(paths, b) for b in builds]
    tools = {name: tool_version(argv) for name, argv in TOOL_VERSIONS.items()}
    doc = {"version": version, "builds": records, "tools": {k: v for k, v in tools.items() if v}}
    manifest_json, sums, release = (paths.version_dir(version) / name for name in MANIFEST_FILES)
    write_text_atomic(manifest_json, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    lines = sorted({f"{o['sha256']}  {o['name']}" for r in records for o in r["outputs"]},
                   key=lambda line: line.split("  ", 1)[1])
    write_text_atomic(sums, "\n".join(lines) + "\n")
    carriers = {carrier.carried(paths, b).name: carrier.carrier_ref(paths, b) for b in builds if "raw" in b.kinds}
    write_text_atomic(release, release_notes(version, builds, records, carriers))


def tasks(ctx: Context):
    by_version: dict[str, list[Build]] = {}
    for b in ctx.builds:
        by_version.setdefault(b.flavor.version, []).append(b)
    for version, builds in sorted(by_version.items()):
        deps: list[Path] = []
        for b in builds:
            deps += [ctx.paths.image_id(b), ctx.paths.pushed(b)]
            if "raw" in b.kinds:
                deps.append(ctx.paths.carrier(b))
            deps += small_outputs(ctx.paths, b)
        out = ctx.paths.version_dir(version)
        yield task(version, f"manifest.json, SHA256SUMS and RELEASE.md of {len(builds)} build(s) of {version}",
                   action(manifest, ctx.paths, version, builds), file_dep=deps,
                   targets=[out / name for name in MANIFEST_FILES], task_dep=[f"build:{b.stem}" for b in builds],
                   # what it records that no file above carries
                   key=json.dumps({b.stem: build_epoch(b.flavor) for b in builds}, sort_keys=True))
