"""The pipeline spine on the real Docker engine and the local registry:
resolve -> pull -> convert -> push -> kernel/initrd/squashfs, incremental rebuilds.

Tests in this module share one workspace and run in file order; every test that
changes an input first checks that the previous state is fully up to date.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from tasks.config import load_flavors
from tasks.matrix import expand
from tasks.state import safe_id

from tests.harness import Workspace, buildkit_steps, copy_flavors, step_layers, write_flavor

pytestmark = pytest.mark.integration


def builds(ws: Workspace) -> dict[str, object]:
    """flavor name -> list of builds, from the workspace's flavor files."""
    out: dict[str, list] = {}
    for b in expand(load_flavors([ws.flavors])):
        out.setdefault(b.flavor.path.stem, []).append(b)
    return out


def chain(b, kinds=None) -> set[str]:
    """The tasks one build's conversion drags along."""
    return {f"convert:{b.stem}", f"push:{b.stem}"} | {f"{k}:{b.stem}" for k in (kinds or b.kinds)}


def assert_noop(ws: Workspace) -> None:
    again = ws.doit()
    assert again.rc == 0, again.err
    assert again.build_actions == set(), f"expected nothing to rebuild, ran {again.build_actions}"


def cpio_head(data: bytes) -> bytes:
    """First bytes of an initramfs after undoing gzip or zstd compression."""
    if data[:2] == b"\x1f\x8b":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:65536])[:6]
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True).stdout[:6]
    return data[:6]


def run_in_image(client, image: str, *cmd: str) -> str:
    return client.containers.run(image, list(cmd), remove=True).decode()


def test_first_run_builds_every_artifact(workspace, first_run, engine):
    by_flavor = builds(workspace)
    out_dir = workspace.outputs / "v3.1.0"
    expected = set()
    for flavor_builds in by_flavor.values():
        for b in flavor_builds:
            for names in b.files().values():
                expected.update(names)
            assert f"convert:{b.stem}" in first_run.executed
            # pushed under the conventional tag; the registry has what the state recorded
            pushed = (workspace.state / "pushed" / f"{b.stem}.digest").read_text().strip()
            assert engine.images.get_registry_data(b.image).id == pushed
    produced = {p.name for p in out_dir.iterdir()}
    assert produced == expected | {"manifest.json", "SHA256SUMS", "RELEASE.md"}  # and no partial files
    for name in expected:
        if name.endswith(".sha256"):
            digest, fname = (out_dir / name).read_text().split()
            assert fname == name[: -len(".sha256")]
            assert hashlib.sha256((out_dir / fname).read_bytes()).hexdigest() == digest


# what the stand-in must have been given per provider of a build (flavor a lists one k3s and one k0s version)
PROVIDER_FLAGS = {None: "", "k3s": " -p k3s --provider-k3s-version v1.28.2+k3s1",
                  "k0s": " -p k0s --provider-k0s-version v1.34.4+k0s.0"}


def test_kairos_init_standin_got_the_upstream_flags(workspace, first_run, engine):
    by_flavor = builds(workspace)
    assert {b.provider for b in by_flavor["a"] + by_flavor["b"]} == set(PROVIDER_FLAGS)
    for b in by_flavor["a"] + by_flavor["b"]:
        log = run_in_image(engine, b.image, "cat", "/var/log/kairos-init-standin.log").splitlines()
        expected = f"-m generic -t false{PROVIDER_FLAGS[b.provider]} --version v3.1.0"
        # two calls, as upstream's Dockerfile pattern: the overlay is copied in between them
        overlay_file = f"/etc/overlay-{b.flavor.path.stem}.conf"
        assert log == [f"-l debug -s install {expected} | overlay: none",
                       f"-l debug -s init {expected} | overlay: {overlay_file}"]
        release = run_in_image(engine, b.image, "cat", "/etc/kairos-release")
        assert "kairos-init-standin" in release
        overlay = run_in_image(engine, b.image, "cat", f"/etc/overlay-{b.flavor.path.stem}.conf")
        assert overlay == f"flavor {b.flavor.path.stem}\n"
        labels = engine.images.get(b.image).labels
        assert labels["org.opencontainers.image.title"] == b.stem
        assert labels["io.kairos.converter"] == "kairos-init"
        assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")


def test_builtin_conversion_kernel_initrd_squashfs(workspace, first_run, engine):
    (b,) = builds(workspace)["c"]
    out = workspace.outputs / "v3.1.0"
    kernel = (out / f"{b.stem}-kernel").read_bytes()
    assert kernel[0x202:0x206] == b"HdrS", "not an x86 Linux boot image"
    assert cpio_head((out / f"{b.stem}-initrd").read_bytes()) == b"070701", "initrd is not a newc cpio archive"
    listing = [line.removeprefix("squashfs-root") for line in subprocess.run(
        ["unsquashfs", "-l", str(out / f"{b.stem}.squashfs")], capture_output=True, text=True,
        check=True).stdout.split()]
    for path in ("/etc/kairos-release", "/boot/vmlinuz", "/boot/initrd", "/usr/sbin/init", "/usr/bin/apt-get"):
        assert path in listing, f"{path} missing from the squashfs"
    assert "/.dockerenv" not in listing
    release = run_in_image(engine, b.image, "cat", "/etc/kairos-release")
    assert 'KAIROS_FLAVOR="debian"' in release and "not kairos-init" in release
    # the rootfs base went bootstrap -> seed (local registry) -> resolve -> pull
    for stage in ("bootstrap:", "seed:", "pull:"):
        assert any(t.startswith(stage + "mmdebstrap-bookworm") for t in first_run.executed), stage


def test_second_run_runs_no_build_action(workspace, first_run):
    assert_noop(workspace)


def test_overlay_change_rebuilds_that_flavors_builds_only(workspace, first_run):
    assert_noop(workspace)
    conf = workspace.flavors / "overlay-a" / "etc" / "overlay-a.conf"
    conf.write_text("flavor a, changed\n")
    result = workspace.doit()
    assert result.rc == 0, result.err
    expected = set().union(*(chain(b) for b in builds(workspace)["a"])) | {"manifest:v3.1.0"}
    assert result.build_actions == expected
    assert_noop(workspace)


def test_flag_change_rebuilds_that_build_only(workspace, first_run, engine):
    assert_noop(workspace)
    path = workspace.flavors / "b.yaml"
    path.write_text(path.read_text() + "fips: true\n")
    result = workspace.doit()
    assert result.rc == 0, result.err
    (b,) = builds(workspace)["b"]
    assert result.build_actions == chain(b) | {"manifest:v3.1.0"}
    log = run_in_image(engine, b.image, "cat", "/var/log/kairos-init-standin.log")
    assert "--fips" in log
    assert_noop(workspace)


def test_package_change_reruns_the_install_step(workspace, first_run, engine):
    """A builtin `packages:` change is a package-level change: the conversion's install step makes
    a new layer, unlike an overlay change (tests/integration/test_raw_rpi4.py). (BuildKit runs the
    step, or reuses the layer an earlier build on this engine made from the same base and list.)"""
    assert_noop(workspace)
    path = workspace.flavors / "c.yaml"
    (c,) = builds(workspace)["c"]
    install = "RUN sh /tmp/builtin-install.sh && rm -f /tmp/builtin-install.sh"
    before = step_layers(c.image)
    path.write_text(path.read_text() + "builtin:\n  packages: [less]\n")
    result = workspace.doit()
    assert result.rc == 0, result.err
    assert result.build_actions == chain(c) | {"manifest:v3.1.0"}
    assert install in buildkit_steps(result.out + result.err)
    after = step_layers(c.image)
    assert after[install] != before[install], (before, after)
    assert run_in_image(engine, c.image, "sh", "-c", "command -v less") == "/usr/bin/less\n"
    assert_noop(workspace)


def test_new_base_image_under_same_tag_reconverts_its_users(workspace, first_run, engine, bases):
    assert_noop(workspace)
    ctx = workspace.root / "newbase"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {bases['a']}\nRUN echo v2 > /etc/base-version\n")
    image, _ = engine.images.build(path=str(ctx), tag=bases["a"], rm=True)
    repo, _, tag = bases["a"].rpartition(":")
    for line in engine.api.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in line, line
    result = workspace.doit()
    assert result.rc == 0, result.err
    users = builds(workspace)["a"]
    expected = set().union(*(chain(b) for b in users)) | {f"pull:{safe_id(bases['a'])}-amd64", "manifest:v3.1.0"}
    assert result.build_actions == expected
    assert run_in_image(engine, users[0].image, "cat", "/etc/base-version") == "v2\n"
    assert_noop(workspace)


def file_states(ws: Workspace) -> dict[str, tuple[int, int, int]]:
    """Every file under outputs/ and every digest file of the state -> (size, mtime_ns, inode):
    a file rewritten, touched or replaced shows up."""
    paths = [p for p in ws.outputs.rglob("*") if p.is_file()] + list(ws.state.rglob("*.digest"))
    return {str(p): (st.st_size, st.st_mtime_ns, st.st_ino) for p in paths for st in [p.stat()]}


def flip_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0x01]))


def older_same_size_copy(path: Path) -> None:
    """Replace ``path`` by other bytes of the same size carrying an older mtime (`cp -p` of an
    older build's file)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    older = path.with_name(path.name + ".older")
    older.write_bytes(bytes(data))
    then = path.stat().st_mtime_ns - 3600 * 10**9
    os.utime(older, ns=(then, then))
    os.replace(older, path)


def test_a_damaged_kernel_is_rebuilt_alone(workspace, first_run):
    """Issue #13: doit's targets are checked on every run (size and mtime recorded when the task
    succeeded). A built `<stem>-kernel` with one byte flipped in place, truncated, replaced by an
    older copy of the same size, deleted: each time a plain `doit` runs exactly `kernel:<stem>`.
    The kernel comes back with the same bytes, so its `.sha256` has the same content and what
    depends on it (here the manifest: manifest.json, SHA256SUMS, RELEASE.md; this workspace
    builds no ISO, raw image or signatures) stays up to date. Every other file is untouched."""
    assert_noop(workspace)
    (c,) = builds(workspace)["c"]
    kernel = workspace.outputs / "v3.1.0" / f"{c.stem}-kernel"
    checksum = kernel.with_name(kernel.name + ".sha256")
    good, good_line = hashlib.sha256(kernel.read_bytes()).hexdigest(), checksum.read_text()
    assert good_line.split() == [good, kernel.name]
    damages = {"byte flipped": flip_byte, "truncated": lambda p: os.truncate(p, p.stat().st_size // 2),
               "older copy, same size": older_same_size_copy, "deleted": Path.unlink}
    for what, damage in damages.items():
        before = file_states(workspace)
        damage(kernel)
        assert not kernel.exists() or hashlib.sha256(kernel.read_bytes()).hexdigest() != good
        result = workspace.doit()
        assert result.rc == 0, result.err
        assert result.build_actions == {f"kernel:{c.stem}"}, what
        assert hashlib.sha256(kernel.read_bytes()).hexdigest() == good, what
        assert checksum.read_text() == good_line, what
        rewritten = {str(kernel), str(checksum)}
        after = file_states(workspace)
        assert {k: v for k, v in after.items() if k not in rewritten} == \
               {k: v for k, v in before.items() if k not in rewritten}, what
        assert_noop(workspace)


def test_fresh_daemon_state_pulls_image_back_from_registry(workspace, first_run, engine):
    """An artifact task whose image is gone from the daemon pulls it by digest."""
    assert_noop(workspace)
    (b,) = builds(workspace)["b"]
    out = workspace.outputs / "v3.1.0" / f"{b.stem}.squashfs"
    before = out.read_bytes()
    image = (workspace.state / "image" / f"{b.stem}.digest").read_text().strip()
    engine.images.remove(image, force=True)
    out.unlink()
    result = workspace.doit(f"squashfs:{b.stem}")
    assert result.rc == 0, result.err
    assert result.build_actions == {f"squashfs:{b.stem}"}
    assert engine.images.get(image).id == image
    assert out.stat().st_size > 0 and len(before) > 0


# --- bad input and broken environment: exit 2, one line per problem, nothing written

def assert_clean_failure(result, needle: str, outputs: Path):
    assert result.rc == 2, (result.rc, result.out, result.err)
    assert needle in result.err, result.err
    assert "Traceback" not in result.err + result.out
    assert not outputs.exists() or not any(outputs.rglob("*")), "something was written to outputs"


def test_malformed_flavor_is_a_clean_error(workspace, tmp_path):
    bad = tmp_path / "flavors"
    write_flavor(bad / "x.yaml", "flavor: [unclosed\n")
    write_flavor(bad / "y.yaml", "flavor: ubuntu\nrelease: 24.04\nbogus: 1\n")
    result = workspace.doit(flavors=bad, state=tmp_path / "state", outputs=tmp_path / "out")
    assert_clean_failure(result, "malformed YAML", tmp_path / "out")
    assert "y.yaml:2: release: must be a string" in result.err
    assert "y.yaml:3: bogus: unknown key" in result.err


def test_daemon_not_reachable(workspace, tmp_path):
    flavors = copy_flavors(workspace, tmp_path / "flavors", ["b.yaml"])
    result = workspace.doit(flavors=flavors, state=tmp_path / "state", outputs=tmp_path / "out",
                            env={"DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"})
    assert_clean_failure(result, "cannot reach the Docker daemon", tmp_path / "out")


def test_registry_not_reachable(workspace, tmp_path):
    flavors = copy_flavors(workspace, tmp_path / "flavors", ["b.yaml"])
    path = flavors / "b.yaml"
    path.write_text(path.read_text().replace(f"registry: {workspace.ns}/kairos", "registry: 127.0.0.1:5999/kairos"))
    result = workspace.doit(flavors=flavors, state=tmp_path / "state", outputs=tmp_path / "out")
    assert_clean_failure(result, "cannot reach registry 127.0.0.1:5999", tmp_path / "out")


def test_missing_tools_name_their_debian_package(workspace, tmp_path):
    flavors = copy_flavors(workspace, tmp_path / "flavors", ["b.yaml", "c.yaml"])
    result = workspace.doit(flavors=flavors, state=tmp_path / "state", outputs=tmp_path / "out",
                            env={"PATH": str(Path(sys.executable).parent)})
    assert_clean_failure(result, "cannot find mksquashfs", tmp_path / "out")
    assert "install Debian package squashfs-tools" in result.err
    assert "cannot find mmdebstrap" in result.err


def test_second_concurrent_run_stops_at_once(workspace, first_run):
    lock_holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)",
         str(workspace.state / "lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert lock_holder.stdout.readline().strip() == "locked"
        result = workspace.doit()
        assert result.rc == 2
        assert "another doit run" in result.err and str(workspace.state) in result.err
        assert result.executed == []
    finally:
        lock_holder.kill()
        lock_holder.wait()
