"""The loop ``instructions.py`` runs under callgrind: N eager tasks or publishes of one
variant, after the same set-up and warm-up whatever N is (so the difference of two runs
is the cost of the extra iterations alone).

    python bench/_instr_loop.py eager task_scopes+capture 300 [collector URL]
"""

from __future__ import annotations

import sys
from typing import Any

from _configs import API_KEY, EVENT, SESSION, TAGS, USER
from celery import Celery, signals

VARIANTS = ("bare", "signals", "task_scopes", "task_scopes+capture")


def main() -> int:
    mode, variant, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    host = sys.argv[4] if len(sys.argv) > 4 else "http://127.0.0.1:9"
    app = Celery("bench", broker="memory://", set_as_current=True)
    app.conf.update(task_always_eager=mode == "eager", task_ignore_result=True)
    capture: Any = None
    if variant == "signals":  # Celery's own cost of dispatching to a receiver

        def receiver(**_: Any) -> None:
            pass

        for signal in (signals.before_task_publish, signals.task_prerun, signals.task_postrun):
            signal.connect(receiver, weak=False)
    elif variant.startswith("task_scopes"):
        import task_scopes
        import task_scopes.celery

        # Sent in one batch by the flush at the end: how the sending thread's work
        # interleaves with the loop depends on thread timing, which is not repeatable.
        task_scopes.init(API_KEY, host, flush_at=10**6, flush_interval=3600.0)
        app.conf.task_scopes_api_key = API_KEY
        app.conf.task_scopes_host = host
        task_scopes.celery.install(app)
        if variant.endswith("+capture"):
            capture = task_scopes.capture

    @app.task(name="bench.work", ignore_result=True)  # type: ignore[untyped-decorator]
    def work(i: int) -> int:
        properties = {"i": i, "source": "bench"}
        if capture is not None:
            capture(EVENT, properties=properties)
        return i

    def loop(n: int) -> None:
        for i in range(n):
            work.delay(i)
        if variant.startswith("task_scopes"):
            task_scopes.flush()

    if variant.startswith("task_scopes"):
        with task_scopes.new_context():
            task_scopes.identify_context(USER)
            task_scopes.set_context_session(SESSION)
            for key, value in TAGS.items():
                task_scopes.tag(key, value)
            loop(200)  # warm-up
            loop(count)
    else:
        loop(200)
        loop(count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
