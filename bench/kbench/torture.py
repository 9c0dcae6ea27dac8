"""The torture benchmark behind bench/torture.py: a signed build SIGKILLed at seeded random moments
in every stage, resumed until it completes, and checked after every run.

One trial: make one stage's work necessary (a stage-specific change: a new overlay file, a new
cloud-config, an output deleted, the base image dropped from the engine), run `doit` and SIGKILL its
whole process group a random time after that stage's task line appears; resume, sometimes killed
again, until a run completes. After every killed run: no file under its final name mismatches its
`.sha256`. After the run that completes: nothing stale (every SHA256SUMS line holds, the squashfs
carries the trial's overlay marker, the ISO and raw image its cloud-config marker, the manifest the
pushed digest and overlay hash), `doit verify` passes, a no-op run executes no build task, and no
partial file or extraction container is left.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from tasks.kinds import CHECKSUM_SUFFIX
from tasks.stages.extract import state_tag
from tasks.state import TMP_MARK, read_digest, sha256_file
from tasks.tools.docker import EXTRACT_LABEL
from tests.harness import ALWAYS_RUN, LZ4, builtin_doc, flavor_text, standin_doc

from . import ROOT
from .common import BenchError, log, sh
from .flavors import write_if_changed
from .images import Images, engine
from .space import Space, doit

VERSION = "v3.1.0"
PASSWORD = "torture-only-password"
RUN_TIMEOUT = 3600          # one doit run; bounded
MAX_RESUMES = 3             # kills after the first one, per trial
RESUME_KILL_CHANCE = 0.35   # a resumed run is killed again with this probability
OVERLAY_PAYLOAD = 16 << 20  # random bytes in the overlay: the push uploads a layer of this size


@dataclasses.dataclass(frozen=True)
class Profile:
    """What is built and which stages a trial aims its kill at."""

    name: str
    stages: tuple[str, ...]
    markers_in: tuple[str, ...]   # artifact suffixes that must hold the cloud-config marker


PROFILES = {
    # the default flavor's build (mmdebstrap base, builtin converter, kernel/initrd/squashfs/iso,
    # sbom, trivy) signed, plus a generic raw image; lz4 and no raw compression keep trials short;
    # no boot checks (they write logs, not artifacts)
    "default": Profile("default", ("bootstrap", "seed", "pull", "convert", "push", "kernel", "initrd", "squashfs",
                                   "iso", "raw", "sbom", "trivy", "sign", "manifest"), (".iso", ".img")),
    # seconds per trial, for the test suite: kairos-init STAND-IN (not kairos-init) on a tiny base
    "small": Profile("small", ("pull", "convert", "push", "squashfs", "sbom", "trivy", "sign", "manifest"), ()),
}


def write_flavor(space: Space, profile: Profile, registry: str, images: Images) -> None:
    keys = space.flavors / "keys"
    if not (keys / "cosign.key").exists():
        keys.mkdir(parents=True, exist_ok=True)
        sh(["cosign", "generate-key-pair"], cwd=keys, env=dict(os.environ, COSIGN_PASSWORD=PASSWORD))
    common = dict(overlay="overlay", sign={"key": "keys/cosign.key"}, scan={"vulnerabilities": False})
    if profile.name == "default":
        write_if_changed(space.flavors / "cloud-config.yml.in", cloud_config("initial"))
        doc = builtin_doc("torture", {"mmdebstrap": {"suite": "bookworm"}}, f"{registry}/kairos",
                          ["kernel", "initrd", "squashfs", "iso", "raw", "sbom", "trivy", "sign"],
                          raw_generic=True, raw_compression="none", squashfs=LZ4,
                          cloud_config="cloud-config.yml.in", **common)
    else:
        doc = standin_doc("torture", images.tiny_base(), images.standin(), f"{registry}/kairos",
                          ["squashfs", "sbom", "trivy", "sign"], squashfs=LZ4, **common)
    if not (space.flavors / "overlay" / "etc" / "torture" / "marker").exists():
        write_overlay(space, "initial", random.Random(0))
    write_if_changed(space.flavors / "torture.yaml", flavor_text(doc))


def cloud_config(marker: str) -> str:
    return f"#cloud-config\nusers:\n  - name: kairos\n    passwd: kairos\n# torture-cc-{marker}\n"


def write_overlay(space: Space, marker: str, rng: random.Random) -> None:
    folder = space.flavors / "overlay" / "etc" / "torture"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "payload.bin").write_bytes(rng.randbytes(OVERLAY_PAYLOAD))
    (folder / "marker").write_text(f"torture-overlay-{marker}\n")


# ---------------------------------------------------------------- the killed doit process

@dataclasses.dataclass
class Outcome:
    rc: int | None                    # None: killed
    killed_in: str | None             # the task running when the kill landed
    lines: list[str]
    starts: list[tuple[float, str]]   # (seconds since the start, task) of each task line
    wall: float


def run_doit(space: Space, kill_at: tuple[str | None, float] | None) -> Outcome:
    """`doit` in its own process group. ``kill_at``: (stage, seconds) SIGKILLs the group that long
    after the stage's first task line (stage None: after the start). Bounded by RUN_TIMEOUT."""
    env = {**space.env(), "PYTHONUNBUFFERED": "1", "COSIGN_PASSWORD": PASSWORD}
    begin = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    lines: list[str] = []
    starts: list[tuple[float, str]] = []
    killed = threading.Event()
    cancel = threading.Event()

    def kill_after(delay: float) -> None:
        if not cancel.wait(delay) and proc.poll() is None:
            killed.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def arm(delay: float) -> None:
        threading.Thread(target=kill_after, args=(delay,), daemon=True).start()

    timeout = threading.Timer(RUN_TIMEOUT, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timeout.start()
    armed = bool(kill_at and kill_at[0] is None)
    if armed:
        arm(kill_at[1])
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(".  ") and not killed.is_set():
                task = line[3:].strip()
                starts.append((time.monotonic() - begin, task))
                if kill_at and not armed and task.split(":", 1)[0] == kill_at[0]:
                    armed = True
                    arm(kill_at[1])
        rc = proc.wait()
    finally:
        cancel.set()
        timeout.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.monotonic() - begin
    if killed.is_set():
        return Outcome(None, starts[-1][1] if starts else "start", lines, starts, wall)
    return Outcome(rc, None, lines, starts, wall)


def learn(spans: dict[str, float], outcome: Outcome) -> None:
    """Seconds each stage took in a completed run (from one task line to the next): the range the
    next kill aimed at that stage is drawn from."""
    marks = outcome.starts + [(outcome.wall, "end")]
    for (t0, task), (t1, _) in zip(marks, marks[1:]):
        stage = task.split(":", 1)[0]
        if not task.startswith(ALWAYS_RUN):
            spans[stage] = max(t1 - t0, 0.5)


# ---------------------------------------------------------------- checks

class Hashes:
    """sha256 of files, cached by (size, mtime_ns, inode): unchanged big files are hashed once."""

    def __init__(self):
        self.known: dict[Path, tuple[tuple[int, int, int], str]] = {}

    def __call__(self, path: Path) -> str:
        st = path.stat()
        ident = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = self.known.get(path)
        if hit and hit[0] == ident:
            return hit[1]
        self.known[path] = (ident, sha256_file(path))
        return self.known[path][1]


def corrupt_files(space: Space, hashes: Hashes) -> list[str]:
    """Files under a final name whose content does not match the `.sha256` beside them."""
    bad = []
    folder = space.outputs / VERSION
    for sha in sorted(folder.glob(f"*{CHECKSUM_SUFFIX}")) if folder.is_dir() else []:
        target = sha.with_name(sha.name.removesuffix(CHECKSUM_SUFFIX))
        if TMP_MARK in sha.name or not target.exists():
            continue
        if hashes(target) != (sha.read_text().split() or [""])[0]:
            bad.append(target.name)
    return bad


def leftovers(space: Space) -> list[str]:
    """Partial files and directories anywhere under outputs and state, and extraction containers
    of this state directory."""
    found = [str(p) for root in (space.outputs, space.state) if root.exists()
             for p in root.rglob(f"*{TMP_MARK}*")]
    owner = state_tag(space.paths)
    for c in engine().containers.list(all=True, filters={"label": EXTRACT_LABEL}):
        if c.labels.get(EXTRACT_LABEL, "").endswith(f":{owner}"):
            found.append(f"container {c.short_id} ({c.labels[EXTRACT_LABEL]})")
    return found


def contains(path: Path, text: str) -> bool:
    return subprocess.run(["grep", "-q", "-F", "-a", text, str(path)], stdin=subprocess.DEVNULL).returncode == 0


def stale_files(space: Space, profile: Profile, markers: dict[str, str], hashes: Hashes) -> list[str]:
    """After a completed run: what does not reflect the current inputs."""
    (b,) = space.builds()
    folder = space.outputs / VERSION
    stale = []
    sums = folder / "SHA256SUMS"
    for line in sums.read_text().splitlines() if sums.exists() else []:
        sha, name = line.split(maxsplit=1)
        if not (folder / name).exists() or hashes(folder / name) != sha:
            stale.append(f"{name} (SHA256SUMS)")
    if not sums.exists():
        stale.append("SHA256SUMS missing")
    squashfs = space.paths.artifact(b, ".squashfs")
    got = subprocess.run(["unsquashfs", "-cat", str(squashfs), "etc/torture/marker"], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL).stdout.strip()
    if got != f"torture-overlay-{markers['overlay']}":
        stale.append(f"{squashfs.name} (overlay marker {got!r})")
    for suffix in profile.markers_in:
        art = space.paths.artifact(b, suffix)
        if not contains(art, f"torture-cc-{markers['cc']}"):
            stale.append(f"{art.name} (cloud-config marker)")
    manifest = json.loads((folder / "manifest.json").read_text())
    (record,) = [r for r in manifest["builds"] if r["stem"] == b.stem]
    if json.dumps(record).find(read_digest(space.paths.pushed(b))) < 0:
        stale.append("manifest.json (pushed digest)")
    return stale


# ---------------------------------------------------------------- trials

@dataclasses.dataclass
class Totals:
    trials: int = 0
    kills: Counter = dataclasses.field(default_factory=Counter)   # stage -> kills landed there
    aimed: Counter = dataclasses.field(default_factory=Counter)   # stage -> trials aimed at it
    missed: int = 0          # aimed kills that never fired (the run ended first)
    resumes: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)
    stale: list[str] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)
    noop_ran: list[str] = dataclasses.field(default_factory=list)
    verify_failed: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    records: list[dict] = dataclasses.field(default_factory=list)   # one per trial


def dirty(space: Space, stage: str, trial: int, rng: random.Random, markers: dict[str, str]) -> str:
    """Make ``stage``'s work necessary; returns what was done (for the log)."""
    (b,) = space.builds()
    art = space.paths.artifact
    if stage in ("convert", "push"):
        markers["overlay"] = f"t{trial}-{rng.randbytes(4).hex()}"
        write_overlay(space, markers["overlay"], rng)
        return "new overlay"
    if stage in ("iso", "raw"):
        markers["cc"] = f"t{trial}-{rng.randbytes(4).hex()}"
        (space.flavors / "cloud-config.yml.in").write_text(cloud_config(markers["cc"]))
        return "new cloud-config"
    if stage == "bootstrap":
        gone = [space.paths.rootfs_tar(b.base.ident)]
    elif stage == "seed":
        gone = [space.paths.seeded(b.base.ident)]
    elif stage == "pull":
        # the base only: a kairos-init image may be shared (the test suite passes its own)
        subprocess.run(["docker", "rmi", "-f", b.base.ref], capture_output=True, stdin=subprocess.DEVNULL)
        gone = [p for p in (space.state / "pulled").glob("*")]
    elif stage == "sign":
        gone = [space.paths.signed(b)]
    elif stage == "manifest":
        gone = [space.outputs / VERSION / "manifest.json"]
    else:
        suffix = {"kernel": "-kernel", "initrd": "-initrd", "squashfs": ".squashfs",
                  "sbom": "-sbom.spdx.json", "trivy": "-trivy.json"}[stage]
        gone = [art(b, suffix)]
    for path in gone:
        path.unlink(missing_ok=True)
    return "deleted " + ", ".join(p.name for p in gone) if gone else "nothing to delete"


def trial(space: Space, profile: Profile, n: int, rng: random.Random, markers: dict[str, str],
          hashes: Hashes, totals: Totals, spans: dict[str, float]) -> None:
    """One trial: dirty one stage, kill in it, resume (sometimes killed again) until complete, check."""
    stage = profile.stages[rng.randrange(len(profile.stages))]
    what = dirty(space, stage, n, rng, markers)
    delay = rng.uniform(0, spans.get(stage, 5.0))
    totals.aimed[stage] += 1
    record = {"trial": n, "aimed": stage, "change": what, "delay": round(delay, 2), "killed_in": []}
    totals.records.append(record)
    started = time.monotonic()
    outcome = run_doit(space, (stage, delay))
    kills = 0
    while outcome.rc is None:
        kills += 1
        totals.kills[outcome.killed_in.split(":", 1)[0]] += 1
        record["killed_in"].append(outcome.killed_in)
        bad = corrupt_files(space, hashes)
        totals.corrupt += [f"trial {n}: {x}" for x in bad]
        log(f"  trial {n}: {what}; aimed at {stage} +{delay:.1f} s; killed in {outcome.killed_in} "
            f"after {outcome.wall:.1f} s; corrupt: {', '.join(bad) or 'none'}")
        again = kills <= MAX_RESUMES and rng.random() < RESUME_KILL_CHANCE
        delay = rng.uniform(1, 30)
        totals.resumes += 1
        outcome = run_doit(space, (None, delay) if again else None)
        stage, what = ("any", "resumed") if again else (stage, "resumed")
    if outcome.rc != 0:
        raise BenchError(f"trial {n}: doit failed ({outcome.rc}) without being killed:\n"
                         + "\n".join(outcome.lines[-40:]))
    if kills == 0:
        totals.missed += 1
    learn(spans, outcome)
    totals.seconds += time.monotonic() - started
    after = [f"trial {n}: {x}" for x in stale_files(space, profile, markers, hashes)]
    left = [f"trial {n}: {x}" for x in leftovers(space)]
    verify = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "verify"],
                            env={**space.env(), "COSIGN_PASSWORD": PASSWORD}, cwd=ROOT, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL)
    noop = doit(space, env={"COSIGN_PASSWORD": PASSWORD})
    totals.stale += after
    totals.leftovers += left
    totals.noop_ran += [f"trial {n}: {t}" for t in noop.build_actions]
    if verify.returncode != 0:
        totals.verify_failed.append(f"trial {n}: {(verify.stdout + verify.stderr).strip()[-500:]}")
    totals.trials += 1
    log(f"  trial {n}: complete after {kills} kill(s) (aimed at {record['aimed']}), "
        f"{time.monotonic() - started:.0f} s; stale: "
        f"{', '.join(after) or 'none'}; leftovers: {', '.join(left) or 'none'}; verify rc {verify.returncode}; "
        f"no-op ran {', '.join(noop.build_actions) or 'nothing'}")


def current_markers(space: Space) -> dict[str, str]:
    """The markers the flavor files hold now (a kept torture dir continues where it stopped)."""
    overlay = (space.flavors / "overlay" / "etc" / "torture" / "marker").read_text().strip()
    cc = space.flavors / "cloud-config.yml.in"
    return {"overlay": overlay.removeprefix("torture-overlay-"),
            "cc": cc.read_text().rsplit("torture-cc-", 1)[1].strip() if cc.exists() else ""}


def prepare(space: Space, profile: Profile, registry: str, images: Images) -> dict[str, float]:
    """Write the flavor, bring it up to date (the first time: the whole build), and return the
    seconds per stage of that run."""
    write_flavor(space, profile, registry, images)
    log(f"torture: bringing {space.flavors} up to date (the first time: the whole {profile.name} build)")
    first = run_doit(space, None)
    if first.rc != 0:
        raise BenchError("the first run failed:\n" + "\n".join(first.lines[-40:]))
    spans: dict[str, float] = {}
    learn(spans, first)
    log(f"  {len([t for _, t in first.starts if not t.startswith(ALWAYS_RUN)])} build tasks ran in {first.wall:.0f} s")
    return spans


def run(space: Space, profile: Profile, registry: str, images: Images, trials: int, seed: int,
        progress=lambda totals: None) -> Totals:
    """``trials`` trials; ``progress(totals)`` after each (the figures so far survive an interruption)."""
    spans = prepare(space, profile, registry, images)
    markers = current_markers(space)
    rng = random.Random(seed)
    hashes, totals = Hashes(), Totals()
    for n in range(1, trials + 1):
        trial(space, profile, n, rng, markers, hashes, totals, spans)
        progress(totals)
    return totals


def report(totals: Totals, profile: Profile, seed: int) -> str:
    stages = [s for s in profile.stages] + sorted(set(totals.kills) - set(profile.stages))
    per_stage = ", ".join(f"{s} {totals.kills[s]}/{totals.aimed[s]}" for s in stages)
    kills = sum(totals.kills.values())
    out = [f"torture: profile {profile.name}, seed {seed}",
           f"trials              {totals.trials} ({totals.seconds / 60:.0f} min of doit runs)",
           f"kills               {kills} (+{totals.resumes} resumed runs; {totals.missed} trials whose aimed kill "
           "came after the run had ended)",
           f"kills per stage     {per_stage}   (kills landed / trials aimed there)",
           f"corrupt files       {len(totals.corrupt)}" + "".join(f"\n  {x}" for x in totals.corrupt),
           f"stale files         {len(totals.stale)}" + "".join(f"\n  {x}" for x in totals.stale),
           f"leftovers           {len(totals.leftovers)}" + "".join(f"\n  {x}" for x in totals.leftovers),
           f"no-op build tasks   {len(totals.noop_ran)}" + "".join(f"\n  {x}" for x in totals.noop_ran),
           f"verify failures     {len(totals.verify_failed)}" + "".join(f"\n  {x}" for x in totals.verify_failed)]
    return "\n".join(out)


def failed(totals: Totals) -> bool:
    return bool(totals.corrupt or totals.stale or totals.leftovers or totals.noop_ran or totals.verify_failed)


def as_json(totals: Totals, profile: Profile, seed: int) -> dict:
    return {"profile": profile.name, "seed": seed, "trials": totals.trials, "kills": dict(totals.kills),
            "aimed": dict(totals.aimed), "missed": totals.missed, "resumes": totals.resumes,
            "corrupt": totals.corrupt, "stale": totals.stale, "leftovers": totals.leftovers,
            "noop_ran": totals.noop_ran, "verify_failed": totals.verify_failed, "seconds": totals.seconds,
            "records": totals.records}
