"""Reading what `wrk --latency` prints, writing the Lua script that feeds it request bodies, and
the figures of a load run in rounds (:func:`round_figures`).

Pure functions (no processes, no files), so tests/unit/test_bench_serving.py checks them on wrk
output captured from real runs. `benchmarks/serving.py` imports this module by its plain name.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

# wrk prints times with these units (its format_time_us) and counts with metric suffixes.
_TIME_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([0-9.]+)(us|ms|s|m|h)"


class WrkOutputError(ValueError):
    """wrk's output lacks a figure the benchmark needs (a crashed run, or no --latency)."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, the latency distribution (ms) and every kind of failure it counted."""

    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0

    @property
    def errors(self) -> int:
        """Responses that were not a success, and requests that got no response at all."""
        return self.non_2xx + self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @property
    def problem(self) -> str | None:
        """Why this load's figures cannot be trusted (None when they can): failed requests, or no
        request completed at all (every reply slower than the load; wrk then prints zeros)."""
        if self.requests == 0:
            return f"no request completed in {self.seconds:.1f} s"
        if self.errors:
            # wrk counts a non-2xx reply among its requests, a socket error or timeout not.
            attempted = self.requests + self.errors - self.non_2xx
            return (f"{self.errors} of {attempted} requests failed (non-2xx {self.non_2xx}, "
                    f"timeouts {self.timeouts}, connect/read/write errors {self.connect_errors}/{self.read_errors}/{self.write_errors})")
        return None


def time_ms(text: str) -> float:
    """A wrk time such as ``438.79us``, ``9.76ms``, ``1.02s`` or ``1.00m``, in milliseconds."""
    match = re.fullmatch(_TIME, text.strip())
    if not match:
        raise WrkOutputError(f"not a wrk time: {text!r}")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """The figures of one ``wrk --latency`` run from its standard output."""
    percentiles = {int(p): time_ms(f"{value}{unit}") for p, value, unit in re.findall(rf"^\s+(\d+)%\s+{_TIME}\s*$", text, re.M)}
    missing = [p for p in (50, 75, 90, 99) if p not in percentiles]
    if missing:
        raise WrkOutputError(f"wrk printed no latency distribution (percentiles {missing} missing; run it with --latency):\n{text}")
    total = re.search(rf"^\s*(\d+) requests in {_TIME},", text, re.M)
    rate = re.search(r"^Requests/sec:\s+([0-9.]+)\s*$", text, re.M)
    if not total or not rate:
        raise WrkOutputError(f"wrk printed no request count or rate:\n{text}")
    non_2xx = re.search(r"^\s*Non-2xx or 3xx responses:\s+(\d+)\s*$", text, re.M)
    socket = re.search(r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$", text, re.M)
    connect, read, write, timeout = (int(n) for n in socket.groups()) if socket else (0, 0, 0, 0)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=time_ms(total.group(2) + total.group(3)) / 1e3,
        requests_per_s=float(rate.group(1)),
        p50_ms=percentiles[50],
        p75_ms=percentiles[75],
        p90_ms=percentiles[90],
        p99_ms=percentiles[99],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeout,
    )


def lua_script(bodies: list[str]) -> str:
    """A wrk script that POSTs the given JSON bodies in turn (each thread from its own start)."""
    if not bodies:
        raise ValueError("no request bodies to send")
    for body in bodies:
        if "]==]" in body:
            raise ValueError("a body holds the Lua long-string terminator ]==]")
    quoted = ",\n".join(f"[==[{body}]==]" for body in bodies)
    return (
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local bodies = {{\n{quoted}\n}}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #bodies + 1\n"
        "  return wrk.format(nil, nil, nil, bodies[i])\n"
        "end\n"
    )


def lua_file_script(body_path: str, headers: dict[str, str]) -> str:
    """A wrk script that POSTs one body read from a file (binary, any bytes) with these headers."""
    lines = ['wrk.method = "POST"']
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    lines += [f'local file = assert(io.open("{body_path}", "rb"))', "wrk.body = file:read(\"*a\")", "file:close()"]
    return "\n".join(lines) + "\n"


def round_figures(prefix: str, results: list[WrkResult], problems: dict[str, str]) -> dict[str, float]:
    """One load's figures: with several rounds, the median of each figure over the rounds (requests
    and errors summed), and each round's requests/s and p99 beside it."""
    for number, result in enumerate(results):
        if result.problem:
            where = prefix if len(results) == 1 else f"{prefix}_round{number + 1}"
            problems[where] = result.problem
            print(f"  PROBLEM in {where}: {result.problem}", flush=True)
    figures = {
        f"{prefix}_p50_ms": round(statistics.median(r.p50_ms for r in results), 3),
        f"{prefix}_p99_ms": round(statistics.median(r.p99_ms for r in results), 3),
        f"{prefix}_rps": round(statistics.median(r.requests_per_s for r in results), 1),
        f"{prefix}_requests": sum(r.requests for r in results),
        f"{prefix}_errors": sum(r.errors for r in results),
    }
    if len(results) > 1:
        for number, result in enumerate(results):
            figures[f"{prefix}_round{number + 1}_rps"] = round(result.requests_per_s, 1)
            figures[f"{prefix}_round{number + 1}_p99_ms"] = round(result.p99_ms, 3)
    return figures
