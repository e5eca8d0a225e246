"""The project image's Dockerfile. No container engine runs here, so it is checked statically: hadolint
(at its strictest threshold), every file it copies exists and reaches the build context, and the final
stage is small and runs as a non-root user."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path


from flywheel.config import Settings
from tests import tools

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def hadolint() -> str:
    return tools.require("hadolint")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def stages(text: str) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction in instructions(text):
        if instruction[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing_at_its_strictest():
    result = lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_careless_dockerfile(tmp_path):
    """The oracle itself: an unpinned base, an unpinned apt install and root at the end are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nCOPY . /app\n")
    result = lint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009"):
        assert rule in result.stdout, result.stdout


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; `!` re-includes."""
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        if any(fnmatch.fnmatch("/".join(parts[:i]), pattern) for i in range(1, len(parts) + 1)) or \
                (pattern.startswith("**/") and any(fnmatch.fnmatch(p, pattern[3:]) for p in parts)):
            verdict = not negate
    return verdict


def test_every_copied_file_exists_and_is_in_the_build_context():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = []
    for instruction, args in instructions(DOCKERFILE.read_text()):
        if instruction in ("COPY", "ADD") and "--from=" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            assert sources, args
            copied += sources
    assert copied
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert not ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by .dockerignore"
    # The package's own folders are all copied (a new one would be missing from the image).
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        assert package.rstrip("*") in {c.rstrip("/") for c in copied}, package
    # The .venv, the local store and caches stay out of the context.
    for local in (".venv/bin/python", ".flywheel/store/x", "tests/conftest.py", "flywheel/__pycache__/cli.pyc"):
        assert ignored(local, patterns), local


def test_the_final_stage_is_small_and_runs_as_a_non_root_user():
    build, final = stages(DOCKERFILE.read_text())
    assert build[0][1].split()[0] == final[0][1].split()[0] == "${PYTHON_IMAGE}"  # the same runtime
    assert build[0][1].split()[-1] == "build"
    final_text = " ".join(args for _, args in final)
    for tool in ("apt-get install", "pip install", "gcc", "build-essential"):
        assert tool not in final_text, tool
    copies = [args for instruction, args in final if instruction == "COPY"]
    assert "--from=build /opt/venv /opt/venv" in copies  # the environment, built in the first stage
    [user] = [args for instruction, args in final if instruction == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can verify it
    assert [i for i, _ in final].index("USER") > max(i for i, (name, _) in enumerate(final) if name in ("RUN", "COPY"))


def test_the_image_is_built_from_the_lock_for_the_projects_python():
    text = DOCKERFILE.read_text()
    assert re.search(r"pip install --constraint requirements\.lock \.", text)
    python = re.search(r"ARG PYTHON_IMAGE=python:(\d+)\.(\d+)\.\d+-slim", text)
    assert python, "the base image must be a pinned python:X.Y.Z-slim"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={python[1]}.{python[2]}" in requires, requires
    assert f"docker build -t {Settings().image} ." in text  # the tag the compiled steps and manifests use
