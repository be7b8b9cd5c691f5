"""Static checks are part of the test command: mypy --strict and ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_mypy_strict_passes_on_the_package() -> None:
    result = _run("mypy", "--strict", "task_scopes")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check_passes() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_all_is_sorted_and_complete() -> None:
    import task_scopes

    public = {
        name
        for name in dir(task_scopes)
        if not name.startswith("_")
        and name not in {"celery", "testing", "collector"}
        and not isinstance(getattr(task_scopes, name), type(sys))
    }
    assert set(task_scopes.__all__) == public | {"__version__"}
    names = list(task_scopes.__all__)
    assert names == sorted(names, key=lambda n: (n[0].islower(), n))
