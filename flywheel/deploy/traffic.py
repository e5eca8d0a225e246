"""A splitting reverse proxy in front of two model servers: stable, and a canary.

Predict requests (KServe v1 ``POST /v1/models/<name>:predict`` and v2
``POST /v2/models/<name>/infer``) go to the canary at ``canary_percent`` percent, chosen by a
counter so the split is exact (of any 100 consecutive requests after a change, exactly that many
go to the canary); everything else (health, readiness, metadata) goes to stable.

A request routed to the canary is also sent to stable at the same time (a shadow). The client gets
the canary's answer when the canary answers in time; a canary failure (a 5xx, a refused
connection, a timeout, an answer without readable scores, a 4xx for a request stable answered) is
answered from stable, so a client never sees one. The canary's timeout is ``canary_timeout_s`` if
set, else ``canary_timeout_factor`` x stable's recent p99 latency (never below
``canary_timeout_floor_s``); a canary timeout in a stall that stable's calls of the same moment
suffered too is not held against the canary (:func:`flywheel.deploy.analysis.shared_stalls`).
Both arms' calls and the pairs of scores are recorded;
:meth:`SplittingProxy.take_window` summarises and resets them (see :mod:`flywheel.deploy.analysis`).

:class:`SplittingProxy` runs on the caller's event loop; :func:`start_proxy` runs one on a
thread of its own and returns a synchronous handle, :class:`RunningProxy`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
import urllib.parse
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from flywheel.deploy.analysis import Sample, ScorePair, Thresholds, WindowObservations, summarise
from flywheel.errors import CanaryError, first_line

log = logging.getLogger(__name__)

V1_PREDICT = re.compile(r"^/v1/models/[^/]+:predict$")
V2_INFER = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
ARM_HEADER = "X-Flywheel-Arm"  # which arm answered a predict request: stable or canary
# Request headers never forwarded (hop-by-hop, or set again by the client library).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


def predict_protocol(method: str, path: str) -> str | None:
    """``v1`` or ``v2`` for a predict request, None for anything else."""
    if method != "POST":
        return None
    if V1_PREDICT.match(path):
        return "v1"
    if V2_INFER.match(path):
        return "v2"
    return None


def scores_of(protocol: str, body: bytes, score_field: str | None = None) -> tuple[float, ...] | None:
    """The scores in a predict answer, or None when there are none to read.

    v1: ``{"predictions": [p, ...]}`` or ``[{score_field: p, ...}, ...]`` (without a ``score_field``,
    each prediction's first field: the predictor answers its task's output first); a value that is a
    mapping (a multiclass model's probability per class) counts each class's; v2: the output named
    ``score_field`` (else the first output)'s ``data``.
    """
    try:
        answer = json.loads(body)
        if protocol == "v1":
            values = []
            for item in answer["predictions"]:
                value = (item[score_field] if score_field else next(iter(item.values()))) if isinstance(item, dict) else item
                values.extend(value.values() if isinstance(value, dict) else [value])
        else:
            outputs = answer["outputs"]
            chosen = next((o for o in outputs if o.get("name") == score_field), outputs[0])
            values = list(np.asarray(chosen["data"], dtype=float).ravel())
        scores = tuple(float(v) for v in values)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, StopIteration):
        return None
    if any(isinstance(v, bool) for v in values) or not all(np.isfinite(scores)):
        return None
    return scores


def check_base_url(url: str, arm: str) -> str:
    """A model server's base URL (``http://host:port``), without a trailing slash; a clear error otherwise."""
    parsed = urllib.parse.urlparse(url or "")
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise CanaryError(f"the {arm} server's URL must be http(s)://host:port, got {url!r}")
    try:
        parsed.port
    except ValueError:
        raise CanaryError(f"the {arm} server's URL has an invalid port: {url!r}") from None
    return url.rstrip("/")


def check_percent(percent: Any) -> int:
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise CanaryError(f"the canary's traffic share must be a whole percent from 0 to 100, got {percent!r}")
    return percent


@dataclass
class Upstream:
    """One call to one arm: its answer, or why there is none."""

    status: int
    body: bytes
    content_type: str
    latency_ms: float
    error: str = ""  # a transport failure; empty when an answer came back
    timeout: bool = False
    started_s: float | None = None  # time.perf_counter() when the call was sent
    limit_ms: float | None = None  # the timeout it was held to


class _Window:
    """What one window recorded: every predict request that arrived in it is recorded here, even
    when it completes after the window was taken (:meth:`SplittingProxy.take_window` waits for it)."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.pairs: list[ScorePair] = []
        self.client: Counter[str] = Counter()
        self.in_flight = 0  # requests and shadow calls of this window still running
        self.closed = False
        self.drained = asyncio.Event()

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.closed and self.in_flight == 0:
            self.drained.set()

    async def close(self, timeout_s: float) -> None:
        self.closed = True
        if self.in_flight:
            try:
                await asyncio.wait_for(self.drained.wait(), timeout_s)
            except TimeoutError:
                log.warning("%d requests of the closed window are still running; summarised without them", self.in_flight)


class SplittingProxy:
    """The proxy on an asyncio loop: ``await start()``, ``set_canary_percent()``, ``await take_window()``,
    ``await stop()``."""

    def __init__(
        self,
        stable_url: str,
        canary_url: str,
        *,
        canary_percent: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        stable_timeout_s: float = 30.0,
        canary_timeout_s: float | None = None,
        canary_timeout_factor: float = 5.0,
        canary_timeout_floor_s: float = 0.25,
        thresholds: Thresholds | None = None,
        score_field: str | None = None,  # the model's output (default: each prediction's first field)
        max_body_bytes: int = 16 * 1024 * 1024,
        # A replay's expectations: the sha256 of a request body -> the candidate's minus production's
        # scores on its rows offline (flywheel.deploy.analysis.ScorePair.expected).
        expected: dict[bytes, tuple[float, ...]] | None = None,
    ) -> None:
        self.stable_url = check_base_url(stable_url, "stable")
        self.canary_url = check_base_url(canary_url, "canary")
        if stable_timeout_s <= 0 or (canary_timeout_s is not None and canary_timeout_s <= 0):
            raise CanaryError("timeouts must be positive numbers of seconds")
        if canary_timeout_factor <= 0 or canary_timeout_floor_s <= 0:
            raise CanaryError("canary_timeout_factor and canary_timeout_floor_s must be positive")
        self.host, self.port = host, port
        self.stable_timeout_s = stable_timeout_s
        self.canary_timeout_s = canary_timeout_s
        self.canary_timeout_factor = canary_timeout_factor
        self.canary_timeout_floor_s = canary_timeout_floor_s
        self.thresholds = thresholds or Thresholds()
        self.score_field = score_field
        self.max_body_bytes = max_body_bytes
        self.expected = dict(expected or {})
        self._lock = threading.Lock()  # the split can be changed from another thread
        self._percent = check_percent(canary_percent)
        self._counter = 0
        self._window = _Window()
        self._stable_recent: deque[float] = deque(maxlen=1000)  # stable latencies (ms), for the canary's timeout
        self._stable_p99_ms: float | None = None
        self._since_p99 = 0
        self._shadows: set[asyncio.Task[Any]] = set()  # kept referenced until done
        self._session: Any = None
        self._runner: Any = None
        self.url = ""

    # ------------------------------------------------------------------ control
    @property
    def canary_percent(self) -> int:
        return self._percent

    def set_canary_percent(self, percent: int) -> None:
        """Change the canary's share of predict requests now (thread-safe); the counter restarts so
        the new share is exact from the next request on."""
        percent = check_percent(percent)
        with self._lock:
            self._percent, self._counter = percent, 0
        log.info("canary traffic: %d%%", percent)

    def _to_canary(self) -> bool:
        """Request k (from 0 after the last change) goes to the canary when floor((k+1)p/100) > floor(kp/100)."""
        with self._lock:
            k, p = self._counter, self._percent
            self._counter += 1
        return (k + 1) * p // 100 > k * p // 100

    def canary_timeout(self) -> float:
        """Seconds the canary may take before its request is answered from stable."""
        if self.canary_timeout_s is not None:
            return self.canary_timeout_s
        if self._stable_p99_ms is None:
            return self.canary_timeout_floor_s
        return min(self.stable_timeout_s, max(self.canary_timeout_floor_s, self.canary_timeout_factor * self._stable_p99_ms / 1000))

    def window_requests(self) -> int:
        """Predict requests received since the last :meth:`take_window`."""
        return self._window.client["requests"]

    async def take_window(self, thresholds: Thresholds | None = None) -> WindowObservations:
        """The requests that arrived since the last call, summarised once they (and their shadow
        calls) are done; a new window starts at once."""
        window, self._window = self._window, _Window()
        await window.close(self.stable_timeout_s + 5)
        client = window.client
        for key in ("requests", "to_canary", "answered_by_canary", "fallbacks", "failures"):
            client.setdefault(key, 0)
        return summarise(window.samples, window.pairs, dict(client), thresholds or self.thresholds, self._percent)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> str:
        """Listen on ``host:port`` (port 0: a free one); returns the proxy's base URL."""
        import aiohttp
        from aiohttp import web

        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            auto_decompress=False,
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise CanaryError(f"the splitting proxy cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.host}:{port}"
        log.info("splitting proxy on %s: stable %s, canary %s at %d%%", self.url, self.stable_url, self.canary_url, self._percent)
        return self.url

    async def stop(self) -> None:
        if self._shadows:
            await asyncio.wait(set(self._shadows), timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ requests
    async def _call(self, base: str, method: str, path_qs: str, body: bytes, headers: dict[str, str], timeout_s: float) -> Upstream:
        import aiohttp

        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                for attempt in (1, 2):
                    try:
                        async with self._session.request(method, base + path_qs, data=body or None, headers=headers) as response:
                            data = await response.read()
                            return Upstream(response.status, data, response.headers.get("Content-Type", "application/json"),
                                            (time.perf_counter() - started) * 1000, started_s=started, limit_ms=timeout_s * 1000)
                    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                        # A kept-alive connection the server closed: KServe (uvicorn) closes it after a
                        # handler raised, without saying so in its 500. Once, on a new connection; a
                        # server that refuses connections (ClientConnectorError) is not retried.
                        if attempt == 2 or isinstance(exc, aiohttp.ClientConnectorError):
                            raise
                raise AssertionError("unreachable")
        except TimeoutError:
            elapsed = (time.perf_counter() - started) * 1000
            return Upstream(504, b"", "", elapsed, error=f"timeout after {timeout_s * 1000:.0f} ms", timeout=True,
                            started_s=started, limit_ms=timeout_s * 1000)
        except aiohttp.ClientError as exc:
            return Upstream(502, b"", "", (time.perf_counter() - started) * 1000, error=f"connection: {first_line(exc)}",
                            started_s=started, limit_ms=timeout_s * 1000)

    def _record_stable(self, window: _Window, answer: Upstream, shadow: bool = False) -> None:
        ok = not answer.error and answer.status < 500
        window.samples.append(Sample("stable", ok, answer.latency_ms, answer.error or ("" if ok else f"HTTP {answer.status}"),
                                     answer.timeout, shadow, answer.started_s, answer.limit_ms))
        if ok:
            self._stable_recent.append(answer.latency_ms)
            self._since_p99 += 1
            if self._stable_p99_ms is None or self._since_p99 >= 50:
                self._stable_p99_ms, self._since_p99 = float(np.percentile(self._stable_recent, 99)), 0

    @staticmethod
    def _reply(answer: Upstream, arm: str, base: str, window: _Window | None = None) -> Any:
        from aiohttp import web

        client = window.client if window is not None else Counter()
        if answer.error:
            client["failures"] += 1
            status = 504 if answer.timeout else 502
            message = f"the {arm} model server at {base} did not answer: {answer.error}"
            return web.json_response({"error": message}, status=status, headers={ARM_HEADER: arm})
        if answer.status >= 500:
            client["failures"] += 1
        return web.Response(status=answer.status, body=answer.body, headers={"Content-Type": answer.content_type, ARM_HEADER: arm})

    async def _handle(self, request: Any) -> Any:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        path_qs = request.rel_url.raw_path_qs if hasattr(request.rel_url, "raw_path_qs") else str(request.rel_url)
        protocol = predict_protocol(request.method, request.path)
        if protocol is None:  # health, readiness, metadata: stable's answer
            answer = await self._call(self.stable_url, request.method, path_qs, body, headers, self.stable_timeout_s)
            return self._reply(answer, "stable", self.stable_url)
        window = self._window
        window.enter()
        try:
            return await self._predict(window, protocol, path_qs, body, headers)
        finally:
            window.leave()

    async def _predict(self, w: _Window, protocol: str, path_qs: str, body: bytes, headers: dict[str, str]) -> Any:
        w.client["requests"] += 1
        if not self._to_canary():
            answer = await self._call(self.stable_url, "POST", path_qs, body, headers, self.stable_timeout_s)
            self._record_stable(w, answer)
            return self._reply(answer, "stable", self.stable_url, w)

        w.client["to_canary"] += 1
        shadow = asyncio.create_task(self._call(self.stable_url, "POST", path_qs, body, headers, self.stable_timeout_s))
        canary = await self._call(self.canary_url, "POST", path_qs, body, headers, self.canary_timeout())
        canary_scores = scores_of(protocol, canary.body, self.score_field) if not canary.error and canary.status == 200 else None
        failure = self._canary_failure(canary, canary_scores)
        if failure is None and 400 <= canary.status < 500:
            stable = await shadow  # the canary refused it: a failure only if stable did not
            self._record_stable(w, stable, shadow=True)
            if not stable.error and stable.status < 400:
                failure = f"HTTP {canary.status} for a request stable answered with {stable.status}"
            w.samples.append(Sample("canary", failure is None, canary.latency_ms, failure or ""))
            if failure is not None:
                w.client["fallbacks"] += 1
                return self._reply(stable, "stable", self.stable_url, w)
            w.client["answered_by_canary"] += 1
            return self._reply(canary, "canary", self.canary_url, w)
        w.samples.append(Sample("canary", failure is None, canary.latency_ms, failure or "", canary.timeout,
                                started_s=canary.started_s, limit_ms=canary.limit_ms))
        if failure is not None:
            w.client["fallbacks"] += 1
            stable = await shadow
            self._record_stable(w, stable, shadow=True)
            return self._reply(stable, "stable", self.stable_url, w)
        w.client["answered_by_canary"] += 1
        w.enter()  # the shadow's answer belongs to this window too
        expected = self.expected.get(hashlib.sha256(body).digest()) if self.expected else None
        task = asyncio.create_task(self._pair(w, shadow, protocol, canary_scores, expected))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)
        return self._reply(canary, "canary", self.canary_url, w)

    @staticmethod
    def _canary_failure(canary: Upstream, scores: tuple[float, ...] | None) -> str | None:
        if canary.error:
            return canary.error
        if canary.status >= 500:
            return f"HTTP {canary.status}"
        if canary.status == 200 and scores is None:
            return "an answer without readable scores"
        return None

    async def _pair(self, w: _Window, shadow: asyncio.Task[Upstream], protocol: str, canary_scores: tuple[float, ...] | None,
                    expected: tuple[float, ...] | None = None) -> None:
        try:
            stable = await shadow
            self._record_stable(w, stable, shadow=True)
            if canary_scores is not None and not stable.error and stable.status == 200:
                stable_scores = scores_of(protocol, stable.body, self.score_field)
                if stable_scores is not None:
                    w.pairs.append(ScorePair(stable_scores, canary_scores, expected))
        finally:
            w.leave()


class RunningProxy:
    """A :class:`SplittingProxy` serving on its own thread and event loop; every method is
    synchronous and thread-safe. Use as a context manager, or call :meth:`close`."""

    def __init__(self, proxy: SplittingProxy) -> None:
        self.proxy = proxy
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flywheel-splitting-proxy", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.proxy.start())
        except BaseException as exc:  # handed to the starting thread
            self._error = exc
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.proxy.stop())
        self._loop.close()

    @property
    def url(self) -> str:
        return self.proxy.url

    @property
    def canary_percent(self) -> int:
        return self.proxy.canary_percent

    def set_canary_percent(self, percent: int) -> None:
        self.proxy.set_canary_percent(percent)

    def window_requests(self) -> int:
        return self.proxy.window_requests()

    def take_window(self, thresholds: Thresholds | None = None) -> WindowObservations:
        return asyncio.run_coroutine_threadsafe(self.proxy.take_window(thresholds), self._loop).result()

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> "RunningProxy":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def start_proxy(stable_url: str, canary_url: str, **options: Any) -> RunningProxy:
    """Start a splitting proxy on a thread of its own (options: those of :class:`SplittingProxy`)."""
    return RunningProxy(SplittingProxy(stable_url, canary_url, **options))
