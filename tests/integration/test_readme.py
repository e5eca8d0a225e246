"""The README's serve example, run verbatim: the commands are read from README.md, not copied here."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path


from tests import tools
from tests.servers import free_port, wait_until_ready

ROOT = Path(__file__).resolve().parents[2]


def readme_serve_example() -> tuple[str, str, dict]:
    """(the serve command, the curl command, the example answer) from the README's serve block."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Then serve the production model.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no serve example block"
    lines = block.group(1).splitlines()
    serve = next(line for line in lines if "flywheel serve" in line).split("#")[0].strip()
    start = next(i for i, line in enumerate(lines) if line.startswith("curl "))
    end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith("'"))
    curl = "\n".join(lines[start : end + 1])
    answer = json.loads(next(line for line in lines if line.startswith("# {")).lstrip("# ").replace("...", ""))
    return serve, curl, answer


def readme_grpc_example() -> str:
    """The README's Python example with tritonclient's gRPC client."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"with tritonclient's gRPC client.*?```python\n(.*?)```", text, re.S)
    assert block, "README.md has no gRPC client example"
    return block.group(1)


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_serve_and_curl_example_verbatim(trained_loop):
    serve, curl, answer = readme_serve_example()
    tools.require("curl")
    assert serve.startswith(".venv/bin/flywheel serve") and "localhost:8080" in curl and " -d '" in curl
    client = readme_grpc_example()
    env = dict(os.environ, **trained_loop["env"])
    if not port_is_free(8080):  # only the port moves, through the settings, never the commands' text
        port = free_port()
        env["FLYWHEEL_SERVING__PORT"] = str(port)
        curl = curl.replace("localhost:8080", f"localhost:{port}")
    if not port_is_free(8081):
        port = free_port()
        env["FLYWHEEL_SERVING__GRPC_PORT"] = str(port)
        client = client.replace("localhost:8081", f"localhost:{port}")
    server = subprocess.Popen(["bash", "-c", serve], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = re.search(r"(localhost:\d+)", curl).group(1)
        wait_until_ready(server, f"http://{url.replace('localhost', '127.0.0.1')}/v1/models/fraud")
        result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        body = json.loads(result.stdout)
        assert set(body) == set(answer)
        prediction = body["predictions"][0]
        assert set(prediction) == set(answer["predictions"][0])
        assert 0 <= prediction["fraud_probability"] <= 1
        assert prediction["model_version"] == trained_loop["model"]["version"]
        # The gRPC example, in a process of its own (as a team's client runs; tritonclient's gRPC
        # stubs and KServe's cannot share one).
        import sys

        done = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        schema, scored = done.stdout.strip().splitlines()
        assert "('card_id', 'BYTES')" in schema and "('amount', 'FP64')" in schema
        assert scored.startswith("[") and scored.endswith(trained_loop["model"]["version"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
