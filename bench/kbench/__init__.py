"""The benchmark behind bench/run.py (the command line, see bench/README.md), by part:

- common:  BenchError, the progress log, commands, medians, the Row of the table
- images:  the engine and the registry, the bench's base and stand-in images, --clean
- space:   a flavors/state/outputs "world" and timed `doit` processes in it
- flavors: the flavor files of the synthetic matrix and of the two real builds, brought up to date
- by_hand: the stages' tool commands run by hand (squashfs, iso, raw)
- benches: the rows: noop, selective, parallel, stages, reuse
- table:   the table as plain text or Markdown

Importing it puts the project root first on sys.path, so `tasks` and `tests.harness` are this
checkout's (not those of an installed kairos-doit).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
