"""Test matrix: every supported Python, and the oldest and newest supported Celery.

    nox                  # changelog, tests-3.10 ... tests-3.13, both celery sessions
    nox -l               # list the sessions
    nox -s tests-3.12    # one session; arguments after -- go to pytest: -- -x -k scope
    nox -s full          # the whole suite, real workers included, on the newest Python

The supported Pythons are the ``Programming Language :: Python :: 3.X`` classifiers in
pyproject.toml; the oldest Celery is the lower bound of its ``celery`` requirement. nox
finds each interpreter as ``pythonX.Y`` on PATH (pyenv: the versions' ``bin`` directories,
or every version active in the shell). One it cannot find is reported as skipped, by name;
with ``CI`` set in the environment it fails the run instead.

Tiers: tests marked ``slow`` start real ``celery worker`` (or demo) subprocesses; every
other test runs in the pytest process (eager tasks, in-thread workers on ``memory://``,
loopback HTTP). The Celery sessions add the real-worker failure tests, because which
signals a hard time limit or a lost child fires has changed between Celery releases
(https://github.com/celery/celery/issues/4827).
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.version import Version

nox.needs_version = ">=2025.10.14"
nox.options.sessions = ["changelog", "tests", "celery"]
nox.options.download_python = "never"  # test the interpreters this machine has, only
# uv installs the test extras in seconds where pip takes about a minute per session.
nox.options.default_venv_backend = "uv|virtualenv"

ROOT = Path(__file__).resolve().parent
PYPROJECT = nox.project.load_toml(ROOT / "pyproject.toml")
PYTHONS = nox.project.python_versions(PYPROJECT)

# mypy and ruff read the source against the newest typed dependencies (kombu 5.3 has no
# type information, so mypy finds a `type: ignore` unused there), the same on every Python:
# the whole suite runs them once (the README's test command, the full session).
STATIC = ("test_mypy_strict_passes_on_the_package", "test_ruff_check_passes")
IN_PROCESS = ("-m", "not slow", *(f"--deselect=tests/test_static.py::{t}" for t in STATIC))
WORKER_FAILURES = "tests/e2e/test_failures.py"

# The newest Celery minor release tested; the oldest is the requirement's lower bound.
NEWEST_CELERY = "5.7"
VERSIONS = (
    "import platform, celery, kombu; "
    "print(f'tested on: Python {platform.python_version()}, Celery {celery.__version__}, "
    "kombu {kombu.__version__}')"
)


def _celery_range() -> tuple[str, str]:
    """``(oldest, newest)`` Celery minor releases, both inside pyproject's requirement."""
    (requirement,) = (
        Requirement(r)
        for r in PYPROJECT["project"]["dependencies"]
        if Requirement(r).name == "celery"
    )
    (oldest,) = (s.version for s in requirement.specifier if s.operator == ">=")
    for version in (oldest, NEWEST_CELERY):
        if Version(version) not in requirement.specifier:
            raise ValueError(f"Celery {version} is outside pyproject.toml's {requirement}")
    return oldest, NEWEST_CELERY


OLDEST_CELERY, _ = _celery_range()


def _install(session: nox.Session, *pins: str) -> None:
    session.install("-e", ".[test]", *pins)
    session.run("python", "-c", VERSIONS)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The in-process tiers, on the newest Celery the requirement allows."""
    _install(session)
    session.run("python", "-m", "pytest", *IN_PROCESS, *session.posargs)


@nox.session
@nox.parametrize(
    ("python", "celery"),
    [(PYTHONS[0], OLDEST_CELERY), (PYTHONS[-1], NEWEST_CELERY)],
)
def celery(session: nox.Session, celery: str) -> None:
    """In-process tiers and real-worker failure tests on the oldest or newest Celery.

    The latest patch of that minor release, with kombu of the same minor; the oldest Celery
    runs on the oldest Python, the newest on the newest.
    """
    _install(session, f"celery=={celery}.*", f"kombu=={celery}.*")
    session.run("python", "-m", "pytest", *IN_PROCESS, *session.posargs)
    session.run("python", "-m", "pytest", WORKER_FAILURES, *session.posargs)


@nox.session(python=PYTHONS[-1])
def full(session: nox.Session) -> None:
    """The whole suite, real workers and brokers included (as the README's test command)."""
    _install(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=False)
def changelog(session: nox.Session) -> None:
    """``task_scopes/_version.py`` names the newest release in CHANGELOG.md."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", text, re.MULTILINE)
    version = runpy.run_path(str(ROOT / "task_scopes" / "_version.py"))["__version__"]
    if not releases or releases[0] != version:
        session.error(f"_version.py says {version}, CHANGELOG.md's newest release {releases[:1]}")
    if not re.search(r"^## \[Unreleased\]$", text.split(f"## [{version}]")[0], re.MULTILINE):
        session.error("CHANGELOG.md has no ## [Unreleased] section above the newest release")
    session.log(f"version {version} is CHANGELOG.md's newest release")
