"""A clone stands alone: nothing in it reads, runs or names a path outside the checkout.

Bug caught: the CRD schemas the tests validate against were read from the ``shared/crds`` folder
beside the checkout, which developers and CI had and no user's clone has. The repository is cloned into a
folder of its own, next to a decoy ``shared/`` (what those machines have there), and checked twice:
- statically: no tracked file names a path that leaves the checkout (``../`` chains, ``__file__``
  climbs, absolute paths of what lies beside the checkout);
- by running tests in the clone under an audit hook (tests/outside_reads.py) that records every file
  opened, folder listed, database connected and program started with a path beside the clone.
The clone is of the last commit: uncommitted changes are not in it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import tools

REPO = Path(__file__).resolve().parents[2]
DOTS = re.compile(r"(?<![\w./])((?:\.\./)+[\w.\-/]*)")  # a relative path that climbs: ../x, ../../base
CLIMB = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?(?P<up>(?:\.parent\b)+|\.parents\[(?P<index>\d+)\])"
                   r"(?P<joins>(?:\s*/\s*[\"']\.\.[\"'])*)")
FENCE = re.compile(r"^\s*(```|~~~)")
CD = re.compile(r"^\s*cd\s+([^\s;&|]+)")
RECORDS = ("benchmarks/results/",)  # what a benchmark measured, where it ran: records, never read as paths
CLONE_RUN_TIMEOUT_S = 600


def inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def named_outside(relative: str, text: str, checkout: Path, beside: tuple[str, ...] = ()) -> list[str]:
    """Every path ``text`` (the file ``relative`` of ``checkout``) names outside the checkout.

    A ``../`` path counts from the file's folder; in a Markdown code block, from the folder its
    ``cd`` lines moved to (a README's ``cd feature_repo`` then ``../.venv/bin/feast`` stays inside).
    ``beside``: absolute paths of what lies next to the original checkout (its ``shared/``)."""
    found = []
    folder = (checkout / relative).parent
    in_code, cwd = False, folder
    for number, line in enumerate(text.splitlines(), 1):
        if relative.endswith(".md"):
            if FENCE.match(line):
                in_code, cwd = not in_code, folder
                continue
            if in_code and (cd := CD.match(line)):
                cwd = Path(os.path.normpath(cwd / cd.group(1).strip("\"'")))
        base = cwd if in_code else folder
        for match in DOTS.finditer(line):
            if not inside(Path(os.path.normpath(base / match.group(1))), checkout):
                found.append(f"{relative}:{number}: {match.group(1)}")
        if relative.endswith(".py"):
            for match in CLIMB.finditer(line):
                up = len(re.findall(r"\.parent\b", match.group("up"))) if match.group("index") is None else int(match.group("index")) + 1
                up += match.group("joins").count("..")
                if up > len(Path(relative).parts):  # climbing past the checkout's root
                    found.append(f"{relative}:{number}: {match.group(0)}")
        if not relative.startswith(RECORDS):
            found += [f"{relative}:{number}: names {path}" for path in beside if path in line]
    return found


def beside_checkout() -> tuple[str, ...]:
    """The absolute paths of what lies next to this checkout (``shared/`` on developers' machines and
    CI's), unless it sits in the temporary folder or the root, where neighbours are anyone's."""
    parent = REPO.parent
    if parent in (Path(tempfile.gettempdir()).resolve(), Path(REPO.anchor)):
        return ()
    return tuple(str(entry) for entry in parent.iterdir() if entry != REPO)


def tracked_text(checkout: Path) -> dict[str, str]:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=checkout, capture_output=True, check=True).stdout.split(b"\0")
    texts = {}
    for name in filter(None, files):
        data = (checkout / os.fsdecode(name)).read_bytes()
        if b"\0" not in data:
            texts[os.fsdecode(name)] = data.decode("utf-8", errors="replace")
    return texts


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the room, the clone in it): a fresh clone of this checkout with nothing beside it but a decoy
    ``shared/crds`` holding the same files, so a read of it would succeed and only the hook tells."""
    if not (REPO / ".git").exists():
        pytest.fail(f"{REPO} is not a git checkout: this test clones it (git clone <url> flywheel)", pytrace=False)
    room = tmp_path_factory.mktemp("room")
    clone = room / "flywheel"
    done = subprocess.run([tools.require("git"), "clone", "--quiet", str(REPO), str(clone)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    shutil.copytree(clone / "tests" / "crds", room / "shared" / "crds")
    return room, clone


def run_in_clone(room: Path, clone: Path, *pytest_args: str, log: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """pytest in the clone with the audit hook on: (the finished run, the hook's report)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "PYTEST_"))}
    env["PYTHONPATH"] = str(clone)  # the processes the tests start import the clone's code too, not the venv's install
    env.update(OUTSIDE_READS_WATCH=os.pathsep.join([str(room), str(REPO)]), OUTSIDE_READS_LOG=str(log))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.outside_reads", "-p", "no:cacheprovider",
                           "-o", "addopts=", f"--basetemp={log.parent / 'basetemp'}", *pytest_args], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=CLONE_RUN_TIMEOUT_S)
    assert log.exists(), f"the run in the clone wrote no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done, json.loads(log.read_text())


def test_the_scanner_finds_paths_that_leave_the_checkout(tmp_path):
    """The static oracle itself: each way of naming a path beside the checkout is found, and the
    repository's own legitimate climbs (kustomize's ../../base, a README block that cd's first) are not."""
    checkout = tmp_path / "flywheel"
    bad = {
        "tests/crd_schema.py": 'CRDS = Path(__file__).resolve().parents[1] / ".." / "shared" / "crds"',
        "tests/unit/test_x.py": "ROOT = Path(__file__)" + ".parent" * 4,
        "constraints.txt": "# see ../" + "shared/FIELD-NOTES.md",  # split: the house check greps this file too
        "README.md": "```sh\n../.venv/bin/feast plan\n```",
        "Makefile": f"CRDS := {tmp_path}/shared/crds",  # an absolute path to what lies beside
    }
    good = {
        "manifests/overlays/gpu/kustomization.yaml": "resources:\n- ../../base",
        "README.md": "```sh\ncd feature_repo\n../.venv/bin/feast plan\n```\n",
        "tests/unit/test_y.py": "REPO = Path(__file__).resolve().parents[2]",
        "benchmarks/results/canary.json": f'"uri": "{tmp_path}/shared/canary.json"',
    }
    for relative, text in bad.items():
        assert named_outside(relative, text, checkout, (str(tmp_path / "shared"),)), relative
    for relative, text in good.items():
        assert not named_outside(relative, text, checkout, (str(tmp_path / "shared"),)), relative


def test_no_tracked_file_names_a_path_outside_the_checkout(room):
    _, clone = room
    found = [where for relative, text in tracked_text(clone).items() for where in named_outside(relative, text, clone, beside_checkout())]
    assert not found, "files name paths outside the checkout (a fresh clone has nothing beside it):\n" + "\n".join(found)


def test_the_hook_records_a_read_and_a_program_beside_the_clone(room, tmp_path):
    """The dynamic oracle itself: the old bug (reading the CRDs in shared/ beside the checkout, which the decoy makes succeed)
    and a program given a path beside the clone are both recorded, and nothing inside it is."""
    room_path, clone = room
    probe = clone / "tests" / "test_reads_beside.py"
    probe.write_text(
        "import subprocess\nfrom pathlib import Path\n\n"
        "def test_reads_the_schemas_beside_the_checkout():\n"
        "    crds = Path(__file__).resolve().parents[1] / '..' / 'shared' / 'crds'\n"
        "    assert (crds / 'SOURCE.md').read_text()\n"
        "    assert (Path(__file__).resolve().parents[1] / 'tests' / 'crds' / 'SOURCE.md').read_text()\n"
        "    subprocess.run(['ls', str(crds)], check=True, capture_output=True)\n"
    )
    try:
        done, report = run_in_clone(room_path, clone, "tests/test_reads_beside.py", log=tmp_path / "outside.json")
    finally:
        probe.unlink()
    assert done.returncode == 0, done.stdout[-3000:]
    paths = {(seen["event"], seen["path"]) for seen in report["seen"]}
    crds = str(room_path / "shared" / "crds")
    assert ("open", f"{crds}/SOURCE.md") in paths and ("subprocess.Popen", crds) in paths, paths
    assert all(inside(Path(path), room_path / "shared") for _, path in paths), paths


def checkout_readers(clone: Path) -> list[str]:
    """The unit test modules that find files through the checkout (``__file__``, ``REPO``, the CRD
    schemas): those a file missing beside a clone would break. Chosen by their text, so a new one is
    picked up without a list to keep."""
    return sorted(str(path.relative_to(clone)) for path in (clone / "tests" / "unit").glob("test_*.py")
                  if re.search(r"__file__|crd_schema|\bREPO\b", path.read_text()))


def test_the_tests_that_read_the_checkout_pass_in_a_lone_clone_and_touch_nothing_outside_it(room, tmp_path):
    """The unit tests that read the checkout's files (manifests against the CRDs, cluster jobs, the
    Dockerfile, code fingerprints) run from the clone itself, with its own code: they pass, and
    nothing beside the clone, nor in the checkout it came from but its venv, is opened, listed or run."""
    room_path, clone = room
    modules = checkout_readers(clone)
    assert "tests/unit/test_manifests.py" in modules and "tests/unit/test_cluster_training.py" in modules, modules
    done, report = run_in_clone(room_path, clone, *modules, log=tmp_path / "outside.json")
    tail = (done.stdout + done.stderr)[-6000:]
    assert inside(Path(report["flywheel_from"]), clone), f"the run imported flywheel from {report['flywheel_from']}, not the clone"
    assert not report["seen"], "touched beside the clone:\n" + "\n".join(f"{s['test']}: {s['event']} {s['path']}" for s in report["seen"])
    assert done.returncode == 0, f"these tests fail in a fresh clone with nothing beside it:\n{tail}"
