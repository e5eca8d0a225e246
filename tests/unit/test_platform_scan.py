"""The platform names no use case's columns, entities, labels or features (issue 19).

Every name the use cases under usecases/ declare (contract columns, entities, labels; declared
features and their views) is looked for in the platform's code (flywheel/, serving/, components/,
pipelines/): as a string literal anywhere, and, when the name is distinctive (it holds an underscore
or a digit: ``card_id``, ``arr_delay``, ``card_txn_count_1h``), as an identifier too. A one-word name
(``amount``, ``tail``, ``origin``) is an English word the platform may use in its own sense (a log's
tail, a model card), so as an identifier it is not a finding; as a string (``df["amount"]``) it is.

The fraud model's own code (its predictor, request schema, generator, batch scoring's columns) has
moved into the use case (issue 19): no platform file names any use case's names, and one that starts
to fails at once.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from flywheel.usecase import load_usecase
from tests.factories import REPO

PLATFORM = ("flywheel", "serving", "components", "pipelines")


def declared_names() -> dict[str, set[str]]:
    """Every name a use case declares -> the use cases that declare it."""
    names: dict[str, set[str]] = {}
    for folder in sorted((REPO / "usecases").iterdir()):
        if not (folder / "contract.yaml").is_file():
            continue
        usecase = load_usecase(folder)
        contract = usecase.contract
        declared = [*contract.columns, *contract.entities, *contract.labels]
        for source_name, source in contract.sources.items():  # further sources: their names and columns
            declared += [source_name, *source.columns]
        for entity, named in usecase.features.named().items():
            declared += [name for name, _ in named] + [f"{entity}_features"]
        for name in declared:
            names.setdefault(name, set()).add(usecase.name)
    return names


def distinctive(name: str) -> bool:
    return "_" in name or any(ch.isdigit() for ch in name)


def names_in(path: Path, names: dict[str, set[str]]) -> set[str]:
    """The declared names ``path`` uses: as string literals, and (distinctive ones) as identifiers
    other than attributes, keyword arguments and definitions' own names."""
    found = set()
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for i, token in enumerate(tokens):
        if token.type == tokenize.STRING:
            try:
                value = ast.literal_eval(token.string)
            except (ValueError, SyntaxError):
                continue  # an f-string: its pieces are tokens of their own on 3.12, text here
            if isinstance(value, str) and value in names:
                found.add(value)
        elif token.type == tokenize.NAME and token.string in names and distinctive(token.string):
            before = tokens[i - 1].string if i else ""
            after = tokens[i + 1].string if i + 1 < len(tokens) else ""
            if before not in (".", "def", "class") and after != "=":
                found.add(token.string)
    return found


def scan() -> dict[str, set[str]]:
    names = declared_names()
    hits = {}
    for root in PLATFORM:
        for path in sorted((REPO / root).rglob("*.py")):
            found = names_in(path, names)
            if found:
                hits[path.relative_to(REPO).as_posix()] = found
    return hits


def test_the_platform_names_no_use_cases_names():
    hits = {path: sorted(found) for path, found in scan().items()}
    assert not hits, f"platform files name a use case's columns, entities, labels or features: {hits}"


def test_the_scan_finds_a_name_where_one_is_written(tmp_path):
    """The scan can fail: a platform-like file that reads a declared column by name is found."""
    names = declared_names()
    assert {"card_id", "arr_delay", "tail_arr_delay_last_24h", "route"} <= set(names)
    code = tmp_path / "leaky.py"
    code.write_text('def score(frame):\n    late = frame["arr_delay"] > 15\n    card_id = frame.card_id\n'
                    '    return late, card_id, frame.tail(3), dict(route=1)\n')
    assert names_in(code, names) == {"arr_delay", "card_id"}
