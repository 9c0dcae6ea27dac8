"""SOURCE_DATE_EPOCH: the one time stamp of a build (https://reproducible-builds.org/docs/source-date-epoch/).

Every step that would stamp the current time (mmdebstrap, mksquashfs, xorriso, grub images,
mkfs, the UKI) stamps this epoch instead, and file times newer than it are clamped to it, so
the same inputs give the same bytes. A build's epoch is the flavor key `source_date_epoch`,
else the environment's SOURCE_DATE_EPOCH, else DEFAULT.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

from .run import UsageError

DEFAULT = 1700000000        # 2023-11-14 22:13:20 UTC
MAX = 253402300799          # 9999-12-31 23:59:59 UTC: the last time every format here can hold
NAME = "SOURCE_DATE_EPOCH"
HINT = "seconds since 1970-01-01 UTC"


def parse_epoch(text: str) -> int:
    """The epoch of the text of a SOURCE_DATE_EPOCH variable (surrounding blanks allowed)."""
    value = text.strip()
    if not value.isdigit() or int(value) > MAX:
        raise UsageError(f"{NAME}={text!r}: give the {HINT} (0 to {MAX}), e.g. $(git log -1 --format=%ct)")
    return int(value)


def environment_epoch(environ: Mapping[str, str] | None = None, default: int = DEFAULT) -> int:
    """The environment's SOURCE_DATE_EPOCH when set and not empty, else ``default``."""
    text = (os.environ if environ is None else environ).get(NAME, "")
    return parse_epoch(text) if text.strip() else default


def build_epoch(flavor, environ: Mapping[str, str] | None = None) -> int:
    """The epoch of a build of ``flavor`` (None: no flavor, e.g. a base shared by several):
    its `source_date_epoch`, else the environment's SOURCE_DATE_EPOCH, else DEFAULT."""
    own = getattr(flavor, "source_date_epoch", None)
    return own if own is not None else environment_epoch(environ)


def epoch_env(epoch: int) -> dict[str, str]:
    """The environment that makes SOURCE_DATE_EPOCH-aware tools stamp ``epoch`` (pure)."""
    return {NAME: str(epoch)}


def frozen_clock_argv(epoch: int, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` (with ``env`` added) under faketime with the clock stopped at ``epoch`` (UTC), for
    programs that stamp the current time and have no option for it (pure)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))
    return ["env", "TZ=UTC", *(f"{k}={v}" for k, v in (env or {}).items()), "faketime", "-f", stamp, *argv]
