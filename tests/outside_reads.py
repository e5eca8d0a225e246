"""A pytest plugin that records every path the test process touches outside its checkout.

tests/integration/test_standalone_clone.py runs tests in a clone that sits in a folder of its own,
next to a decoy of what developers and CI have beside their checkout (``shared/``), with
``-p tests.outside_reads``. A Python audit hook sees every file opened, folder listed, SQLite database
connected and program started (with its arguments), and keeps those that fall in one of the folders
of ``$OUTSIDE_READS_WATCH`` (``os.pathsep``-separated: the clone's folder, the checkout it was cloned
from) but in neither the checkout under test (the rootdir) nor the interpreter's environment
(``sys.prefix``: the venv may live in the original checkout). At the end of the session they are
written, as JSON, to ``$OUTSIDE_READS_LOG``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

# event name: the indexes of its arguments that can be paths (see the audit events table in Python's docs)
PATH_ARGUMENTS = {
    "open": (0,),
    "os.listdir": (0,),
    "os.scandir": (0,),
    "os.chdir": (0,),
    "os.rename": (0, 1),
    "os.remove": (0,),
    "os.mkdir": (0,),
    "shutil.copyfile": (0, 1),
    "shutil.copytree": (0, 1),
    "sqlite3.connect": (0,),
}


class OutsideReads:
    def __init__(self, watched: list[str], allowed: list[str]) -> None:
        self.watched = [os.path.abspath(folder) for folder in watched]
        self.allowed = [os.path.abspath(folder) for folder in allowed]
        self.seen: list[dict[str, str]] = []
        self.test = ""

    def beside(self, value: Any, cwd: str | None = None) -> str | None:
        """``value`` as an absolute path when it is one in a watched folder but in no allowed one."""
        if isinstance(value, int) or value is None:
            return None
        try:
            text = os.fsdecode(value)
        except TypeError:
            return None
        if not text or "\0" in text:
            return None
        path = os.path.normpath(os.path.join(cwd or os.getcwd(), text))
        inside = lambda roots: any(path == root or path.startswith(root + os.sep) for root in roots)  # noqa: E731
        return path if inside(self.watched) and not inside(self.allowed) else None

    def __call__(self, event: str, args: tuple) -> None:
        if event in PATH_ARGUMENTS:
            for index in PATH_ARGUMENTS[event]:
                if index < len(args) and (path := self.beside(args[index])):
                    self.seen.append({"test": self.test, "event": event, "path": path})
        elif event == "subprocess.Popen":
            executable, arguments, cwd = args[0], args[1], args[2]
            words = [arguments] if isinstance(arguments, (str, bytes, os.PathLike)) else list(arguments or [])
            for word in [executable, cwd, *words]:
                if path := self.beside(word, cwd if isinstance(cwd, str) else None):
                    self.seen.append({"test": self.test, "event": event, "path": path})


RECORDER: OutsideReads | None = None


def pytest_configure(config: pytest.Config) -> None:
    global RECORDER
    # The venv is the original checkout's, and its editable install maps `flywheel` to that checkout: a
    # name the clone lacks would be looked up there. A user's clone has an install of its own; drop it.
    sys.meta_path[:] = [finder for finder in sys.meta_path if not getattr(finder, "__module__", "").startswith("__editable__")]
    watched = os.environ["OUTSIDE_READS_WATCH"].split(os.pathsep)
    RECORDER = OutsideReads(watched, [str(config.rootpath), sys.prefix])
    sys.addaudithook(RECORDER)


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    if RECORDER is not None:
        RECORDER.test = nodeid


def pytest_sessionfinish(session: pytest.Session) -> None:
    if RECORDER is None:
        return
    flywheel = sys.modules.get("flywheel")
    report = {"seen": RECORDER.seen, "watched": RECORDER.watched, "allowed": RECORDER.allowed,
              "flywheel_from": getattr(flywheel, "__file__", None), "tests_from": __file__}
    with open(os.environ["OUTSIDE_READS_LOG"], "w") as out:
        json.dump(report, out, indent=1)
