"""The repository root, put on ``sys.path`` so that the benchmarks import the support code
they share with the tests (``tests.harness``: the private ``redis-server``, the worker
subprocess). Imported first by every script here (they run as ``python bench/x.py``, with
only ``bench/`` on the path)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
