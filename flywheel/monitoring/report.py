"""The monitor's HTML report: one self-contained page (plots inlined as PNG, no external request),
for the Kubeflow UI's HTML artifact and for a person opening the file.

What it shows, in the order a reader asks: did anything cross (and what), how far each column moved
against its threshold, the model's estimated and realised performance day by day against its
evaluation, the distributions that moved most, and online/offline skew.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from typing import Any

import numpy as np

from flywheel.monitoring.profile import CategoryProfile, NumberProfile, Profile

TOP_DISTRIBUTIONS = 4


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _figure(name: str, caption: str, data: str) -> str:
    return (f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"/>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def drift_plot(drift: list[dict[str, Any]]) -> str | None:
    """Each column's drift as a share of its own threshold (metrics differ per kind: PSI or JS for
    numbers, L-infinity for categories), so one axis compares them; 1 is the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [d for d in drift if d.get("value") is not None and d.get("threshold")]
    if not items:
        return None
    items.sort(key=lambda d: d["value"] / d["threshold"])
    ratios = [d["value"] / d["threshold"] for d in items]
    colors = ["#c0392b" if r > 1 else "#2e86c1" for r in ratios]
    figure, axis = plt.subplots(figsize=(7, 0.28 * len(items) + 1.2))
    axis.barh([f"{d['column']} ({d['metric']})" for d in items], ratios, color=colors)
    axis.axvline(1.0, color="black", linestyle="--", linewidth=1, label="threshold")
    axis.set_xlabel("drift ÷ its threshold (above 1: crossed)")
    axis.legend(loc="lower right")
    return _png(figure)


def performance_plot(days: list[dict[str, Any]], reference: float | None, limit: float | None, metric: str) -> str | None:
    """The key metric per day: estimated (no labels needed) and realised (once labels are known),
    with the evaluation's value and the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not days:
        return None
    x = np.arange(len(days))
    figure, axis = plt.subplots(figsize=(7.5, 3.2))
    axis.plot(x, [d.get("estimated", np.nan) for d in days], marker="o", label="estimated (without labels)")
    realised = [d.get("realised", np.nan) for d in days]
    if np.isfinite(np.asarray(realised, dtype=float)).any():
        axis.plot(x, realised, marker="s", label="realised (labels known)")
    if reference is not None:
        axis.axhline(reference, color="grey", linewidth=1, label="evaluation (holdout)")
    if limit is not None:
        axis.axhline(limit, color="#c0392b", linestyle="--", linewidth=1, label="threshold")
    step = max(1, len(days) // 12)
    axis.set_xticks(x[::step], [d["day"] for d in days][::step], rotation=45, ha="right")
    axis.set_ylabel(metric)
    axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(figure)


def distribution_plot(column: str, baseline: Profile, window: Profile) -> str | None:
    """Baseline and window shares per bin of a number (the baseline's quantile bins: equal shares
    in the baseline by construction), or per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = _shares(baseline, window, column)
    if not shares:
        return None
    labels, before, after = shares
    x = np.arange(len(labels))
    figure, axis = plt.subplots(figsize=(7, 2.8))
    axis.bar(x - 0.2, before, width=0.4, label="baseline (the training set's holdout)")
    axis.bar(x + 0.2, after, width=0.4, label="window (served)")
    axis.set_xticks(x, labels, rotation=45, ha="right", fontsize="small")
    axis.set_ylabel("share of rows")
    axis.set_title(column)
    axis.legend(fontsize="small")
    return _png(figure)


def _when(iso: str) -> str:
    """A window's bound as a person reads it (UTC, to the second)."""
    try:
        return html.escape(dt.datetime.fromisoformat(iso).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))
    except ValueError:
        return html.escape(iso)


def _shares(baseline: Profile, window: Profile, column: str) -> tuple[list[str], list[float], list[float]] | None:
    """(bucket labels, baseline shares, window shares) of one column: a number's bins between the
    baseline's quantile edges (with the open ends), a category's vocabulary and "other"."""
    base, seen = baseline.columns.get(column), window.columns.get(column)
    if base is None or seen is None or not base.count or not seen.count:
        return None
    if isinstance(base, NumberProfile):
        edges = [f"{edge:.3g}" for edge in base.edges]
        if not edges:
            labels = ["all"]
        elif len(edges) == 1:  # a constant baseline
            labels = [f"< {edges[0]}", f"= {edges[0]}", f"> {edges[0]}"]
        else:
            labels = [f"< {edges[0]}"] + [f"{a} to {b}" for a, b in zip(edges, edges[1:])] + [f"> {edges[-1]}"]
        return labels, [b / base.count for b in base.bins], [b / seen.count for b in seen.bins]
    assert isinstance(base, CategoryProfile) and isinstance(seen, CategoryProfile)
    return [*base.vocabulary, "other"], base.shares(), seen.shares()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(row.get(c), c)}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any, column: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        if column == "crossed":
            return "✘ crossed" if value else "✔ within"
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if value != value else f"{value:.4g}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"{value[0]:.4g} to {value[1]:.4g}"
    return html.escape(str(value))


def render_report(result: Any, baseline: dict[str, Any] | None, window: Profile | None = None,
                  key: tuple[str, bool, str] | None = None, limit: float | None = None) -> str:
    """The page for one monitor run; ``key``: the task's key metric (name, higher is better, the
    estimate's name) and ``limit`` its threshold."""

    parts = [f"<h1>Monitoring: {html.escape(result.model_version or 'no model')}</h1>",
             f"<p>Window {_when(result.since)} to {_when(result.until)}: {result.rows:,} captured rows"
             + (f" (versions: {html.escape(', '.join(f'{k} {v:,}' for k, v in result.versions.items()))})" if result.versions else "")
             + ".</p>"]
    if result.findings:
        parts.append('<h2 class="crossed">✘ Crossed</h2><ul>' + "".join(f"<li>{html.escape(f.describe())}</li>" for f in result.findings) + "</ul>")
    else:
        parts.append('<h2 class="within">✔ Nothing crossed a threshold</h2>' if result.judged else
                     '<h2>Not judged</h2>')
    if result.notes:
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>")

    if key and result.days:
        metric = key[0]
        reference = result.reference.get(metric)
        parts.append(f"<h2>Performance by day ({html.escape(metric)})</h2>")
        image = performance_plot(result.days, reference, limit, metric)
        if image:
            parts.append(_figure("performance by day", f"{metric}: estimated and realised per day; the line is the evaluation's", image))
        parts.append(_table(result.days, ["day", "rows", "labelled", "estimated", "realised", "interval", "judged", "why", "crossed"]))
        if result.realised:
            parts.append("<h3>Realised over the window's labelled rows</h3>"
                         + _table([result.realised], ["labelled", "realised", "interval", "judged", "why", "crossed"]))
    if result.estimate:
        parts.append("<h3>Estimate for the window (no labels)</h3>" + _table([result.estimate], sorted(result.estimate)))

    if result.drift:
        parts.append("<h2>Drift against the training baseline</h2>")
        image = drift_plot(result.drift)
        if image:
            parts.append(_figure("drift", "each column's drift as a share of its threshold", image))
        parts.append(_table(sorted(result.drift, key=lambda d: -(d.get("value") or 0) / (d.get("threshold") or 1)),
                            ["column", "kind", "metric", "value", "threshold", "null_rate_change", "out_of_range_rate", "unseen_rate", "rows", "crossed"]))
        if baseline is not None:
            if window is not None:
                base = Profile.from_dict(baseline["profile"])
                ranked = sorted((d for d in result.drift if d.get("value") is not None),
                                key=lambda d: -d["value"] / (d["threshold"] or 1))[:TOP_DISTRIBUTIONS]
                for item in ranked:
                    image = distribution_plot(item["column"], base, window)
                    if image:
                        parts.append(_figure(item["column"], f"{item['column']}: baseline and window shares", image))
    if result.skew:
        skew = result.skew
        parts.append(f"<h2>Online/offline skew</h2><p>{skew['compared']:,} of {skew['rows']:,} sampled rows compared "
                     f"({skew['not_yet_in_lake']:,} not yet in the lake).</p>")
        parts.append(_table(skew["features"], ["feature", "compared", "mismatch_rate", "missing_rate", "extra_rate",
                                               "inconsistent_rate", "threshold", "crossed"]))
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f4f4f4}"
             ".crossed{color:#c0392b}.within{color:#1e8449}figure{margin:1em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Monitoring {html.escape(result.run_id)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
