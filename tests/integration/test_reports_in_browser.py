"""The reports a reviewer opens, opened in a real headless Chromium with no network (as on an
air-gapped cluster): the evaluation report with its model card and segments, and Great Expectations'
validation data docs. Every request the page makes is recorded; any that would leave the machine is
aborted and fails the test."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from flywheel import steps
from flywheel.evaluation_report import MIN_MEANINGFUL
from flywheel.storage import Storage
from flywheel.validation import validate_snapshot
from tests.browser import OpenedPage, open_offline
from tests.factories import FRAUD_CONTRACT, FRAUD_LABEL, FRAUD_VIEWS
from tests.unit.test_validation import corrupted, snapshot_of


def assert_self_contained(opened: OpenedPage) -> None:
    """Nothing left the page, nothing failed to load, no image is broken, no link leads nowhere, and
    the page logged no error."""
    assert opened.left == [], f"requests that would leave the machine: {opened.left}"
    assert all(url.startswith(("file:", "data:", "blob:")) for url in opened.requests)
    assert opened.failed == []
    assert opened.broken_images() == []
    assert opened.dead_links() == []
    assert opened.console_errors == []


# ------------------------------------------------------------------ the evaluation report
@pytest.fixture(scope="module")
def one_positive_report(trained_loop) -> tuple[Path, str, dict]:
    """The evaluate step's real report on the loop's holdout, with one merchant category cut down to
    a single positive row among its negatives; returns the report's path, that category, and the
    evaluation."""
    loop = trained_loop
    storage: Storage = loop["storage"]
    original = loop["training_set"]
    holdout = storage.read_parquet(original["holdout_uri"]).to_pandas()
    category = holdout["merchant_category"].value_counts().index[-1]  # the smallest
    mask = (holdout["merchant_category"] == category).to_numpy()
    positive = np.flatnonzero(mask & (holdout[FRAUD_LABEL] == 1).to_numpy())[:1]
    negatives = np.flatnonzero(mask & (holdout[FRAUD_LABEL] == 0).to_numpy())[:60]
    assert len(positive) == 1 and len(negatives) >= MIN_MEANINGFUL
    keep = np.sort(np.concatenate([np.flatnonzero(~mask), positive, negatives]))
    folder = storage.uri("datasets", "training", "one-positive-segment")
    ref = storage.write_parquet(f"{folder}/holdout.parquet", holdout.iloc[keep].reset_index(drop=True))
    train_sha = original["files"][original["train_uri"]]
    cut = dict(original, uri=folder, holdout_uri=ref.uri, sha256=train_sha + ref.sha256,
               files={original["train_uri"]: train_sha, ref.uri: ref.sha256})
    storage.write_json(f"{folder}/manifest.json", cut)
    evaluation = steps.evaluate_step(cut, loop["model"], "one-positive", "", loop["settings"])
    return Path(evaluation["html_uri"]), str(category), evaluation


def card_of(opened: OpenedPage) -> dict[str, str]:
    return dict(opened.page.eval_on_selector_all(
        "table.card tr", "rows => rows.filter(r => r.querySelector('td')).map(r => [r.querySelector('th').innerText.trim(), "
                         "r.querySelector('td').innerText.trim()])"))


def test_the_evaluation_report_needs_no_network_and_its_model_card_is_in_words(browser, trained_loop, one_positive_report):
    """Bugs: the card's features row was always empty (it looked for the features where training does
    not record them), it did not name the feature world, and it showed the training window and the
    parameters as raw dicts."""
    path, _, evaluation = one_positive_report
    opened = open_offline(browser, path)
    try:
        assert_self_contained(opened)
        assert opened.page.eval_on_selector_all("img", "imgs => imgs.length") == 4
        card = card_of(opened)
        for name in ("features", "request fields (model inputs)", "feature world", "training window", "parameters",
                     "trained by run", "training set", "training set sha256", "code version"):
            assert card.get(name) and card[name] != "–" and card[name] != "none", (name, card.get(name))
        for view in FRAUD_VIEWS:  # every view, and every feature of it, the model was trained with
            assert view.name in card["features"] and all(feature in card["features"] for feature in view.features)
        assert "card_id (required)" in card["request fields (model inputs)"]
        assert FRAUD_LABEL not in card["request fields (model inputs)"]
        world = trained_loop["training_set"]["key"][:16]
        assert card["feature world"].startswith(world)
        rows = trained_loop["training_set"]["train_rows"]
        assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d to \d{{4}}-\d\d-\d\d \(\d+(\.\d)? days, {rows:,} rows\)", card["training window"])
        assert "epochs: 3" in card["parameters"].splitlines()
        assert card["trained by run"] == "loop-1" and card["training set sha256"] == trained_loop["training_set"]["sha256"]
        assert not any(re.search(r"[{}]", value) for value in card.values()), card  # no dict shown raw
        assert card["compared with production"] == "none: this version is production"  # the loop's model is production
        assert evaluation["model_version"] in opened.page.inner_text("h1")
    finally:
        opened.page.context.close()


def test_a_segment_with_one_positive_shows_its_counts_and_no_confident_roc_auc(browser, one_positive_report):
    """Bug: a segment with one positive showed ROC-AUC 1.0, with no count and no warning."""
    path, category, evaluation = one_positive_report
    segment = next(r for r in evaluation["details"]["segments"]["merchant_category"] if r["value"] == category)
    assert (segment["positives"], segment["meaningful"]) == (1, False) and "only 1 positive" in segment["warning"]
    for rows in evaluation["details"]["segments"].values():  # the rule, at its real threshold, for every segment
        assert all(r["meaningful"] == (min(r["positives"], r["negatives"]) >= MIN_MEANINGFUL) for r in rows)
    opened = open_offline(browser, path)
    try:
        assert_self_contained(opened)
        table = opened.page.locator("h3", has_text="by merchant_category").locator("xpath=following-sibling::table[1]")
        header = [cell.strip() for cell in table.locator("tr").first.locator("th").all_inner_texts()]
        assert {"rows", "positives", "negatives", "roc_auc", "pr_auc"} <= set(header)
        cells = dict(zip(header, (c.strip() for c in table.locator("tr", has=opened.page.locator(
            f"td:text-is('{category}')")).locator("td").all_inner_texts())))
        assert cells["rows"] == str(segment["rows"]) and cells["positives"] == "1" and cells["negatives"] == str(segment["negatives"])
        for metric in ("roc_auc", "pr_auc"):
            assert cells[metric].startswith("not meaningful: only 1 positive"), cells
            assert cells[metric] not in ("1.0000", "1.0", "1")
        greyed = table.locator("td.not-meaningful").first
        assert greyed.evaluate("td => getComputedStyle(td).color") != opened.page.locator("body").evaluate(
            "b => getComputedStyle(b).color")
    finally:
        opened.page.context.close()


# ------------------------------------------------------------------ Great Expectations' data docs
@pytest.fixture(scope="module")
def validation_page(tmp_path_factory) -> tuple[Path, dict]:
    """The platform's validation of a small lake snapshot with broken rows (some expectations fail):
    its data docs' path and its JSON report."""
    import json

    tmp = tmp_path_factory.mktemp("validation")
    storage = Storage(str(tmp / "root"))
    snapshot = snapshot_of(storage, corrupted(), tmp)
    report = validate_snapshot(storage, snapshot, str(tmp / "reports"), run_id="run-2", contract=FRAUD_CONTRACT,
                               raise_on_failure=False)
    return Path(report.html_uri), json.loads(Path(report.report_uri).read_text())


STATUS_CELLS = """() => [...document.querySelectorAll('table')]
  .filter(t => t.querySelector(':scope > thead th') && t.querySelector(':scope > thead th').innerText.trim() === 'Status')
  .flatMap(t => [...t.querySelectorAll(':scope > tbody > tr')])
  .map(r => { const c = r.querySelector(':scope > td'); const box = c.getBoundingClientRect();
              return {text: c.innerText.trim(), visible: r.offsetParent !== null && box.width > 0 && box.height > 0}; })"""


def test_the_validation_data_docs_need_no_network_and_show_each_status_as_text(browser, validation_page):
    """Bugs: GE's data docs loaded Bootstrap, Font Awesome, jQuery and Vega from CDNs (offline: an
    unstyled page, a blank status column, a broken logo), and linked "Home" and the suite to pages a
    report file does not have."""
    path, document = validation_page
    opened = open_offline(browser, path)
    try:
        assert_self_contained(opened)
        assert opened.page.eval_on_selector_all("img", "imgs => imgs.length") >= 1  # GE's logo, from the package
        statuses = opened.page.evaluate(STATUS_CELLS)
        failed = int(document["statistics"]["unsuccessful_expectations"])
        assert len(statuses) == int(document["statistics"]["evaluated_expectations"]) and failed > 0
        assert all(s["visible"] and s["text"] for s in statuses), statuses
        assert sum(s["text"].endswith("failed") for s in statuses) == failed
        assert sum(s["text"].endswith("passed") for s in statuses) == len(statuses) - failed
        # The filter buttons work without jQuery: "Failed Only" leaves the failed rows only.
        opened.page.get_by_text("Failed Only").click()
        shown = [s for s in opened.page.evaluate(STATUS_CELLS) if s["visible"]]
        assert len(shown) == failed and all(s["text"].endswith("failed") for s in shown)
        assert opened.console_errors == []
    finally:
        opened.page.context.close()
