"""The layers stay cut: the core (scopes, client, consumer, transport) needs no Celery code,
and only ``_scope.py`` touches a scope's internals."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "task_scopes"

CORE = [
    "task_scopes._api",
    "task_scopes._blocks",
    "task_scopes._client",
    "task_scopes._consumer",
    "task_scopes._generators",
    "task_scopes._json",
    "task_scopes._running",
    "task_scopes._scope",
    "task_scopes._transport",
    "task_scopes._validate",
    "task_scopes._web",
    "task_scopes.testing",
    "task_scopes.collector",
]


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_imports_no_celery_code(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules "
        "if m == 'celery' or m.startswith(('celery.', 'task_scopes.celery', 'kombu'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


# A Scope's private attributes, and the ContextVars that hold the active scopes.
_PRIVATE = re.compile(
    r"[\w)\]]\._(distinct_id|session_id|groups|tags|owner|client)\b"
    r"|\b(_isolation_var|_current_var|_global_scope)\b"
)


def test_only_the_scope_module_touches_scope_internals() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_scope.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _PRIVATE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_settings_table_shows_the_defaults_the_code_uses() -> None:
    import dataclasses

    import task_scopes.celery
    from task_scopes.celery import Options

    doc = task_scopes.celery.__doc__ or ""
    rows = {
        line.split()[0].strip("`"): line.split()[1]
        for line in doc.splitlines()
        if line.startswith("``task_scopes_")
    }
    for field in dataclasses.fields(Options):
        default = field.default
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        assert float(rows[f"task_scopes_{field.name}"]) == default, field.name
