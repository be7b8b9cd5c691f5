"""Compare what the collector received with :data:`example_worker.plan.EXPECTED`.

An event's intended shopper is read from its ``order_id`` property, which travelled in the
request *body* and the task's *arguments*; its attribution (distinct ID, session ID,
``plan`` tag) came from the browser's ``X-POSTHOG-*`` request headers (through the web
middleware) and travelled in the task_scopes message *header*. An event is attributed
right when both agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from example_worker.plan import EXPECTED, SHOPPERS, Expected, Shopper

__all__ = ["Row", "Verdict", "check", "counts", "problems", "render", "request_of"]

_BY_ORDER: dict[str, Shopper] = {s.order_id: s for s in SHOPPERS}


@dataclass(frozen=True)
class Row:
    """One received event, the shopper it belongs to (None: unknown), the expected entry
    it satisfies (None: unexpected) and what is wrong with it (None: nothing)."""

    event: Mapping[str, Any]
    owner: str | None
    expected: Expected | None
    problem: str | None


@dataclass
class Verdict:
    """The outcome of :func:`check`. ``ok`` only when nothing is missing, every event is
    attributed right and nothing unexpected arrived."""

    rows: list[Row] = field(default_factory=list)
    missing: dict[str, list[Expected]] = field(default_factory=dict)

    @property
    def received(self) -> int:
        return len(self.rows)

    @property
    def expected_total(self) -> int:
        return sum(len(v) for v in EXPECTED.values())

    @property
    def attributed_right(self) -> int:
        return sum(1 for r in self.rows if r.expected is not None and r.problem is None)

    @property
    def misattributed(self) -> list[Row]:
        return [r for r in self.rows if r.expected is not None and r.problem is not None]

    @property
    def unexpected(self) -> list[Row]:
        return [r for r in self.rows if r.expected is None]

    @property
    def exceptions(self) -> int:
        return sum(1 for r in self.rows if r.event.get("event") == "$exception")

    @property
    def all_arrived(self) -> bool:
        """Every expected event arrived (attributed right or not): waiting longer is moot."""
        return not any(self.missing.values())

    @property
    def ok(self) -> bool:
        return self.all_arrived and not self.misattributed and not self.unexpected


def _props(event: Mapping[str, Any]) -> Mapping[str, Any]:
    props = event.get("properties")
    return props if isinstance(props, Mapping) else {}


def request_of(props: Mapping[str, Any]) -> str | None:
    """``"METHOD /path"`` of the web request an event was captured in, from the tags the
    web middleware sets (``$request_method``, ``$current_url``); None when it has none."""
    method, url = props.get("$request_method"), props.get("$current_url")
    if not isinstance(method, str) or not isinstance(url, str):
        return None
    return f"{method} {urlsplit(url).path or '/'}"


def _matches(expected: Expected, event: Mapping[str, Any]) -> bool:
    props = _props(event)
    return (
        event.get("event") == expected.event
        and props.get("celery_task_name") == expected.task
        and props.get("celery_retry_count") == expected.retry
        and (expected.sku is None or props.get("sku") == expected.sku)
        and (expected.request is None or request_of(props) == expected.request)
    )


def _attribution_problem(shopper: Shopper, session_id: str, event: Mapping[str, Any]) -> str | None:
    props = _props(event)
    wrong = []
    if event.get("distinct_id") != shopper.distinct_id:
        wrong.append(f"distinct ID {event.get('distinct_id')!r}, not {shopper.distinct_id!r}")
    if props.get("$session_id") != session_id:
        wrong.append(f"session ID {props.get('$session_id')!r}, not {session_id!r}")
    if props.get("plan") != shopper.plan:
        wrong.append(f"plan tag {props.get('plan')!r}, not {shopper.plan!r}")
    return "; ".join(wrong) or None


def check(events: Iterable[Mapping[str, Any]], sessions: Mapping[str, str]) -> Verdict:
    """Match ``events`` (as the collector received them) against the plan.

    Args:
        events: event dicts in PostHog's format (``event``, ``distinct_id``, ``properties``).
        sessions: shopper name -> the session ID their request used.
    """
    left = {name: list(expected) for name, expected in EXPECTED.items()}
    verdict = Verdict()
    for event in events:
        order_id = _props(event).get("order_id")
        shopper = _BY_ORDER.get(order_id) if isinstance(order_id, str) else None
        if shopper is None:
            verdict.rows.append(Row(event, None, None, "no known order_id"))
            continue
        match = next((e for e in left[shopper.name] if _matches(e, event)), None)
        if match is None:
            verdict.rows.append(Row(event, shopper.name, None, "not expected"))
            continue
        left[shopper.name].remove(match)
        problem = _attribution_problem(shopper, sessions[shopper.name], event)
        verdict.rows.append(Row(event, shopper.name, match, problem))
    verdict.missing = left
    return verdict


# -- the table ---------------------------------------------------------------------------


def _short(value: Any, keep: int = 8) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= keep + 3 else "..." + text[-keep:]


def _cells(row: Row) -> list[str]:
    props = _props(row.event)
    task = props.get("celery_task_name") or request_of(props) or "(web request)"
    retry = props.get("celery_retry_count")
    tags = [f"order={props.get('order_id', '-')}", f"plan={props.get('plan', '-')}"]
    if "sku" in props:
        tags.append(f"sku={props['sku']}")
    if row.event.get("event") == "$exception":
        tags.append(f"type={props.get('$exception_type', '-')}")
    if row.problem is None:
        verdict = "ok"
    elif row.expected is None:
        verdict = f"UNEXPECTED ({row.problem})"
    else:
        verdict = f"WRONG USER ({row.problem})"
    return [
        str(row.event.get("event")),
        str(row.event.get("distinct_id")),
        _short(props.get("$session_id")),
        str(task),
        "-" if retry is None else str(retry),
        " ".join(tags),
        verdict,
    ]


_HEADER = ["event", "distinct ID", "session", "task / request", "retry", "tags", "check"]


def _table(lines: Sequence[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADER))]
    return [
        "  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]


def render(verdict: Verdict, sessions: Mapping[str, str]) -> list[str]:
    """The report as lines: one table per shopper (missing events as MISSING rows), the
    events nobody expected, and the counts line last."""
    out: list[str] = []
    groups: list[tuple[str, list[list[str]]]] = []
    for shopper in SHOPPERS:
        order = {id(e): i for i, e in enumerate(EXPECTED[shopper.name])}
        rows = sorted(
            (r for r in verdict.rows if r.owner == shopper.name and r.expected is not None),
            key=lambda r: order.get(id(r.expected), len(order)),
        )
        lines = [_cells(r) for r in rows]
        lines += [_cells(r) for r in verdict.rows if r.owner == shopper.name and not r.expected]
        lines += [
            [e.event, "-", "-", e.task or e.request or "(web request)", "-", "", "MISSING"]
            for e in verdict.missing.get(shopper.name, [])
        ]
        title = (
            f"{shopper.name}: distinct ID {shopper.distinct_id}, "
            f"session {sessions[shopper.name]}, plan={shopper.plan}"
        )
        groups.append((title, lines))
    strays = [_cells(r) for r in verdict.rows if r.owner is None]
    if strays:
        groups.append(("events of no known order", strays))
    table = _table([_HEADER] + [line for _, lines in groups for line in lines])
    at = 1
    out.append(table[0])
    for title, lines in groups:
        out.append("")
        out.append(title)
        out.extend(table[at : at + len(lines)])
        at += len(lines)
    return out


def problems(verdict: Verdict) -> list[str]:
    """What is wrong, one line each; empty when ``verdict.ok``."""
    lines: list[str] = []
    for name, missing in verdict.missing.items():
        if missing:
            listed = ", ".join(e.describe() for e in missing)
            lines.append(f"missing for {name} ({len(missing)}): {listed}")
    for row in verdict.misattributed:
        assert row.expected is not None
        lines.append(f"wrong user on {row.expected.describe()} of {row.owner}: {row.problem}")
    for row in verdict.unexpected:
        props = _props(row.event)
        lines.append(
            f"unexpected {row.event.get('event')} (task {props.get('celery_task_name')}, "
            f"distinct ID {row.event.get('distinct_id')}): {row.problem}"
        )
    return lines


def counts(verdict: Verdict) -> str:
    """The last line of the report."""
    return (
        f"events received: {verdict.received}, attributed to the right user: "
        f"{verdict.attributed_right} of {verdict.expected_total} expected, "
        f"exceptions: {verdict.exceptions}"
    )
