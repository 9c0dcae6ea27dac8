"""sign + verify: cosign signatures and attestations.

sign (key-based and offline by default: `--tlog-upload=false`; keyless is passed
through to cosign and needs network):
- `cosign sign` of the pushed image (by digest, in the flavor's registry);
- `cosign attest --type spdxjson` with the SBOM, and an in-toto SLSA v1
  provenance statement (`<stem>-provenance.json`) attested as `slsaprovenance1`;
- `cosign sign-blob` of every artifact's `.sha256` -> `<file>.sha256.sig` + `.bundle`.
The key password is read from the environment variable the flavor names
(default COSIGN_PASSWORD) and handed to cosign in its environment, never in argv.

verify (run on demand: `doit verify`): every artifact against its .sha256, every
blob signature, the image signature and its attestations; KAIROS_VERIFY_KEY
overrides the public key (to check that another key fails). Builds with the `uki`
artifact also get their EFI binaries checked against the trusted_boot keys' db.crt
(sbverify; see stages/uki.py), with or without cosign signing.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path

from .. import naming
from ..model import Flavor
from ..graph import Context, action, task
from ..kinds import CHECKSUM_SUFFIX, PROVENANCE, SBOM_SPDX
from ..matrix import Build
from ..run import CommandError, KairosError, UsageError, run, say
from ..state import Paths, atomic_path, read_digest, scratch_dir, sha256_file, signature_files, write_text_atomic
from . import convert, uki

STAGE_VERSION = 1
PROVENANCE_TYPE = "slsaprovenance1"
BUILD_TYPE = "https://kairos-doit.dev/build/v1"  # names this pipeline's build type
COSIGN_ENV = {"COSIGN_YES": "true"}


# --- pure builders ------------------------------------------------------------

def _key_args(flavor: Flavor) -> list[str]:
    return [] if flavor.sign.keyless else ["--key", str(flavor.sign.key)]


def _tlog_args(flavor: Flavor) -> list[str]:
    return [] if flavor.sign.keyless else ["--tlog-upload=false"]


def sign_argv(flavor: Flavor, ref: str) -> list[str]:
    return ["cosign", "sign", *_key_args(flavor), *_tlog_args(flavor), "--yes", ref]


def attest_argv(flavor: Flavor, ref: str, predicate: Path, kind: str) -> list[str]:
    return ["cosign", "attest", *_key_args(flavor), *_tlog_args(flavor), "--yes", "--type", kind,
            "--predicate", str(predicate), ref]


def sign_blob_argv(flavor: Flavor, blob: Path, sig: Path, bundle: Path) -> list[str]:
    return ["cosign", "sign-blob", *_key_args(flavor), *_tlog_args(flavor), "--yes",
            "--output-signature", str(sig), "--bundle", str(bundle), str(blob)]


def public_key(flavor: Flavor) -> Path | None:
    override = os.environ.get("KAIROS_VERIFY_KEY")
    if override:
        return Path(override)
    return flavor.sign.key.with_suffix(".pub") if flavor.sign.key else None


def verify_args(flavor: Flavor) -> list[str]:
    pub = public_key(flavor)
    if pub is None:  # keyless: the identity checks are the user's to pass through
        return []
    return ["--key", str(pub), "--insecure-ignore-tlog=true"]


def verify_argv(flavor: Flavor, ref: str) -> list[str]:
    return ["cosign", "verify", *verify_args(flavor), ref]


def verify_attestation_argv(flavor: Flavor, ref: str, kind: str) -> list[str]:
    return ["cosign", "verify-attestation", *verify_args(flavor), "--type", kind, ref]


def verify_blob_argv(flavor: Flavor, blob: Path, sig: Path) -> list[str]:
    return ["cosign", "verify-blob", *verify_args(flavor), "--signature", str(sig), str(blob)]


def provenance(b: Build, deps: list[dict], started: str, finished: str) -> dict:
    """A SLSA v1 provenance predicate (pure); cosign wraps it in an in-toto
    statement whose subject is the image digest."""
    f = b.flavor
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "flavor_file": f.path.name, "stem": b.stem, "image": b.image, "variant": b.variant,
                "arch": b.arch, "device": b.device, "version": f.version, **b.provider_fields,
                "converter": f.converter,
                "kairos_init_flags": convert.kairos_init_flags(b) if f.converter == "kairos-init" else None,
            },
            "internalParameters": {"convert_stage_version": convert.STAGE_VERSION},
            "resolvedDependencies": deps,
        },
        "runDetails": {
            "builder": {"id": BUILD_TYPE},
            "metadata": {"startedOn": started, "finishedOn": finished},
        },
    }


# --- actions --------------------------------------------------------------------

def cosign_env(flavor: Flavor) -> dict[str, str]:
    env = dict(COSIGN_ENV)
    if flavor.sign.keyless:
        return env
    name = flavor.sign.password_env
    if name not in os.environ:
        raise UsageError(f"sign: environment variable {name} (the password of {flavor.sign.key}) is not set; "
                         f"export it (set sign.password_env in {flavor.path} to use another variable)")
    env["COSIGN_PASSWORD"] = os.environ[name]
    return env



def dependencies(paths: Paths, b: Build) -> list[dict]:
    deps = []
    base = read_digest(paths.resolved(b.base.ident))
    deps.append({"uri": f"oci://{b.base.ref}", "digest": {"sha256": base.split(":", 1)[1]}})
    if b.flavor.kairos_init_image:
        init = read_digest(paths.resolved(convert.init_ident(b)))
        deps.append({"uri": f"oci://{b.flavor.kairos_init_image}", "digest": {"sha256": init.split(":", 1)[1]}})
    if b.flavor.overlay is not None:
        deps.append({"uri": f"file:{b.flavor.overlay.name}", "digest": {"sha256": overlay_digest(b.flavor.overlay)}})
    return deps


def overlay_digest(overlay: Path) -> str:
    """sha256 over the overlay listing (paths, modes, link targets) and file contents."""
    files, listing = convert.overlay_files(overlay)
    h = hashlib.sha256(json.dumps(listing).encode())
    for f in files:
        h.update(sha256_file(Path(f)).encode())
    return h.hexdigest()


def sign(paths: Paths, b: Build) -> None:
    f = b.flavor
    env = cosign_env(f)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat()
    digest = read_digest(paths.pushed(b))
    ref = naming.pinned(b.image, digest)
    say(f"    cosign sign {ref}")
    run(sign_argv(f, ref), env=env, what=f"cosign sign {b.stem}")
    if "sbom" in b.kinds:
        spdx = paths.artifact(b, SBOM_SPDX)
        say(f"    cosign attest --type spdxjson ({spdx.stat().st_size} bytes)")
        run(attest_argv(f, ref, spdx, "spdxjson"), env=env, what=f"cosign attest sbom {b.stem}")
    prov = paths.artifact(b, PROVENANCE)
    predicate = provenance(b, dependencies(paths, b), started,
                           datetime.datetime.now(datetime.timezone.utc).isoformat())
    write_text_atomic(prov, json.dumps(predicate, indent=2) + "\n")
    run(attest_argv(f, ref, prov, PROVENANCE_TYPE), env=env, what=f"cosign attest provenance {b.stem}")
    for sha in paths.checksums(b):
        sig, bundle = signature_files(sha)
        with atomic_path(sig) as tmp_sig, atomic_path(bundle) as tmp_bundle:
            run(sign_blob_argv(f, sha, tmp_sig, tmp_bundle), env=env, what=f"cosign sign-blob {sha.name}")
    write_text_atomic(paths.signed(b), digest + "\n")


def verify(paths: Paths, b: Build) -> None:
    """Check everything; report every failure (one line each) at once."""
    problems = []
    if "uki" in b.kinds:  # Secure Boot signatures of the UKI files, against the flavor's db.crt
        with scratch_dir(paths.tmp_dir(), f"{b.stem}-verify") as work:
            problems += uki.problems(paths, b, work)
    if "sign" in b.kinds:
        problems += cosign_problems(paths, b)
    if problems:
        who = f"{public_key(b.flavor) or 'the keyless identity'}" if "sign" in b.kinds else \
            f"{b.flavor.trusted_boot.keys / 'db.crt'}"
        raise KairosError(f"{len(problems)} problem(s) verifying {b.stem} with {who}:\n"
                          + "\n".join(f"  {p}" for p in problems))


def cosign_problems(paths: Paths, b: Build) -> list[str]:
    """Checksums, blob signatures, the image signature and attestations of a signed build."""
    f = b.flavor
    if not paths.signed(b).exists():
        raise KairosError(f"{b.stem} has not been signed yet: run `python3 -m doit sign:{b.stem}` first")
    problems = []
    for sha in paths.checksums(b):
        artifact = sha.with_name(sha.name.removesuffix(CHECKSUM_SUFFIX))
        try:
            want, name = sha.read_text().split()
        except (OSError, ValueError):
            problems.append(f"{sha.name}: missing or malformed")
            continue
        if not artifact.is_file():
            problems.append(f"{artifact.name}: missing")
        elif name != artifact.name or sha256_file(artifact) != want:
            problems.append(f"{artifact.name}: does not match {sha.name}")
        sig, _ = signature_files(sha)
        try:
            run(verify_blob_argv(f, sha, sig), what=f"verify {sha.name}")
        except CommandError:
            problems.append(f"{sha.name}: blob signature {sig.name} does not verify")
    digest = read_digest(paths.pushed(b))
    ref = naming.pinned(b.image, digest)
    checks = [(verify_argv(f, ref), f"image signature of {ref}")]
    if "sbom" in b.kinds:
        checks.append((verify_attestation_argv(f, ref, "spdxjson"), f"SBOM attestation of {ref}"))
    checks.append((verify_attestation_argv(f, ref, PROVENANCE_TYPE), f"provenance attestation of {ref}"))
    for argv, what in checks:
        try:
            run(argv, what=what)
        except CommandError:
            problems.append(f"{what} does not verify")
    if not problems:
        say(f"    verified {b.stem}: {len(paths.checksums(b))} checksum(s) and blob signature(s), "
            f"image signature, {len(checks) - 1} attestation(s)")
    return problems


def tasks(ctx: Context, kind: str):
    for b in ctx.builds:
        if kind not in b.kinds:
            continue
        f = b.flavor
        shas = ctx.paths.checksums(b)
        deps = [ctx.paths.image_id(b), ctx.paths.pushed(b)] + shas
        if "sbom" in b.kinds:
            deps.append(ctx.paths.artifact(b, SBOM_SPDX))
        if f.sign.key is not None:
            deps += [f.sign.key, f.sign.key.with_suffix(".pub")]
        key = json.dumps({"key": str(f.sign.key), "keyless": f.sign.keyless, "stage": STAGE_VERSION})
        targets = [ctx.paths.signed(b), ctx.paths.artifact(b, PROVENANCE)]
        targets += [p for sha in shas for p in signature_files(sha)]
        yield task(b.stem, f"cosign: sign {b.image}, attest SBOM and provenance, sign-blob every .sha256",
                   action(sign, ctx.paths, b), file_dep=deps, targets=targets, key=key)


def verify_tasks(ctx: Context):
    for b in ctx.builds:
        if "sign" not in b.kinds and "uki" not in b.kinds:
            continue
        # no dependency on sign: verifying must never re-sign what changed
        yield task(b.stem, f"verify checksums, blob signatures, image signature and attestations of {b.stem}",
                   action(verify, ctx.paths, b), uptodate=[False], clean=[])
