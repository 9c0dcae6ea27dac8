"""Where things live: the state directory (doit DB, digests, build contexts) and
the outputs directory, plus atomic writes.

Everything incremental lives under one state directory so CI can cache and
restore it as a unit. Nothing here touches Docker or a registry.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

from .kinds import BLOB_SIGNATURE_SUFFIXES, CHECKSUM_SUFFIX, KINDS, boot_file_names
from .run import KairosError, UsageError

TMP_MARK = ".partial-"
# fault injection for the kill tests: the writer of the output of this file name stops itself
FAULT_STOP = "KAIROS_FAULT_STOP"


@dataclass(frozen=True)
class Paths:
    """The state and output directories of one pipeline run."""

    state: Path
    outputs: Path

    @classmethod
    def from_env(cls, root: Path) -> "Paths":
        state = Path(os.environ.get("KAIROS_STATE") or root / ".state")
        outputs = Path(os.environ.get("KAIROS_OUTPUTS") or root / "outputs")
        return cls(state.absolute(), outputs.absolute())

    @property
    def dep_file(self) -> Path:
        return self.state / "doit.db"

    @property
    def lock_file(self) -> Path:
        """Held (flock) by the doit run using this state directory."""
        return self.state / "lock"

    def trivy_cache(self, tag: str) -> Path:
        """trivy's --cache-dir for one vulnerability database (``tag`` names it)."""
        return self.state / "trivy-cache" / tag

    def _digest(self, kind: str, ident: str) -> Path:
        """Small file holding one digest/ID: the thing downstream tasks depend on."""
        return self.state / kind / f"{ident}.digest"

    # --- the small digest files, one method per kind of record ---------------
    def resolved(self, ident: str) -> Path:
        """Registry digest of a base or kairos-init reference (rewritten only on change)."""
        return self._digest("resolved", ident)

    def pulled(self, ident: str, arch: str) -> Path:
        """Digest of a reference pulled for one arch."""
        return self._digest("pulled", f"{ident}-{arch}")

    def seeded(self, ident: str) -> Path:
        """Registry digest of an offline (mmdebstrap) base pushed to the registry."""
        return self._digest("seeded", ident)

    def image_id(self, b) -> Path:
        """ID of the converted image of build ``b``."""
        return self._digest("image", b.stem)

    def pushed(self, b) -> Path:
        """Registry digest of the converted image of ``b`` as pushed."""
        return self._digest("pushed", b.stem)

    def carrier(self, b) -> Path:
        """Registry digest of the `-img` carrier image of ``b``."""
        return self._digest("carrier", b.stem)

    def signed(self, b) -> Path:
        """Image digest ``b`` was signed at (written last by the sign stage)."""
        return self._digest("signed", b.stem)

    # --- outputs ----------------------------------------------------------------
    def artifact(self, b, suffix: str) -> Path:
        """``outputs/<version>/<stem><suffix>`` of build ``b``."""
        return self.version_dir(b.flavor.version) / (b.stem + suffix)

    def outputs_of(self, b, kind: str) -> list[Path]:
        """The files of one artifact kind of ``b`` (the registry's suffixes), checksums excluded."""
        return [self.artifact(b, s) for s in KINDS[kind].suffixes]

    def targets_of(self, b, kind: str) -> list[Path]:
        """Everything the stage of ``kind`` writes into outputs for ``b``: its files, then their checksums."""
        return [self.version_dir(b.flavor.version) / n for n in KINDS[kind].files(b.stem)]

    def boot_files(self, b) -> tuple[Path, ...]:
        """The kernel, initrd and squashfs of ``b``: what the native ISO, raw and iPXE builders use."""
        return tuple(self.version_dir(b.flavor.version) / name for name in boot_file_names(b.stem))

    def checksums(self, b) -> list[Path]:
        """Every `<file>.sha256` the artifact stages of ``b`` write."""
        return [checksum_path(p) for kind in b.kinds if KINDS[kind].checksummed for p in self.outputs_of(b, kind)]

    def context_dir(self, stem: str) -> Path:
        return self.state / "build" / stem

    def rootfs_tar(self, ident: str) -> Path:
        return self.state / "rootfs" / f"{ident}.tar"

    def boot_logs(self, b) -> Path:
        """Serial logs of the boot stage's runs of ``b`` (kept when a boot fails)."""
        return self.state / "boot" / b.stem

    def tmp_dir(self) -> Path:
        return self.state / "tmp"

    def version_dir(self, version: str) -> Path:
        return self.outputs / version


def partial_name(path: Path) -> Path:
    """The temp name an output is written under before it is renamed into place.

    It starts with a dot and carries a marker, so a killed build never leaves a
    file under the final name and the leftover is easy to recognise and clean.
    """
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def clean_partials(path: Path) -> None:
    """Remove leftovers of earlier killed attempts at writing ``path``."""
    prefix = f".{path.name}{TMP_MARK}"
    if path.parent.is_dir():
        for leftover in path.parent.iterdir():
            if leftover.name.startswith(prefix):
                _remove(leftover)


def clean_scratch(paths: "Paths") -> None:
    """Remove the partial files and directories under ``paths.tmp_dir()``. Only for the run that
    holds the state lock: whatever is there then was left by a killed run (extraction tars and
    rootfs trees are big, and a renamed or removed step would never clean its own)."""
    if paths.tmp_dir().is_dir():
        for leftover in paths.tmp_dir().glob(f"*{TMP_MARK}*"):
            _remove(leftover)


def _remove(leftover: Path) -> None:
    """A leftover file, symlink or directory tree, gone."""
    if leftover.is_dir() and not leftover.is_symlink():
        shutil.rmtree(leftover, ignore_errors=True)
    else:
        leftover.unlink(missing_ok=True)


def fault_point(path: Path) -> None:
    """When KAIROS_FAULT_STOP names ``path``'s file (tests only; unset, nothing happens), stop this
    process (SIGSTOP) with ``path`` complete under its partial name, right before the rename: a
    test can then SIGKILL the run at exactly the point where a crash must leave no final file."""
    if os.environ.get(FAULT_STOP) == path.name:
        os.kill(os.getpid(), signal.SIGSTOP)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temp path next to ``path``; rename it into place on success only. A `<path>.sha256`
    beside it is removed first: it described the file being replaced (write_checksum writes the new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(path)
    tmp = partial_name(path)
    try:
        yield tmp
        if not tmp.exists():
            raise KairosError(f"step produced no file at {tmp}")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        fault_point(path)
        # the old file's checksum goes before the new file takes its name: killed in between, the
        # final name holds the old file without a checksum (the step reruns), never a mismatch
        checksum_path(path).unlink(missing_ok=True)
        os.replace(tmp, path)
    except OSError as exc:  # e.g. a full disk: name the file, not a traceback
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str):
    """A fresh, empty working directory ``parent/.<name>.partial-<pid>`` for one step; removed
    afterwards, and leftovers of killed earlier attempts at the same step go first."""
    base = Path(parent) / name
    clean_partials(base)
    work = partial_name(base)
    work.mkdir(parents=True)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def build_context(paths: "Paths", name: str, files: dict[str, Path] | None = None, keep: bool = False):
    """A fresh Docker build context ``<state>/build/<name>`` holding ``files`` (context name ->
    source, hard-linked where possible); removed afterwards unless ``keep``."""
    ctx_dir = paths.context_dir(name)
    shutil.rmtree(ctx_dir, ignore_errors=True)
    ctx_dir.mkdir(parents=True)
    try:
        for dest, source in (files or {}).items():
            try:
                os.link(source, ctx_dir / dest)
            except OSError:  # another file system
                shutil.copy2(source, ctx_dir / dest)
        yield ctx_dir
    finally:
        if not keep:
            shutil.rmtree(ctx_dir, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` only when it differs, so doit sees no change otherwise."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    write_text_atomic(path, text)
    return True


def file_identity(path) -> list[int] | None:
    """What the run-to-run check of a task's targets compares (`graph.targets_unchanged`):
    ``[size, mtime_ns]`` of a file, ``[]`` of a directory (only its presence counts: its
    mtime moves with its entries), None when it is missing. One stat, never a hash.

    Why these two and not the inode or ctime: a CI cache restore (actions/cache's tar,
    GitLab's zip, `cp -a` in ci/reproduce.sh) re-creates every file, so inode and ctime
    always change and would rebuild everything, while the size and the modification time
    come back. A byte changed in place moves the mtime to the time of the edit; a truncated
    file changes size; an older copy of the same size carries another mtime (its own,
    or the time of the copy); a deleted file is missing. Not seen: an edit whose mtime is
    set back afterwards (`touch -r`); `doit verify` hashes against the `.sha256`. A restore
    that does not keep mtimes makes every output look replaced: everything rebuilds.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISDIR(st.st_mode):
        return []
    return [st.st_size, st.st_mtime_ns]


def same_identity(recorded: list[int] | None, current: list[int] | None) -> bool:
    """Whether a target still is what its task wrote (``file_identity`` values).

    Equal, or the same size with the recorded mtime cut to a coarser resolution (rounded
    down or up to 100 ns, a microsecond, ..., a whole second): that is how archives that
    keep coarser times restore it (GitLab's zip cache keeps whole seconds, Go's tar rounds
    to the nearest second). An edit after the build is missed only if it lands within the
    same second on a timestamp that is a whole multiple of the resolution.
    """
    if recorded is None or current is None or len(recorded) != len(current):
        return recorded == current
    if recorded == current:
        return True
    if len(recorded) != 2 or recorded[0] != current[0]:
        return False
    was, now = recorded[1], current[1]
    return any(now % grain == 0 and abs(now - was) < grain for grain in (10 ** k for k in range(2, 10)))


def read_digest(path: Path) -> str:
    return Path(path).read_text().strip()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    """``<file>.sha256`` next to ``path``."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def signature_files(checksum: Path) -> tuple[Path, ...]:
    """The cosign blob signature and bundle of a `.sha256` file."""
    return tuple(checksum.with_name(checksum.name + s) for s in BLOB_SIGNATURE_SUFFIXES)


def write_checksum(path: Path) -> Path:
    """Write ``<file>.sha256`` in sha256sum format with the bare file name."""
    path = Path(path)
    out = checksum_path(path)
    write_text_atomic(out, f"{sha256_file(path)}  {path.name}\n")
    return out


def safe_id(text: str) -> str:
    """A file- and task-name-safe identifier for a reference or option set."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")
