"""The validation split: the latest part of the training rows by time, for early stopping.

The holdout (the last part of the whole span, see :func:`flywheel.features.build.split_by_time`)
never reaches training; validation is cut from the END of the training rows, so it is the training
data's own future, as the holdout is training's future, and the two never overlap.
"""

from __future__ import annotations

import pandas as pd

from flywheel.errors import DataError


def split_validation(frame: pd.DataFrame, fraction: float, time: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fit rows, validation rows): validation is the last ``fraction`` of the span of the rows' event
    time (column ``time``).

    ``fraction`` 0 gives no validation rows (no early stopping). Raises DataError when a non-zero
    fraction leaves either side empty (every row at one instant, or too few rows).
    """
    if fraction <= 0:
        return frame, frame.iloc[:0]
    ts = pd.to_datetime(frame[time], utc=True)
    start, end = ts.min(), ts.max()
    cutoff = start + (end - start) * (1 - fraction)
    fit, validation = frame[ts < cutoff], frame[ts >= cutoff]
    if fit.empty or validation.empty:
        raise DataError(
            f"the validation split (last {fraction:.0%} of the training span, {start} to {end}) leaves "
            f"{len(fit)} rows to fit and {len(validation)} to validate; training needs rows spread over time "
            "(or set training.validation_fraction to 0 to train without early stopping)"
        )
    return fit, validation
