"""Where the eager figure's time goes beyond the instructions: what a sending thread costs
a busy task thread on this machine, measured with the kernel's counters.

    python bench/eager_profile.py               # 4 variants x 3 interleaved runs (~1 min)
    python bench/eager_profile.py --tasks 20000 --runs 5

Each variant runs ``--tasks`` eager tasks back to back in a process of its own, after a
warm-up, and reports per task: wall time, user and system CPU time of the whole process
(``getrusage``: all threads), and voluntary context switches. Variants:

bare
    Celery alone (``bench/_configs.py``'s task, no capture).
queued
    task_scopes, each task capturing one event, with ``flush_at`` and ``flush_interval``
    past the loop: the events are checked, serialized and queued, and none is sent inside
    the loop.
    Against ``bare``: what the scope handling and ``capture()`` cost in time.
sending
    the same with the default options: the consumer thread batches, gzips and POSTs to a
    loopback receiver while the loop runs. Against ``queued``: what sending costs the
    loop. While the consumer waits for the GIL, every time the task thread releases it
    (Celery reads ``os.urandom`` for each task ID) the kernel wakes the consumer, which
    finds the GIL taken again and sleeps: the extra system time and voluntary context
    switches per task show it. ``capture()`` hands the GIL to a consumer it finds starved
    (``Client._hand_over``), which keeps both near the ``queued`` figures; before it, a
    send lasted as long as the loop and every task paid ~20 µs of system time.
bare+core
    ``bare`` while another process compresses in zlib: what work on the other core costs
    the task thread on this machine (two vCPUs sharing a physical core or its caches),
    with no GIL involved. A receiver or a sending thread is such work.

The final flush is outside the counted window, so ``sending`` and ``queued`` differ by
what happens during the loop only. Figures are the best of ``--runs`` interleaved runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from typing import Any

from _configs import API_KEY, build
from _receivers import DeferredCapture
from _root import BENCH

VARIANTS = ("bare", "queued", "sending", "bare+core")
_BURN = "import os, zlib\nd = os.urandom(1 << 20)\nwhile True: zlib.compress(d, 1)"


def _child(variant: str, tasks: int, url: str) -> dict[str, Any]:
    config = "bare" if variant.startswith("bare") else "task_scopes"
    built = build(config, broker="memory://", queue=f"p-{uuid.uuid4().hex[:8]}", eager=True,
                  collector_url=url)  # fmt: skip
    if variant == "queued":
        import task_scopes

        never = {"flush_at": 10 * tasks, "max_queue_size": 10 * tasks, "flush_interval": 3600.0}
        task_scopes.init(API_KEY, url, **never)
    burner = None
    if variant == "bare+core":
        burner = subprocess.Popen([sys.executable, "-c", _BURN])
        time.sleep(0.2)  # running
    delay = built.work.delay
    with built.caller_context():
        for i in range(1000):
            delay(i)
        built.flush()
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        for i in range(tasks):
            delay(i)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        built.flush()
    if burner is not None:
        burner.kill()
        burner.wait()
    return {
        "wall_us": wall / tasks * 1e6,
        "user_us": (after.ru_utime - before.ru_utime) / tasks * 1e6,
        "sys_us": (after.ru_stime - before.ru_stime) / tasks * 1e6,
        "vcsw": (after.ru_nvcsw - before.ru_nvcsw) / tasks,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.tasks, args.url)), flush=True)
        os._exit(0)  # the exit flush is not measured; skip it
    best: dict[str, dict[str, float]] = {}
    with DeferredCapture() as receiver:
        for _ in range(args.runs):
            for variant in VARIANTS:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", variant, "--tasks", str(args.tasks),
                     "--url", receiver.url],
                    capture_output=True, text=True, cwd=BENCH, check=True, timeout=600,
                )  # fmt: skip
                got = json.loads(out.stdout.strip().splitlines()[-1])
                if variant not in best or got["wall_us"] < best[variant]["wall_us"]:
                    best[variant] = got
    bare = best["bare"]["wall_us"]
    print(f"eager task, {args.tasks} per run, best of {args.runs} runs (per task)")
    print(f"{'variant':<11} {'wall µs':>8} {'vs bare':>8} {'user µs':>8} {'sys µs':>7} "
          f"{'vol. switches':>13}")  # fmt: skip
    for variant in VARIANTS:
        b = best[variant]
        print(f"{variant:<11} {b['wall_us']:>8.1f} {b['wall_us'] / bare:>7.2f}x "
              f"{b['user_us']:>8.1f} {b['sys_us']:>7.1f} {b['vcsw']:>13.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
