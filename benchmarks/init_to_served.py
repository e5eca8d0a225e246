"""From a team's data file to a served model: the README's "Bring your own use case" commands,
verbatim, then `flywheel serve` of the model they trained and one scoring request, counted in
commands, in lines the user writes, and in seconds.

    python benchmarks/init_to_served.py [--quick]

The data is a web shop's orders no use case here has (tests/integration/test_init.py: customers,
integer shop ids, a total, a payment method, whether the order was returned). The commands run in a
fresh folder with a fresh $FLYWHEEL_HOME, as a new user runs them; the files `flywheel init` writes
are used as they are, so the lines the user writes are zero (editing them is where a team starts
improving its model, not what it takes to serve one). Writes benchmarks/results/init_to_served.json
(init_to_served-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from results_table import write_results

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.integration.test_init import orders  # noqa: E402
from tests.integration.test_readme_usecase import commands  # noqa: E402  (the README's block, verbatim)
from tests.servers import free_port, wait_until_ready  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 orders instead of 20,000")
    args = parser.parse_args()
    rows = 2_000 if args.quick else 20_000
    work = Path(tempfile.mkdtemp(prefix="flywheel-init-to-served-"))
    checkout = work / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)
    orders(rows).to_csv(checkout / "orders.csv", index=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_HOME=str(work / "home"), PYTHONPATH=str(REPO))
    figures: dict[str, float] = {"orders": float(rows)}
    started = time.perf_counter()
    outputs = []
    lines = commands()
    for line in lines:
        began = time.perf_counter()
        result = subprocess.run(["bash", "-c", line], cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise SystemExit(f"{line}\n{result.stdout}\n{result.stderr}")
        words = line.split()
        step = "_".join(words[1:3]).replace("-", "_") if words[1] == "features" else words[1]
        figures[f"{step}_s"] = round(time.perf_counter() - began, 2)
        outputs.append(result.stdout)
    version = re.search(r"model returns (\S+) \(local\)", "".join(outputs)).group(1)
    port = free_port()
    serve = [".venv/bin/flywheel", "serve", "--usecase", "usecases/returns", "--version", version, "--port", str(port),
             "--host", "127.0.0.1", "--grpc-port", str(free_port())]
    began = time.perf_counter()
    log = work / "serve.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(serve, cwd=checkout, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(server, f"http://127.0.0.1:{port}/v1/models/returns", 180, output=log.read_text)
        figures["serve_ready_s"] = round(time.perf_counter() - began, 2)
        order = {"customer": "cust0007", "shop": 12, "placed_at": "2026-05-22T10:00:00Z", "order_total": 80.0,
                 "payment": "card"}
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/models/returns:predict", json={"instances": [order]}, timeout=10)
        answer.raise_for_status()
        probability = answer.json()["predictions"][0]["returned_probability"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    figures["total_s"] = round(time.perf_counter() - started, 2)
    figures["commands"] = float(len(lines) + 1)  # the README's, and serve
    written = sum(1 for path in (checkout / "usecases" / "returns").iterdir() if path.is_file())
    figures["files_init_wrote"] = float(written)
    figures["lines_the_user_writes"] = 0.0  # every file is init's, used as written
    figures["first_prediction"] = round(float(probability), 4)
    name = "init_to_served-quick.json" if args.quick else "init_to_served.json"
    write_results(Path(__file__).parent / "results" / name, figures, {},
                  commands=[*lines, " ".join(serve)])


if __name__ == "__main__":
    main()
