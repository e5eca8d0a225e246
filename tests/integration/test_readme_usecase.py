"""The README's "Bring your own use case" commands, verbatim, on generated web-shop orders: from a
data file to a training set and a materialized online store, for a use case the platform has never
seen."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests import tools
from tests.factories import REPO
from tests.integration.test_readme import port_is_free
from tests.servers import free_port
from tests.integration.test_init import orders


def commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Bring your own use case\n(.*?)^## ", text, re.S | re.M).group(1)
    [block] = re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M)
    return [line for line in block.splitlines() if line.strip()]


def test_bring_your_own_use_case_verbatim(tmp_path):
    lines = commands()
    assert [line.split()[0].rsplit("/", 1)[-1] + " " + line.split()[1] for line in lines] == [
        "flywheel init", "flywheel ingest", "flywheel features", "flywheel train", "flywheel features", "flywheel gc",
        "flywheel serve", "curl -s", "kill $!"]
    tools.require("curl")
    # The serve, the request and the kill run as one shell (the kill names the server it started);
    # only the port moves when 8080 is taken here, never the commands' text otherwise.
    serving = "\n".join(lines[6:])
    if not port_is_free(8080):
        serving = serving.replace("8080", str(free_port()))
    lines = lines[:6] + [serving]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)  # the commands say .venv/bin/flywheel
    orders(2000).to_csv(checkout / "orders.csv", index=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    outputs = []
    for line in lines:
        result = subprocess.run(["bash", "-c", line], cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        assert "Traceback" not in result.stderr
        outputs.append(result.stdout)
    assert (checkout / "usecases" / "returns" / "contract.yaml").is_file()
    assert "2,000 rows accepted" in outputs[1]
    train = pd.read_parquet(checkout / "returns-training-set" / "train.parquet")
    assert {"customer_count_24h", "customer_returned_mean_30d", "shop_order_total_mean_7d"} <= set(train.columns)
    assert re.search(r"model returns \d{8}-\d{6}-\w+ \(local\)", outputs[3])  # the use case's own registry
    assert (tmp_path / "home" / "store" / "returns" / "models" / "returns").is_dir()
    assert "materialized world" in outputs[4]
    assert (tmp_path / "home" / "store" / "returns" / "lake").is_dir()  # the use case's own namespace
    assert "keep" in outputs[5] and "would remove" in outputs[5]
    answer = json.loads(outputs[6].strip().splitlines()[-1])
    [prediction] = answer["predictions"]
    assert 0.0 < prediction["returned_probability"] < 1.0
    assert re.fullmatch(r"\d{8}-\d{6}-\w+", prediction["model_version"])
    assert prediction["unknown_entities"] == []  # customer 7 and shop 12 ordered in the generated weeks
