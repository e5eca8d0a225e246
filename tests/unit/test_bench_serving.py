"""benchmarks/serving.py's pure helpers: reading `wrk --latency` output, and the Lua script it feeds wrk.

The samples are wrk 4's output captured from real runs on this machine (the no-op KServe model and
`flywheel serve`), trailing spaces included: wrk pads a seconds figure ("1.23s ").
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading

import pytest

from benchmarks.wrk_output import WrkOutputError, WrkResult, lua_script, parse_wrk, round_figures, time_ms
from tests import tools

NOOP_C1 = """\
Running 2s test @ http://127.0.0.1:18731/v1/models/fraud:predict
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   438.79us  367.72us   5.87ms   97.00%
    Req/Sec     2.52k   132.77     2.66k    70.00%
  Latency Distribution
     50%  370.00us
     75%  386.00us
     90%  445.00us
     99%    2.65ms
  5019 requests in 2.00s, 0.91MB read
Requests/sec:   2508.87
Transfer/sec:    467.96KB
"""

SERVE_C64_SECONDS = """\
Running 3s test @ http://127.0.0.1:18740/v1/models/fraud:predict
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.22s   346.34ms   1.90s    68.70%
    Req/Sec    38.48     19.13    70.00     64.52%
  Latency Distribution
     50%    1.23s 
     75%    1.39s 
     90%    1.65s 
     99%    1.88s 
  131 requests in 3.10s, 29.28KB read
Requests/sec:     42.24
Transfer/sec:      9.44KB
"""

SERVE_NON_2XX = """\
Running 2s test @ http://127.0.0.1:18740/v1/models/fraud:predict
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    29.81ms   79.46ms 393.73ms   90.02%
    Req/Sec   422.47    209.16     1.07k    88.24%
  Latency Distribution
     50%    1.28ms
     75%    6.48ms
     90%  107.80ms
     99%  365.97ms
  727 requests in 2.02s, 149.22KB read
  Non-2xx or 3xx responses: 727
Requests/sec:    360.15
Transfer/sec:     73.92KB
"""

SERVE_BATCH_TIMEOUTS = """\
Running 4s test @ http://127.0.0.1:18742/v1/models/fraud:predict
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   485.55ms  170.36ms 599.17ms   85.71%
    Req/Sec     5.60      3.89    10.00     40.00%
  Latency Distribution
     50%  570.70ms
     75%  590.60ms
     90%  599.17ms
     99%  599.17ms
  20 requests in 4.02s, 1.64MB read
  Socket errors: connect 0, read 0, write 0, timeout 13
Requests/sec:      4.98
Transfer/sec:    418.10KB
"""

# Against a server slower than the load (every reply after the 1 s load had ended): wrk prints zeros.
NO_REPLY_IN_TIME = """\
Running 1s test @ http://127.0.0.1:18750/v1/models/fraud:predict
  2 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.01s, 0.00B read
Requests/sec:      0.00
Transfer/sec:       0.00B
"""


def test_microsecond_latencies_and_the_rate_of_a_clean_run():
    """Bug caught: a microsecond figure read as milliseconds (a no-op p50 of 370 ms)."""
    result = parse_wrk(NOOP_C1)
    assert (result.p50_ms, result.p75_ms, result.p90_ms, result.p99_ms) == pytest.approx((0.370, 0.386, 0.445, 2.65))
    assert result.requests_per_s == pytest.approx(2508.87)
    assert (result.requests, result.seconds) == (5019, pytest.approx(2.0))
    assert result.errors == 0 and result.problem is None


def test_seconds_padded_with_a_space_are_read_as_seconds():
    """Bug caught: "1.23s " (wrk pads it) not matched, or seconds read as milliseconds."""
    result = parse_wrk(SERVE_C64_SECONDS)
    assert (result.p50_ms, result.p99_ms) == pytest.approx((1230.0, 1880.0))
    assert (result.requests, result.seconds, result.requests_per_s) == (131, pytest.approx(3.10), pytest.approx(42.24))


def test_failed_responses_are_counted_as_errors():
    """Bug caught: a load answered by 400s reported as a fast, healthy server."""
    result = parse_wrk(SERVE_NON_2XX)
    assert result.non_2xx == 727 == result.requests
    assert result.errors == 727
    assert "727 of 727 requests failed (non-2xx 727" in result.problem


def test_timeouts_are_counted_as_errors():
    """Bug caught: requests wrk gave up on (left out of its latency figures) going unnoticed."""
    result = parse_wrk(SERVE_BATCH_TIMEOUTS)
    assert (result.timeouts, result.connect_errors, result.read_errors, result.write_errors) == (13, 0, 0, 0)
    assert result.errors == 13 and result.non_2xx == 0
    assert result.p99_ms == pytest.approx(599.17)
    assert result.problem.startswith("13 of 33 requests failed") and "timeouts 13" in result.problem


def test_a_load_where_no_request_completed_is_a_problem_not_a_zero_latency():
    """Bug caught: a batch load slower than the load's duration reported as 0 ms and 0 rows/s with
    no error (it happened: 1,000-row batches taking 1.4 s each, 8 at a time, in a 3 s load)."""
    result = parse_wrk(NO_REPLY_IN_TIME)
    assert result.requests == 0 and result.errors == 0
    assert result.problem == "no request completed in 1.0 s"


def test_a_run_without_the_latency_distribution_or_a_failed_wrk_is_refused():
    """Bug caught: a p99 silently taken from the thread stats (or zero) when --latency was left out."""
    without_latency = "\n".join(line for line in NOOP_C1.splitlines() if "%" not in line or "Latency  " in line)
    with pytest.raises(WrkOutputError, match="--latency"):
        parse_wrk(without_latency)
    with pytest.raises(WrkOutputError):
        parse_wrk("Usage: wrk <options> <url>\n  Options:\n")


@pytest.mark.parametrize("text, ms", [("438.79us", 0.43879), ("9.76ms", 9.76), ("1.90s", 1900.0), ("1.00m", 60_000.0)])
def test_time_units(text, ms):
    assert time_ms(text) == pytest.approx(ms)


def test_a_body_that_would_end_the_lua_string_is_refused():
    with pytest.raises(ValueError, match=r"\]==\]"):
        lua_script(['{"x": "]==]"}'])
    with pytest.raises(ValueError):
        lua_script([])


def test_wrk_posts_every_body_in_turn(tmp_path):
    """Bug caught: a script wrk cannot load, or one that sends one body over and over (every lookup
    the same card): a real wrk against a loopback server that records the bodies it gets."""
    bodies = [json.dumps({"instances": [{"card_id": f"c{i}", "note": "quotes ' \" and [[brackets]]"}]}) for i in range(5)]
    received: list[bytes] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.headers["Content-Type"] == "application/json"
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = tmp_path / "bodies.lua"
    script.write_text(lua_script(bodies))
    try:
        done = subprocess.run([tools.require("wrk"), "-t", "1", "-c", "1", "-d", "1s", "--latency", "-s", str(script),
                               f"http://127.0.0.1:{server.server_port}/v1/models/fraud:predict"],
                              capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    result = parse_wrk(done.stdout)
    assert result.errors == 0 and len(received) >= len(bodies)
    # wrk may call the script's request() once before the load starts: the sequence is a rotation
    # through every body, from wherever it begins.
    order = [bodies.index(body.decode()) for body in received]
    assert set(order) == set(range(len(bodies)))
    assert all((after - before) % len(bodies) == 1 for before, after in zip(order, order[1:])), order[:20]


def test_a_load_in_rounds_reports_the_median_of_each_figure_and_every_round():
    """One slow round (a noisy moment of the shared machine) neither sets the figure nor hides: the
    medians are the figures, each round's requests/s and p99 are kept, a failed round is named."""
    def run(rps, p99, non_2xx=0):
        return WrkResult(requests=int(rps * 10), seconds=10.0, requests_per_s=rps, p50_ms=p99 / 2, p75_ms=p99 / 1.5,
                         p90_ms=p99 / 1.2, p99_ms=p99, non_2xx=non_2xx)
    problems: dict[str, str] = {}
    figures = round_figures("redis_w1_c8", [run(1800.0, 7.0), run(900.0, 30.0), run(1700.0, 8.0, non_2xx=2)], problems)
    assert figures["redis_w1_c8_rps"] == 1700.0 and figures["redis_w1_c8_p99_ms"] == 8.0 and figures["redis_w1_c8_p50_ms"] == 4.0
    assert figures["redis_w1_c8_requests"] == 18000 + 9000 + 17000 and figures["redis_w1_c8_errors"] == 2
    assert [figures[f"redis_w1_c8_round{k}_rps"] for k in (1, 2, 3)] == [1800.0, 900.0, 1700.0]
    assert figures["redis_w1_c8_round2_p99_ms"] == 30.0
    assert list(problems) == ["redis_w1_c8_round3"] and "2 of" in problems["redis_w1_c8_round3"]
    single = round_figures("noop_w1_c1", [run(2000.0, 1.0)], problems)
    assert single["noop_w1_c1_rps"] == 2000.0 and not any("round" in name for name in single)
