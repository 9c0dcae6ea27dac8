"""rebuild-check: build the selection twice from scratch and compare the artifacts byte for byte.

`python -m tasks rebuild-check` runs `doit [TASK ...]` twice, each run in a new state and outputs
directory (under --work) and with KAIROS_NO_CACHE=1, so the conversion reads no build cache and
every step runs again; both runs see the same flavors, the same SOURCE_DATE_EPOCH and the same
package mirror. It then prints one row per file the first run wrote into outputs/:

  identical        the second run wrote the same bytes
  DIFFERENT        other bytes; the row names the first differing file inside (diffoscope, Debian
                   package diffoscope-minimal, when installed), else the first differing byte
  MISSING          the second run did not write it
  known exception  a file that cannot be identical, and why (listed below); never counted as a pass

Exit status 0 when every row is identical or a known exception, 1 otherwise (or when a run
fails), 2 for bad usage.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .kinds import BLOB_SIGNATURE_SUFFIXES, CHECKSUM_SUFFIX, KINDS
from .matrix import Build
from .run import UsageError, say
from .stages.convert import NO_CACHE
from .state import Paths, read_digest, sha256_file
from .tools import docker

IDENTICAL, DIFFERENT, MISSING, EXCEPTION = "identical", "DIFFERENT", "MISSING", "known exception"

# image digests: the converted image's layers keep the conversion's file times (docker 20.10's
# BuildKit cannot rewrite them; BuildKit >= 0.13 has rewrite-timestamp), so two conversions of the
# same inputs give the same file system (the squashfs shows it) under other image digests
IMAGE_DIGEST = "names the converted image by its digest, and two conversions give other digests"
# artifact kind -> why its files cannot be identical
EXCEPTIONS: dict[str, str] = {
    "sbom": f"{IMAGE_DIGEST}; syft also stamps its creation time and a random SPDX document namespace",
    "trivy": f"{IMAGE_DIGEST}; trivy also stamps the scan time (CreatedAt)",
    "grype": f"{IMAGE_DIGEST}; grype also stamps the scan time",
    "sign": "cosign's ECDSA signatures use a random nonce: each signing gives other bytes "
            "(`python3 -m doit verify` checks them)",
    "boot": "a record of one boot in qemu (times, console output), not a release artifact",
}
# version-level files (not of one build) -> why
AGGREGATES: dict[str, str] = {
    "manifest.json": f"{IMAGE_DIGEST}; it also lists the SBOM, scan and signature files' checksums",
    "RELEASE.md": f"{IMAGE_DIGEST} (in its pull and extract commands)",
    "SHA256SUMS": "it lists the checksums of the known exceptions as well",
}


@dataclass(frozen=True)
class Row:
    """One output file compared: its path under outputs/, the artifact kind it belongs to (None:
    a version-level file), the verdict and what explains it."""

    name: str
    kind: str | None
    verdict: str
    sha256: str
    detail: str = ""


def exceptions_text() -> str:
    """The known exceptions, for --help (pure)."""
    lines = ["known exceptions:"]
    lines += [f"  {kind}: {why}" for kind, why in EXCEPTIONS.items()]
    lines += [f"  {name}: {why}" for name, why in AGGREGATES.items()]
    return "\n".join(lines)


def kind_of(builds: list[Build]) -> dict[str, str]:
    """File name -> artifact kind, for every file (checksums included) the builds write (pure);
    the sign stage's files: its provenance and the signature and bundle of every `.sha256`."""
    kinds = {name: kind for b in builds for kind in b.kinds for name in KINDS[kind].files(b.stem)}
    for b in builds:
        if "sign" in b.kinds:
            kinds.update({b.stem + s: "sign" for s in KINDS["sign"].also_writes})
            kinds.update({name + s: "sign" for name in list(kinds) if name.startswith(b.stem)
                          and name.endswith(CHECKSUM_SUFFIX) for s in BLOB_SIGNATURE_SUFFIXES})
    return kinds


def exception_of(name: str, kind: str | None) -> str | None:
    """Why ``name`` (of ``kind``) cannot be identical, or None (pure). A checksum file shares its
    artifact's fate."""
    if kind is not None:
        return EXCEPTIONS.get(kind)
    return AGGREGATES.get(name)


def first_difference(a: Path, b: Path) -> int | None:
    """The offset of the first differing byte of two files (the shorter one's length when one is a
    prefix of the other); None when they are equal."""
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                return offset + same
            if not x:
                return None
            offset += len(x)


INNER = re.compile(r"^[│ ]*├── (.+)$")
# diffoscope sections that are not files: listings, stat output, file(1) and archive metadata
NOT_A_FILE = re.compile(r"^(file list|stat |filetype from|.*metadata|zipinfo|isoinfo|xxd|strings)")


def inner_names(report: str) -> list[str]:
    """The names of the files inside that diffoscope's text report shows as different, in its
    order (pure)."""
    names = [m.group(1).strip() for line in report.splitlines() if (m := INNER.match(line))]
    return [n for n in names if not NOT_A_FILE.match(n)]


def explain(a: Path, b: Path, log: Path, timeout: int = 900) -> str:
    """What differs between ``a`` and ``b``: the first differing file inside according to
    diffoscope (its whole report goes to ``log``), else the first differing byte."""
    offset = first_difference(a, b)
    where = f"first differing byte at offset {offset}"
    if shutil.which("diffoscope") is None:
        return f"{where} (install diffoscope-minimal to name the file inside)"
    try:
        proc = subprocess.run(["diffoscope", "--no-progress", "--text", str(log), "--exclude-directory-metadata",
                               "no", str(a), str(b)], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{where} (diffoscope ran over {timeout}s)"
    report = log.read_text(errors="replace") if log.exists() else ""
    names = inner_names(report)
    if proc.returncode not in (0, 1) or not names:
        return f"{where} (diffoscope: {names[0] if names else 'no file named'}; report {log})"
    return f"first difference inside: {' -> '.join(names[:3])} (diffoscope report {log})"


def compare(first: Path, second: Path, kinds: dict[str, str], reports: Path) -> list[Row]:
    """One row per file under ``first`` (an outputs directory), against ``second``."""
    rows = []
    for path in sorted(p for p in first.rglob("*") if p.is_file()):
        rel = str(path.relative_to(first))
        kind = kinds.get(path.name)
        digest = sha256_file(path)
        other = second / rel
        why = exception_of(path.name, kind)
        if not other.is_file():
            rows.append(Row(rel, kind, MISSING, digest, "the second run did not write it"))
        elif sha256_file(other) == digest:
            rows.append(Row(rel, kind, IDENTICAL, digest))
        elif why is not None:
            rows.append(Row(rel, kind, EXCEPTION, digest, why))
        else:
            reports.mkdir(parents=True, exist_ok=True)
            rows.append(Row(rel, kind, DIFFERENT, digest, explain(path, other, reports / f"{path.name}.diffoscope.txt")))
    return rows


def render(rows: list[Row]) -> str:
    """The table rebuild-check prints (pure)."""
    width = max([len("artifact")] + [len(r.name) for r in rows])
    lines = [f"{'artifact':<{width}}  {'sha256 (run 1)':<16}  verdict"]
    for r in rows:
        verdict = r.verdict + (f" ({r.kind})" if r.verdict == EXCEPTION and r.kind else "")
        lines.append(f"{r.name:<{width}}  {r.sha256[:16]:<16}  {verdict}" + (f": {r.detail}" if r.detail else ""))
    counts = {v: sum(r.verdict == v for r in rows) for v in (IDENTICAL, DIFFERENT, MISSING, EXCEPTION)}
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items()))
    return "\n".join(lines) + "\n"


def passed(rows: list[Row]) -> bool:
    return bool(rows) and all(r.verdict in (IDENTICAL, EXCEPTION) for r in rows)


def doit_argv(targets: list[str]) -> list[str]:
    """The doit run of one clean build (pure)."""
    return [sys.executable, "-m", "doit", *targets]


def run_paths(root: Path) -> Paths:
    """The state and outputs directories of the clean build into ``root`` (pure)."""
    return Paths(root / "state", root / "outputs")


def run_env(base: dict[str, str], root: Path, flavors: str | None, shard: str | None) -> dict[str, str]:
    """The environment of one clean build into ``root`` (pure): its own state and outputs, no
    build cache; the selection pinned when given."""
    paths = run_paths(root)
    env = dict(base, KAIROS_STATE=str(paths.state), KAIROS_OUTPUTS=str(paths.outputs), **{NO_CACHE: "1"})
    for name, value in (("KAIROS_FLAVORS", flavors), ("KAIROS_SHARD", shard)):
        if value:
            env[name] = value
    return env


TASK_LINE = re.compile(r"^(\.  |-- )\S")


def build_once(n: int, project: Path, root: Path, targets: list[str], env: dict[str, str]) -> bool:
    """Run one clean build into ``root`` with ``env``; its whole output goes to root/doit.log, its
    task lines (and the time the run took) to the terminal. False (after saying why) when doit fails."""
    root.mkdir(parents=True)
    log = root / "doit.log"
    say(f"run {n} of 2: doit {' '.join(targets) or '(every task)'} into {root} (log: {log})")
    started = time.monotonic()
    with open(log, "w", buffering=1) as out:  # line-buffered: the log follows the run
        proc = subprocess.Popen(doit_argv(targets), cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if TASK_LINE.match(line):
                say(f"  run {n}: {line.rstrip()}")
        rc = proc.wait()
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").rstrip().splitlines()[-15:])
        print(f"error: rebuild-check: run {n} failed (doit exit {rc}); its log: {log}\n{tail}", file=sys.stderr)
        return False
    say(f"run {n}: done in {time.monotonic() - started:.0f} s")
    return True


def drop_superseded_images(builds: list[Build], first: Path, second: Path) -> list[str]:
    """Remove from the engine the images the first run converted for ``builds`` that the second
    run's did not replace under the same ID (the second run took their tags: they are left
    untagged); returns the IDs removed. An image the engine cannot remove (in use) stays."""
    def ids(run_root: Path) -> set[str]:
        files = [run_paths(run_root).image_id(b) for b in builds]
        return {read_digest(f) for f in files if f.exists()}

    removed = []
    for image in sorted(ids(first) - ids(second)):
        try:
            docker.client().images.remove(image, noprune=False)
            removed.append(image)
        except Exception:  # noqa: BLE001 - in use or gone: nothing to clean
            pass
    return removed


def rebuild_check(project: Path, builds: list[Build], targets: list[str], flavors: str | None, shard: str | None,
                  work: Path | None, keep: bool, json_out: Path | None) -> int:
    """Two clean builds, the table; the exit status (module docstring)."""
    root = Path(work) if work else Path(tempfile.mkdtemp(prefix="kairos-rebuild-check-", dir="/var/tmp"))
    runs = [root / "run1", root / "run2"]
    taken = [r for r in runs if r.exists()]
    if taken:
        raise UsageError(f"--work {root}: {taken[0]} exists; give a new directory (or remove it)")
    try:
        for n, run_root in enumerate(runs, 1):
            if not build_once(n, project, run_root, targets, run_env(dict(os.environ), run_root, flavors, shard)):
                keep = True  # what failed stays for a look
                return 1
        rows = compare(runs[0] / "outputs", runs[1] / "outputs", kind_of(builds), root / "diffoscope")
        for image in () if keep else drop_superseded_images(builds, *runs):
            say(f"rebuild-check: removed run 1's converted image {image} (run 2's holds its tag)")
        sys.stdout.write(render(rows))
        if json_out is not None:
            json_out.write_text(json.dumps({"passed": passed(rows), "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
        if not rows:
            say("rebuild-check: the first run wrote no outputs; name tasks that build artifacts")
        return 0 if passed(rows) else 1
    finally:
        if keep:
            say(f"rebuild-check: both runs kept under {root}")
        else:
            for run_root in runs:
                shutil.rmtree(run_root, ignore_errors=True)
            if not work and not (root / "diffoscope").exists():  # the reports the table names stay
                shutil.rmtree(root, ignore_errors=True)
