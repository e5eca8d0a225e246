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

import ast
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
READS = re.compile(r"__file__|crd_schema|\bREPO\b")  # how a test module finds files through its checkout


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
                  if READS.search(path.read_text()))


class Readers:
    """What of one tests module finds files through the checkout: the module-level names (functions,
    fixtures, constants, names imported from other tests modules) whose text mentions ``READS``, or
    that name, in turn, such a name (``MANIFESTS = REPO / ...``, a helper calling ``assert_conforms``,
    ``FRAUD`` from tests.factories, ``factories.REPO``). Static, and generous where unsure: a local
    that shadows such a name counts as it."""

    def __init__(self, path: Path, clone: Path, loaded: dict[str, Readers | None]) -> None:
        self.lines = path.read_text().splitlines()
        self.tree = ast.parse("\n".join(self.lines))
        self.clone, self.loaded = clone, loaded
        self.defs: dict[str, list[ast.stmt]] = {}
        self.imported: dict[str, tuple[str, str]] = {}  # a name from `from M import n`: (M, n)
        self.modules: dict[str, str] = {}  # a name bound to a tests module: its dotted name
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs.setdefault(node.name, []).append(node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            self.defs.setdefault(name.id, []).append(node)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    bound, dotted = alias.asname or alias.name, f"{node.module}.{alias.name}"
                    if self.module(dotted):
                        self.modules[bound] = dotted
                    else:
                        self.imported[bound] = (node.module or "", alias.name)
            elif isinstance(node, ast.Import):
                self.modules.update({alias.asname: alias.name for alias in node.names if alias.asname})
        self.readers: set[str] = set()
        while grown := {name for name, nodes in self.defs.items() if name not in self.readers and any(map(self.reads, nodes))} | {
                name for name, (module, original) in self.imported.items()
                if name not in self.readers and (other := self.module(module)) and original in other.readers}:
            self.readers |= grown

    def module(self, dotted: str) -> Readers | None:
        """The tests module ``dotted`` of the clone, analysed (None: not one; an import cycle reads as none)."""
        path = self.clone.joinpath(*dotted.split(".")).with_suffix(".py")
        if not dotted.startswith("tests.") or not path.is_file():
            return None
        if dotted not in self.loaded:
            self.loaded[dotted] = None
            self.loaded[dotted] = Readers(path, self.clone, self.loaded)
        return self.loaded[dotted]

    def reads(self, node: ast.stmt) -> bool:
        """Whether ``node`` (with its decorators) mentions the checkout or a name here that does."""
        first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        if READS.search("\n".join(self.lines[first - 1:node.end_lineno])):
            return True
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and inner.id in self.readers:
                return True
            if (isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.value.id in self.modules
                    and (other := self.module(self.modules[inner.value.id])) and inner.attr in other.readers):
                return True
            if isinstance(inner, ast.ImportFrom) and (other := self.module(inner.module or "")):
                if any(alias.name in other.readers for alias in inner.names):
                    return True
        return False

    def fixture_reads(self, name: str, conftests: list[Readers], seen: tuple[str, ...] = ()) -> bool:
        """Whether the fixture ``name``, as this module sees it (its own, else a conftest's), or a fixture it asks for reads the checkout."""
        for where in (self, *conftests):
            if fixtures := [n for n in where.defs.get(name, []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                return name in where.readers or any(where.fixture_reads(arg.arg, conftests, (*seen, name))
                                                    for fixture in fixtures for arg in fixture.args.args if arg.arg not in seen)
        return False


def checkout_reading_tests(clone: Path, modules: list[str]) -> list[str]:
    """The tests of ``modules`` that find files through the checkout: whose code, decorators, fixtures, or
    the helpers and constants these name (transitively, across tests modules), mention ``READS``. A test
    that only trains a model on rows it made up has no checkout file to miss in a clone."""
    package = Readers(clone / "tests" / "__init__.py", clone, {})
    conftests = [readers for dotted in ("tests.unit.conftest", "tests.conftest") if (readers := package.module(dotted))]
    found = []
    for module in modules:
        readers = Readers(clone / module, clone, package.loaded)
        autouse = any(where.fixture_reads(node.name, conftests) for where in (readers, *conftests) for node in where.tree.body
                      if isinstance(node, ast.FunctionDef) and any("autouse=True" in ast.unparse(d) for d in node.decorator_list))
        found += [f"{module}::{node.name}" for node in readers.tree.body
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")
                  and (autouse or readers.reads(node) or any(readers.fixture_reads(arg.arg, conftests) for arg in node.args.args))]
    return found


def test_the_selection_keeps_every_test_that_reaches_the_checkout_and_only_those(tmp_path):
    """The selection's oracle: a test reaching the checkout through a helper, a module constant, a fixture
    (and the fixture it asks for), a name imported from a tests module or its attribute is kept; one
    that only mentions an unrelated name is not."""
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "__init__.py").write_text("")
    (tmp_path / "tests" / "helpers.py").write_text(
        "from pathlib import Path\nREPO = Path(__file__).parents[1]\nDATA = REPO / 'data'\n"
        "def load():\n    return DATA.read_text()\ndef made_up():\n    return 1\n")
    (tmp_path / "tests" / "conftest.py").write_text("import pytest\nfrom tests.helpers import load\n\n"
                                                    "@pytest.fixture\ndef loaded():\n    return load()\n")
    (tmp_path / "tests" / "unit" / "test_m.py").write_text(
        "import pytest\nfrom tests import helpers\nfrom tests.helpers import DATA, made_up\n"
        "SCHEMA = DATA / 'schema'\n\n"
        "def check(x):\n    return SCHEMA.exists()\n\n"
        "@pytest.fixture\ndef asks(loaded):\n    return loaded\n\n"
        "def test_by_helper():\n    assert check(1)\n"
        "def test_by_fixture(asks):\n    pass\n"
        "def test_by_attribute():\n    assert helpers.load()\n"
        "def test_by_inner_import():\n    from tests.helpers import load\n    load()\n"
        "@pytest.mark.parametrize('p', [SCHEMA])\ndef test_by_parameter(p):\n    pass\n"
        "def test_alone(tmp_path):\n    assert made_up() and helpers.made_up()\n")
    kept = {test.split("::")[1] for test in checkout_reading_tests(tmp_path, ["tests/unit/test_m.py"])}
    assert kept == {"test_by_helper", "test_by_fixture", "test_by_attribute", "test_by_inner_import", "test_by_parameter"}


def test_the_tests_that_read_the_checkout_pass_in_a_lone_clone_and_touch_nothing_outside_it(room, tmp_path):
    """The unit tests that read the checkout's files (manifests against the CRDs, cluster jobs, the
    Dockerfile, code fingerprints) run from the clone itself, with its own code: they pass, and
    nothing beside the clone, nor in the checkout it came from but its venv, is opened, listed or run."""
    room_path, clone = room
    modules = checkout_readers(clone)
    assert "tests/unit/test_manifests.py" in modules and "tests/unit/test_cluster_training.py" in modules, modules
    tests = checkout_reading_tests(clone, modules)
    assert {"tests/unit/test_manifests.py::test_every_rendered_object_is_valid_for_its_schema",
            "tests/unit/test_cluster_training.py::test_every_rendered_manifest_conforms_to_its_crd_schema"} <= set(tests), tests
    done, report = run_in_clone(room_path, clone, *tests, log=tmp_path / "outside.json")
    tail = (done.stdout + done.stderr)[-6000:]
    assert inside(Path(report["flywheel_from"]), clone), f"the run imported flywheel from {report['flywheel_from']}, not the clone"
    assert not report["seen"], "touched beside the clone:\n" + "\n".join(f"{s['test']}: {s['event']} {s['path']}" for s in report["seen"])
    assert done.returncode == 0, f"these tests fail in a fresh clone with nothing beside it:\n{tail}"
