"""The rows of the table: noop and selective on the synthetic matrix; parallel, stages and
reuse on the two real builds. Each returns a Row; BenchError when the wrong tasks run."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from tasks.matrix import Build
from tasks.state import read_digest
from tests.harness import ALWAYS_RUN, second_engine

from .by_hand import STAGES
from .common import BenchError, Row, log, median, sh, timed
from .flavors import FIRST_CONVERSION, PROBE, PROBE_FILE, VERSION
from .space import Space, doit, expect_ran, run_step_cached, unlink_outputs


NOOP_GOAL_S = 2.0
STAGE_GOAL = 1.1


def bench_noop(space: Space, builds: list[Build], repeat: int) -> Row:
    runs = []
    for _ in range(repeat):
        run = doit(space)
        if run.build_actions:
            raise BenchError(f"no-op run executed build tasks: {run.build_actions}")
        runs.append(run)
    wall = median([r.wall for r in runs])
    tasks = runs[0].checked
    js = doit(space, json_report=True)  # where the time goes: the always-run tasks
    always = sum(v for k, v in js.elapsed.items() if k.startswith(ALWAYS_RUN))
    result = (f"{wall:.2f} s wall, {tasks} tasks ({len(runs[0].executed)} always-run: preflight+resolve "
              f"{always:.2f} s), {wall / tasks * 1000:.1f} ms/task, 0 build actions")
    return Row("noop", f"no-op, {len(builds)} builds", result, f"< {NOOP_GOAL_S:g} s",
               "yes" if wall < NOOP_GOAL_S else "no",
               {"wall": wall, "tasks": tasks, "always_run_s": always, "build_actions": [],
                "executed": runs[0].executed, "builds": len(builds)})


def compact(tasks: list[str]) -> str:
    """`convert:S, push:S, manifest:V` -> `convert/push:S, manifest:V` (order kept)."""
    by_stem: dict[str, list[str]] = {}
    for t in tasks:
        stage, _, stem = t.partition(":")
        by_stem.setdefault(stem, []).append(stage)
    return ", ".join(f"{'/'.join(stages)}:{stem}" for stem, stages in by_stem.items())


def bench_selective(space: Space, builds: list[Build], repeat: int) -> Row:
    probe = next(b for b in builds if b.flavor.flavor == PROBE)
    expected = [f"convert:{probe.stem}", f"push:{probe.stem}", f"squashfs:{probe.stem}", f"manifest:{VERSION}"]
    conf = space.flavors / PROBE_FILE
    original = conf.read_text()
    walls, ran, total = [], [], 0
    for _ in range(repeat):
        try:
            conf.write_text(original + "changed by bench/run.py\n")
            run = doit(space)
        finally:
            conf.write_text(original)
        walls.append(run.wall)
        ran, total = run.build_actions, run.checked
        log(f"  selective: {len(ran)} of {total} tasks ran in {run.wall:.1f} s; restoring")
        doit(space)  # back to the original overlay: the bench dir is up to date again
    ok = sorted(ran) == sorted(expected)
    result = f"{len(ran)} of {total} tasks ran in {median(walls):.1f} s: {compact(ran)}"
    return Row("selective", "selective rebuild (1 overlay file, 1 build)", result,
               "that build's convert/push/squashfs + manifest", "yes" if ok else "no",
               {"wall": median(walls), "tasks": total, "executed": ran, "expected": expected})


def bench_parallel(space: Space, a: Build, b: Build, repeat: int) -> Row:
    targets = [f"iso:{a.stem}", f"iso:{b.stem}"]
    expected = [f"{k}:{x.stem}" for x in (a, b) for k in ("kernel", "initrd", "squashfs", "iso")]
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeat):
        for n in (1, 2):
            unlink_outputs(*(space.paths.artifact(x, s) for x in (a, b)
                             for s in ("-kernel", "-initrd", ".squashfs", ".iso")))
            run = doit(space, "-n", str(n), *targets)
            expect_ran(run, expected, f"doit -n {n}")
            times[n].append(run.wall)
            log(f"  doit -n {n}: {len(run.build_actions)} build tasks in {run.wall:.1f} s")
    one, two = median(times[1]), median(times[2])
    result = f"-n 1 {one:.1f} s, -n 2 {two:.1f} s, speedup {one / two:.2f}x ({len(expected)} tasks, 2 builds)"
    return Row("parallel", "doit -n 2 vs -n 1 (2 builds: kernel, initrd, squashfs, iso)", result, "-", "-",
               {"n1": one, "n2": two, "speedup": one / two, "executed": expected})


def settle() -> None:
    """`sync` before a timed stage or by-hand run: both start with no dirty data to write back.
    Without it the side that runs after the other's big write pays for that writeback (the same
    grub-mkrescue command took 0.6 s to 1.6 s here depending on it)."""
    sh(["sync"])


def bench_stage(space: Space, b: Build, stage: str, repeat: int) -> Row:
    suffix, by_hand, hand_desc = STAGES[stage]
    target = f"{stage}:{b.stem}"
    work = space.state.parent / "by-hand"
    process, task, hand = [], [], []

    def staged() -> None:
        unlink_outputs(space.paths.artifact(b, suffix))
        settle()
        run = doit(space, target, json_report=True)
        expect_ran(run, [target], f"doit {target}")
        process.append(run.wall)
        task.append(run.elapsed[target])

    def manual() -> None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        settle()
        try:
            hand.append(timed(lambda: by_hand(space.paths, b, work)))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    for n in range(repeat):
        # alternate which side goes first: on this VM the page cache and writeback state left
        # by the previous big write swing one ISO build between 0.9 s and 1.9 s
        for side in ((staged, manual) if n % 2 == 0 else (manual, staged)):
            side()
        log(f"  {stage}: doit {process[-1]:.1f} s (task {task[-1]:.1f} s), by hand {hand[-1]:.1f} s")
    p, t, h = median(process), median(task), median(hand)
    result = (f"doit {p:.1f} s, task {t:.1f} s, by hand {h:.1f} s: process {p / h:.2f}, task {t / h:.2f} "
              f"(by hand = {hand_desc})")
    return Row(f"stage-{stage}", f"{stage} stage vs by hand", result, f"task <= {STAGE_GOAL:g}",
               "yes" if t / h <= STAGE_GOAL else "no",
               {"process": p, "task": t, "hand": h, "process_ratio": p / h, "task_ratio": t / h})


def first_conversion(root: Path) -> tuple[float | None, str]:
    """The first conversion of this bench dir (recorded by prepare_real): seconds, and a phrase."""
    record = root / "real" / FIRST_CONVERSION
    first = json.loads(record.read_text()) if record.exists() else None
    text = (f"first conversion in this bench dir {first['elapsed']:.0f} s "
            f"({'also a cache hit' if first['cached'] else 'cold: apt-get, initramfs'})"
            if first else "first conversion: not recorded")
    return first, text


def fresh_conversions(root: Path, name: str, real: Space, a: Build, repeat: int, engine=contextlib.nullcontext):
    """`doit convert:<A>` ``repeat`` times, each in a fresh state directory under root/<name> (removed
    afterwards), with the environment ``engine()`` yields (None: the machine's engine). Returns the
    walls, the convert task's times, the tasks that ran, whether BuildKit took every RUN step from a
    cache, and whether the image ID equals the kept state's."""
    fresh = Space(real.flavors, root / name / "state", root / name / "outputs")
    target = f"convert:{a.stem}"
    walls, task, ran, cached, same = [], [], [], False, False
    try:
        for _ in range(repeat):
            shutil.rmtree(fresh.state.parent, ignore_errors=True)
            with engine() as env:
                run = doit(fresh, target, json_report=True, env=env)
            if target not in run.executed:
                raise BenchError(f"fresh state: {target} did not run ({run.executed})")
            walls.append(run.wall)
            task.append(run.elapsed[target])
            ran = run.executed
            cached = run_step_cached(run.outputs.get(target, ""))
            same = read_digest(fresh.paths.image_id(a)) == read_digest(real.paths.image_id(a))
    finally:
        shutil.rmtree(fresh.state.parent, ignore_errors=True)
    return walls, task, ran, cached, same


def bench_reuse(root: Path, real: Space, a: Build, repeat: int) -> Row:
    """convert:<A> with the same flavor file in a fresh state directory."""
    walls, task, ran, cached, same = fresh_conversions(root, "reuse", real, a, repeat)
    first, first_text = first_conversion(root)
    result = (f"{median(walls):.1f} s (convert task {median(task):.1f} s; ran "
              f"{', '.join(t.split(':')[0] for t in ran)}; "
              f"BuildKit {'cache hit' if cached else 'NO cache hit'}, same image ID: {'yes' if same else 'no'}); "
              f"{first_text}")
    return Row("reuse", "conversion reuse (fresh state, warm layer cache)", result, "-", "-",
               {"wall": median(walls), "task": median(task), "executed": ran, "cached": cached,
                "same_image": same, "first": first and first["elapsed"]})


@contextlib.contextmanager
def _empty_engine():
    with second_engine() as host:
        yield {"DOCKER_HOST": host}


def bench_regcache(root: Path, real: Space, a: Build, repeat: int) -> Row:
    """convert:<A> in a fresh state directory on a second, empty engine (a new CI runner): BuildKit
    takes the steps from the inline cache of A's last push (cache_from: own)."""
    doit(real, f"push:{a.stem}")  # the cache source: A's image in the registry
    walls, task, _, cached, same = fresh_conversions(root, "regcache", real, a, repeat, _empty_engine)
    first, first_text = first_conversion(root)
    result = (f"{median(walls):.1f} s (convert task {median(task):.1f} s; every RUN step "
              f"{'CACHED' if cached else 'NOT cached'}, same image ID: {'yes' if same else 'no'}); {first_text}")
    return Row("regcache", "conversion on an empty engine, cache from the registry", result, "-", "-",
               {"wall": median(walls), "task": median(task), "cached": cached, "same_image": same,
                "first": first and first["elapsed"]})
