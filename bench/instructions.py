"""Instructions per task, counted by valgrind's callgrind: a figure that does not move
with the machine's load, unlike every timed figure on a shared 2-core VM.

    python bench/instructions.py            # eager and publish, every variant (~4 min)
    python bench/instructions.py -n 500

For each variant ``_instr_loop.py`` runs twice under ``valgrind --tool=callgrind``, with
0 and with N iterations after identical set-up and warm-up; the difference over N is the
cost of one iteration, all threads of the process included (the event client's sending
thread too). Variants:

bare
    Celery alone, the task builds its properties and returns.
signals
    no-op receivers connected to ``before_task_publish``, ``task_prerun`` and
    ``task_postrun``: what Celery spends dispatching those signals to *any* receiver,
    the floor under every integration that uses them.
task_scopes
    ``install(app)`` and a caller context (a user, a session, three tags); no capture.
task_scopes+capture
    the same, the task capturing one event; the events are sent in one batch to a
    loopback receiver at the end (serializing, batching, gzip and the HTTP request
    included, in their cheapest form: how a sending thread interleaves with the loop
    depends on thread timing, which no two runs repeat).

Every run has ``PYTHONHASHSEED=0``, so that the two runs of a pair lay their dicts out
alike (with random seeds the difference moved by thousands of instructions per iteration).

Instruction counts are not time: memory stalls, the other core's load and GIL hand-offs
are not in them. They show which part of the cost is whose.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _instr_loop import VARIANTS
from _receivers import DeferredCapture
from _root import BENCH

_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def _instructions(mode: str, variant: str, count: int, url: str, out_dir: Path) -> int:
    out = out_dir / f"{mode}-{variant}-{count}.out"
    done = subprocess.run(
        [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, str(BENCH / "_instr_loop.py"), mode, variant, str(count), url,
        ],
        capture_output=True, text=True, cwd=BENCH, timeout=1800,
        # one hash seed for every run: with a random one, dict layouts (and the probes of
        # each look-up) differ between the 0- and the N-iteration run by thousands of
        # instructions per iteration
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{mode}/{variant}/{count} failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=300, help="iterations counted")
    parser.add_argument("--modes", default="eager,publish")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    modes = args.modes.split(",")
    jobs = [(m, v, c) for m in modes for v in VARIANTS for c in (0, args.n)]
    with (
        DeferredCapture() as receiver,
        tempfile.TemporaryDirectory() as tmp,
        ThreadPoolExecutor(max_workers=1) as pool,  # in parallel, counts moved
    ):
        counts = dict(
            zip(
                jobs,
                pool.map(lambda j: _instructions(*j, receiver.url, Path(tmp)), jobs),
                strict=True,
            )
        )
    print(f"instructions per iteration (callgrind, {args.n} iterations); ratio to bare")
    for mode in modes:
        per = {v: (counts[(mode, v, args.n)] - counts[(mode, v, 0)]) / args.n for v in VARIANTS}
        for variant in VARIANTS:
            ratio = per[variant] / per["bare"]
            print(f"{mode:<8} {variant:<20} {per[variant]:>12,.0f} {ratio:6.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
