"""Fixtures of the reliability tests.

The soak and exit-path tests run ``python bench/soak.py`` in a subprocess, the program the
published figures come from, and check the JSON result it writes; nothing here imports
from ``bench``. Its worker subprocesses use this test's database of the private Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOAK = ROOT / "bench" / "soak.py"


@dataclass(frozen=True)
class SoakRun:
    """One run of ``bench/soak.py``: its exit status, the JSON it wrote (``--json``), its
    output (stdout and the end of stderr, for failure messages) and its log directory."""

    returncode: int
    result: Any
    output: str
    log_dir: Path


RunSoak = Callable[..., SoakRun]


@pytest.fixture
def run_soak(redis_url: str, tmp_path: Path) -> RunSoak:
    """Factory: ``run_soak(*options, timeout=seconds) -> SoakRun`` runs
    ``python bench/soak.py *options`` on this test's Redis database, with worker logs in
    ``tmp_path``. Fails the test when the run wrote no result."""
    runs = 0

    def run(*options: str, timeout: float = 240.0) -> SoakRun:
        nonlocal runs
        runs += 1
        out = tmp_path / f"result-{runs}.json"
        argv = [
            sys.executable, str(SOAK), *options, "--redis", redis_url,
            "--log-dir", str(tmp_path), "--json", str(out),
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        output = f"$ {' '.join(argv[1:])}\n{done.stdout}{done.stderr[-4000:]}"
        if not out.exists():
            pytest.fail(f"bench/soak.py exited with {done.returncode}, no result\n{output}")
        return SoakRun(done.returncode, json.loads(out.read_text()), output, tmp_path)

    return run
