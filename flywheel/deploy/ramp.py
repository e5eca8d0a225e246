"""Driving a local canary: ramp its traffic share through steps behind the splitting proxy, judge
each window, then promote (100%) or roll back (0%, at once), and write the decision record.

The load is a replay: request bodies (e.g. held-out transactions as v1 bodies, see
:func:`v1_bodies`) sent through the proxy, ``concurrency`` at a time, ``window_requests`` per
window, cycling through the replay when it runs out. What the replay's clients got is recorded too:
a canary rollout must never fail a client request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from typing import Any, Iterable, Mapping, Protocol, Sequence

from flywheel.deploy.analysis import Thresholds, WindowObservations
from flywheel.deploy.canary import PROMOTE, DecisionRecord, analyse, now, write_record
from flywheel.errors import CanaryError, first_line
from flywheel.storage import Storage

log = logging.getLogger(__name__)



class TrafficControl(Protocol):
    """What the ramp needs of a proxy (:class:`flywheel.deploy.traffic.RunningProxy` has it)."""

    url: str

    def set_canary_percent(self, percent: int) -> None: ...

    def take_window(self, thresholds: Thresholds | None = None) -> WindowObservations: ...

    def window_requests(self) -> int: ...


def _json_safe(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def v1_bodies(rows: Iterable[Mapping[str, Any]], per_request: int = 1, fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """KServe v1 bodies (``{"instances": [...]}``) of ``per_request`` rows each, from rows with the
    request's fields (e.g. ``frame.to_dict("records")`` of a held-out set): only ``fields`` when
    given (the label and anything else outside the request left out), a missing value left out,
    times as ISO-8601 strings."""
    if per_request < 1:
        raise CanaryError(f"per_request must be at least 1, got {per_request}")
    instances = [{name: _json_safe(value) for name, value in row.items()
                  if (fields is None or name in fields) and value is not None and _json_safe(value) is not None}
                 for row in rows]
    return [{"instances": instances[i:i + per_request]} for i in range(0, len(instances), per_request)]


def _check_steps(steps: Sequence[int]) -> list[int]:
    steps = list(steps)
    if not steps or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 100 for s in steps):
        raise CanaryError(f"canary steps must be whole percents from 1 to 100, got {steps!r}")
    if steps != sorted(set(steps)):
        raise CanaryError(f"canary steps must rise, each once: got {steps!r}")
    return steps


async def _send(url: str, bodies: Sequence[bytes], start: int, count: int, concurrency: int, timeout_s: float) -> Counter[str]:
    """Send ``count`` bodies (from ``start``, cycling) to ``url``, ``concurrency`` at a time; the
    answers' statuses (or the transport error's type) counted."""
    import httpx

    outcomes: Counter[str] = Counter()
    next_index = iter(range(start, start + count))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        async def worker() -> None:
            for index in next_index:
                try:
                    response = await client.post(url, content=bodies[index % len(bodies)],
                                                 headers={"Content-Type": "application/json"})
                    outcomes[str(response.status_code)] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def _await_live(proxy: TrafficControl, count: int, timeout_s: float) -> Counter[str]:
    """Wait until ``count`` predict requests reached the proxy (or ``timeout_s`` passed): live traffic."""
    deadline = time.monotonic() + timeout_s
    while proxy.window_requests() < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return Counter()


def ramp_canary(
    proxy: TrafficControl,
    replay: Sequence[Mapping[str, Any] | bytes] | None,
    path: str,
    *,
    steps: Sequence[int] = (10, 50),
    window_requests: int = 500,
    canary_window_requests: int | None = None,
    windows_per_step: int = 1,
    thresholds: Thresholds | None = None,
    concurrency: int = 16,
    request_timeout_s: float = 30.0,
    live_window_timeout_s: float = 300.0,
    storage: Storage | None = None,
    record_uri: str | None = None,
    meta: Mapping[str, Any] | None = None,
    record: DecisionRecord | None = None,
) -> DecisionRecord:
    """Ramp the canary through ``steps`` (percents), ``windows_per_step`` windows each, judging every
    window with :func:`flywheel.deploy.analysis.judge` (through :func:`flywheel.deploy.canary.analyse`).
    The first failed window rolls back (0%, at once); passing them all promotes (100%). Returns the
    decision record (``record``, filled in, or a new one), also written (JSON and markdown) to
    ``record_uri`` through ``storage`` when both are given.

    A window is ``window_requests`` requests, or with ``canary_window_requests`` as many as give the
    canary that many at the step's share (100 at 10%: 1,000 requests). ``replay`` None: no requests
    are sent; each window is the next requests of live traffic through the proxy (judged with what
    came, if fewer came in ``live_window_timeout_s``). ``path``: the predict path requests are sent
    to through the proxy, e.g. ``/v1/models/fraud:predict``; ``meta``: what the caller adds to the
    record.
    """
    steps = _check_steps(steps)
    thresholds = thresholds or Thresholds()
    if window_requests < 1 or windows_per_step < 1 or concurrency < 1 or (canary_window_requests or 1) < 1:
        raise CanaryError("window_requests, windows_per_step and concurrency must each be at least 1")
    if replay is not None and not replay:
        raise CanaryError("the replay has no requests to send (pass None to judge live traffic instead)")
    if not path.startswith("/"):
        raise CanaryError(f"the predict path must start with '/', got {path!r}")
    if (storage is None) != (record_uri is None):
        raise CanaryError("give both storage and record_uri to write the decision record, or neither")
    bodies = [body if isinstance(body, bytes) else json.dumps(body).encode() for body in replay or []]
    url = proxy.url.rstrip("/") + path
    meta = dict(meta or {})
    if record is None:
        record = DecisionRecord(model_name=str(meta.get("model_name", "")), candidate=str(meta.get("candidate", "")),
                                stable=meta.get("stable"), target="local", run_id=str(meta.get("run_id", "")),
                                thresholds={}, steps=[])
    record.meta.update(meta, proxy=proxy.url, path=path, concurrency=concurrency, windows_per_step=windows_per_step)
    record.thresholds, record.steps = thresholds.to_dict(), steps
    record.source = "replay" if replay is not None else "live"

    def size(step: int) -> int:
        return math.ceil(canary_window_requests * 100 / step) if canary_window_requests else window_requests

    clock = time.perf_counter()
    client: Counter[str] = Counter()
    sent = 0

    def observe(step: int, _: int) -> tuple[WindowObservations, dict[str, Any]]:
        nonlocal sent
        proxy.set_canary_percent(step)  # the counter restarts: the window's split is exact
        proxy.take_window()  # what came before (live requests under the previous share) is not judged
        if replay is None:
            outcomes = asyncio.run(_await_live(proxy, size(step), live_window_timeout_s))
        else:
            outcomes = asyncio.run(_send(url, bodies, sent, size(step), concurrency, request_timeout_s))
        sent += size(step)
        client.update(outcomes)
        observations = proxy.take_window(thresholds)
        log.info("canary at %d%%: %d requests, %d to the canary", step, observations.client.get("requests", 0),
                 observations.canary.requests)
        return observations, {"client_statuses": dict(outcomes)}

    plan = [step for step in steps for _ in range(windows_per_step)]
    verdict = analyse(record, plan, observe, thresholds)
    # Roll back first (at once), write down why after.
    record.final_canary_percent = 100 if verdict == PROMOTE else 0
    proxy.set_canary_percent(record.final_canary_percent)
    record.events.append(f"proxy: canary traffic {record.final_canary_percent}%")
    record.decided_at = now()
    record.duration_s = round(time.perf_counter() - clock, 3)
    record.client = {
        "requests": sum(client.values()),
        "failures": sum(n for status, n in client.items() if not (status.isdigit() and int(status) < 500)),
        "statuses": dict(client),
    }
    log.info("canary %s: %s", verdict, "; ".join(record.reasons))
    if storage is not None and record_uri is not None:
        try:
            write_record(storage, record, record_uri)
        except Exception as exc:  # the decision is made and applied; say where its record could not go
            raise CanaryError(f"the canary's {verdict} was applied (traffic {record.final_canary_percent}%) but its "
                              f"decision record could not be written to {record_uri}: {first_line(exc)}") from exc
    return record
