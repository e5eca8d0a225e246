"""Card fraud's demo data: seeded synthetic card transactions with learnable fraud and an exact true
fraud probability (source.py's ``write_demo`` calls :func:`generate` for `flywheel run` without
--source and for `flywheel generate`).

The rows are this use case's contract (contract.yaml): its schema, label and vocabularies are read
from there, so the generator and the lake can never disagree.

The generative model, in one paragraph: a population of cards (each with a home location, a
typical amount and an activity weight) buys from a population of merchants (each with one fixed
category). A card's transactions come in sessions: mostly single transactions, sometimes a burst
of 3-8 transactions a minute or two apart. Session start times follow a diurnal pattern (nights are
quieter). Amounts scatter around the card's typical amount times the category's scale, with rare
spikes; locations are near home, rarely far away. Every transaction's true fraud probability is
``sigmoid(fraud_logit(...))`` of the risk factors a model can learn (amount spike, burst position,
risky category, night, distance from home, online channel), and its label is a Bernoulli draw of
that probability.

Output, under ``out_uri``::

    part-00000.<parquet|csv|jsonl> ...   raw transactions (the contract's schema), one file per chunk
    _truth/part-00000.parquet ...        TRUTH_SCHEMA: transaction_id, fraud_probability
    _generation.json                     parameters and counts, written last

Names starting with ``_`` are skipped by ingest, so the truth never reaches the lake. Generation
streams: only per-card and per-merchant parameter arrays are held for the whole run; each chunk
holds every transaction of a group of cards, so memory is bounded by ``chunk_rows``. The same
(rows, days, seed, start, chunk_rows, options) always gives byte-identical files.

Options (``options``: `flywheel generate --option KEY=VALUE`, strings or numbers; see :data:`OPTIONS`).
A later period of the same world: ``world_rows=N`` draws the cards and merchants of a run of N rows
(the earlier period's --rows; same seed), with this run's rows spread over them by the same
activity, and numbers the transaction ids ``t<seed>-<first day YYYYMMDD>-<n>``, so periods of one
world never share an id. Drift, from ``drift_from`` (a day; default the first day) on, and nothing
before it (rows before the day are exactly those of the same run without drift; the drift's own
draws come from a random stream of their own):

- ``amount_scale=F``: every amount times F (prices in a new currency, or inflation): the card's
  typical amount scales with it, so the true fraud probabilities and the labels do not change.
- ``new_category=NAME`` (``new_category_share=S``, default 0.1): a share S of the transactions go to
  new merchants (ids after the world's) of a category the contract does not know, with the amount
  scale 1 and no category risk.
- ``fraud_pattern=card_testing`` (``fraud_pattern_share=S``, default 0.03): a share S of the
  transactions become card tests: online payments of 0.50-2.00 (before any amount_scale), fraud
  with probability 0.6 whatever the card's other risk factors. A model trained before the day sees a
  small, ordinary online payment (small amounts carry no risk in fraud_logit) and misses them.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flywheel.errors import DataError, UseCaseError
from flywheel.geo import haversine_km
from flywheel.storage import Storage, join
from flywheel.usecase import load_usecase

# The contract this generator writes (usecases/fraud/contract.yaml).
CONTRACT = load_usecase(Path(__file__).resolve().parent).contract
TRANSACTION_SCHEMA = CONTRACT.arrow_schema()  # the raw transaction, as the lake stores it
LABEL = CONTRACT.labels[0]
MERCHANT_CATEGORIES = list(CONTRACT.columns["merchant_category"].categories or ())
CHANNELS = list(CONTRACT.columns["channel"].categories or ())

# The truth file written apart from the raw data: each row's true fraud probability.
TRUTH_SCHEMA = pa.schema(
    [
        pa.field(CONTRACT.id, pa.string(), nullable=False),
        pa.field("fraud_probability", pa.float64(), nullable=False),
    ]
)

FORMATS = ("parquet", "csv", "jsonl")
GENERATOR_VERSION = 1  # bump when the generative model changes: same seed, different data

# Share of transactions per merchant category (sums to 1): everyday categories dominate.
CATEGORY_POPULARITY = {
    "grocery": 0.20,
    "restaurant": 0.17,
    "gas": 0.12,
    "pharmacy": 0.06,
    "retail": 0.14,
    "online_retail": 0.13,
    "entertainment": 0.06,
    "travel": 0.04,
    "electronics": 0.04,
    "jewelry": 0.01,
    "gift_cards": 0.015,
    "crypto": 0.015,
}
# A category's typical amount, relative to the card's typical amount.
CATEGORY_AMOUNT_SCALE = {
    "grocery": 1.0,
    "restaurant": 0.8,
    "gas": 0.9,
    "pharmacy": 0.6,
    "retail": 1.3,
    "online_retail": 1.2,
    "entertainment": 1.0,
    "travel": 4.0,
    "electronics": 3.0,
    "jewelry": 4.0,
    "gift_cards": 1.5,
    "crypto": 3.0,
}
# Added to the fraud logit: fraudsters cash out where goods resell easily.
CATEGORY_RISK = {"gift_cards": 1.6, "crypto": 1.8, "electronics": 1.0, "jewelry": 1.2, "travel": 0.5}
CHANNEL_PROBS = {"chip": 0.40, "contactless": 0.25, "swipe": 0.05, "online": 0.30}

for _declared, _modelled, _what in ((MERCHANT_CATEGORIES, CATEGORY_POPULARITY, "merchant_category"),
                                    (CHANNELS, CHANNEL_PROBS, "channel")):
    if set(_declared) != set(_modelled):  # the generative model has a rate for each declared value
        raise UseCaseError(f"{__file__}: the contract's {_what} categories {sorted(_declared)} differ from the "
                           f"generator's {sorted(_modelled)}: give the generator a rate for each")

LAT_RANGE = (25.0, 49.0)  # the continental US, roughly
LON_RANGE = (-124.0, -67.0)
HOME_SIGMA_DEG = 0.1  # ~11 km: where a card usually shops around its home
FAR_PROB = 0.03
FAR_KM = 300.0
BURST_PROB = 0.03
BURST_SIZES = (3, 8)  # inclusive
BURST_GAP_S = 90.0  # mean of the exponential gap between transactions of a burst
SPIKE_PROB = 0.02
SPIKE_FACTOR = (4.0, 15.0)
NIGHT_HOURS = 6  # hours 0-5 UTC
NIGHT_RATE = 0.25  # night sessions per hour, relative to a daytime hour
ROWS_PER_CARD = 50
ROWS_PER_MERCHANT = 200

# Options (module docstring). A drift option's value is checked against these.
OPTIONS = ("world_rows", "drift_from", "amount_scale", "new_category", "new_category_share", "fraud_pattern",
           "fraud_pattern_share")
FRAUD_PATTERNS = ("card_testing",)
NEW_CATEGORY_SHARE = 0.1  # default share of transactions going to the new category
CARD_TEST_SHARE = 0.03  # default share of transactions that are card tests
CARD_TEST_AMOUNT = (0.5, 2.0)
CARD_TEST_FRAUD_PROBABILITY = 0.6
MIN_AMOUNT = 0.01  # a payment is positive (the contract's strict min 0)
MAX_AMOUNT = float(CONTRACT.columns["amount"].max)  # scaled amounts are capped at the contract's bound
_CATEGORY_NAME = re.compile(r"^[a-z0-9_]{1,40}$")

# Intercept of the fraud logit. Calibrated once by simulation: for 2M rows x seeds 1-5 the logit
# without the intercept, r, was collected; mean(sigmoid(b0 + r)) is monotone in b0, and a bisection
# for a mean of 1.5% gave b0 = -6.559 (per-seed means 1.49%-1.50%). Re-calibrate whenever a weight
# or a rate above changes (collect r as logit(fraud_probability) - FRAUD_INTERCEPT).
FRAUD_INTERCEPT = -6.56

_US_PER_S = 1_000_000
_US_PER_HOUR = 3600 * _US_PER_S
_US_PER_DAY = 24 * _US_PER_HOUR
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_PART = re.compile(r"part-\d{5}\.(parquet|csv|jsonl)$")


@dataclass
class GenerateResult:
    """What :func:`generate` wrote: row counts, the files (raw and truth) and the population sizes."""

    rows: int
    fraud_rows: int
    files: list[str]
    truth_files: list[str]
    cards: int
    merchants: int
    start: dt.datetime
    end: dt.datetime

    def fraud_rate(self) -> float:
        """The share of rows labelled fraud."""
        return self.fraud_rows / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class Population:
    """The run-wide parameters: per card (home, typical amount, transaction count) and per merchant."""

    home_lat: np.ndarray
    home_lon: np.ndarray
    typical_amount: np.ndarray
    activity: np.ndarray  # a card's relative transaction rate
    counts: np.ndarray  # transactions per card; sums to the requested rows
    merchant_category: np.ndarray  # index into MERCHANT_CATEGORIES
    merchant_cdf: np.ndarray  # cumulative probability that a transaction goes to merchant m

    @property
    def cards(self) -> int:
        return len(self.counts)

    @property
    def merchants(self) -> int:
        return len(self.merchant_category)


# ---------------------------------------------------------------------------------------------
# Pure pieces of the model
# ---------------------------------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def fraud_logit(
    amount: np.ndarray,
    expected_amount: np.ndarray,
    burst_position: np.ndarray,
    category_risk: np.ndarray,
    hour: np.ndarray,
    distance_km: np.ndarray,
    online: np.ndarray,
    intercept: float = FRAUD_INTERCEPT,
) -> np.ndarray:
    """The log-odds that a transaction is fraud.

    ``expected_amount`` is the card's typical amount times the category's scale; ``burst_position``
    is 0 for a transaction alone in its session and 1, 2, ... for the transactions of a burst, in
    time order (so the second transaction of a burst, the first one a model can see is part of a
    burst, gets the big step).
    """
    amount_excess = np.maximum(0.0, np.log(amount / expected_amount))
    return (
        intercept
        + 1.8 * amount_excess
        + 1.8 * (burst_position >= 2)
        + 0.3 * np.minimum(burst_position, 5)
        + category_risk
        + 1.2 * (hour < NIGHT_HOURS)
        + 1.5 * (distance_km > FAR_KM)
        + 0.4 * online
    )


def burst_positions(session_sizes: np.ndarray) -> np.ndarray:
    """Per transaction, laid out session after session: 0 in a one-transaction session, else 1..size."""
    position = _position_in_group(session_sizes)
    return np.where(np.repeat(session_sizes, session_sizes) > 1, position + 1, 0)


def split_into_sessions(counts: np.ndarray, candidate_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut each card's transaction count into sessions, card after card.

    ``candidate_sizes`` holds ``counts.sum()`` drawn session sizes (each >= 1), the first
    ``counts[0]`` for card 0, the next ``counts[1]`` for card 1, and so on: a card uses its
    candidates in order until its count is reached, capping the last session at what is left.
    Returns (session card index, session size); sizes per card sum to ``counts``.
    """
    card_of_candidate = np.repeat(np.arange(len(counts)), counts)
    start_in_card = _position_in_group(counts, values=candidate_sizes)
    left = counts[card_of_candidate] - start_in_card
    used = left > 0
    return card_of_candidate[used], np.minimum(candidate_sizes[used], left[used])


def _position_in_group(group_sizes: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """For items laid out group after group: the sum of ``values`` (default 1 each) over the earlier
    items of the same group. With the default, each item's 0-based position in its group."""
    total = int(group_sizes.sum())
    values = np.ones(total, dtype=np.int64) if values is None else values
    before = np.cumsum(values) - values
    group_start = np.cumsum(group_sizes) - group_sizes
    return before - np.repeat(before[np.minimum(group_start, max(total - 1, 0))], group_sizes)


def hour_probabilities() -> np.ndarray:
    """The diurnal pattern: the chance that a session starts in each UTC hour."""
    weights = np.where(np.arange(24) < NIGHT_HOURS, NIGHT_RATE, 1.0)
    return weights / weights.sum()


# ---------------------------------------------------------------------------------------------
# Population and chunks
# ---------------------------------------------------------------------------------------------


def make_population(rows: int, rng: np.random.Generator) -> Population:
    """Draw the cards and merchants for a run of ``rows`` transactions."""
    n_cards = max(10, rows // ROWS_PER_CARD)
    home_lat = rng.uniform(*LAT_RANGE, n_cards)
    home_lon = rng.uniform(*LON_RANGE, n_cards)
    typical_amount = rng.lognormal(np.log(40.0), 0.6, n_cards)
    activity = rng.gamma(2.0, 1.0, n_cards)
    counts = rng.multinomial(rows, activity / activity.sum()).astype(np.int64)
    category, cdf = _make_merchants(max(20, rows // ROWS_PER_MERCHANT), rng)
    return Population(home_lat, home_lon, typical_amount, activity, counts, category, cdf)


def with_rows(population: Population, rows: int, rng: np.random.Generator) -> Population:
    """The same cards and merchants with ``rows`` transactions spread over the cards by their
    activity (a later period of the same world)."""
    counts = rng.multinomial(rows, population.activity / population.activity.sum()).astype(np.int64)
    return replace(population, counts=counts)


@dataclass(frozen=True)
class Options:
    """The generator's options, checked (:func:`parse_options`); the defaults change nothing."""

    world_rows: int | None = None
    drift_from: dt.datetime | None = None
    amount_scale: float | None = None
    new_category: str | None = None
    new_category_share: float | None = None
    fraud_pattern: str | None = None
    fraud_pattern_share: float | None = None

    @property
    def drifts(self) -> bool:
        return self.amount_scale is not None or self.new_category is not None or self.fraud_pattern is not None

    def given(self) -> dict[str, Any]:
        """The options that were given, as JSON values (for _generation.json)."""
        values = {name: getattr(self, name) for name in OPTIONS if getattr(self, name) is not None}
        return {name: value.isoformat() if isinstance(value, dt.datetime) else value for name, value in values.items()}


def parse_options(options: Mapping[str, Any] | None) -> Options:
    """Check the options (strings, as `flywheel generate --option KEY=VALUE` gives them, or numbers and
    dates); a :class:`DataError` names the option that is unknown or wrong, and the known ones."""
    options = dict(options or {})
    unknown = sorted(name for name in options if name not in OPTIONS)
    if unknown:
        raise DataError(f"fraud's generator has no option {', '.join(map(repr, unknown))}: the known options are "
                        f"{', '.join(OPTIONS)}")
    parsed = Options(
        world_rows=_option(options, "world_rows", _whole_number),
        drift_from=_option(options, "drift_from", _day),
        amount_scale=_option(options, "amount_scale", _positive_number),
        new_category=_option(options, "new_category", _new_category),
        new_category_share=_option(options, "new_category_share", _share),
        fraud_pattern=_option(options, "fraud_pattern", _fraud_pattern),
        fraud_pattern_share=_option(options, "fraud_pattern_share", _share),
    )
    for share, of in (("new_category_share", "new_category"), ("fraud_pattern_share", "fraud_pattern")):
        if getattr(parsed, share) is not None and getattr(parsed, of) is None:
            raise DataError(f"option {share} is the share of {of}'s rows: give {of} too")
    if parsed.drift_from is not None and not parsed.drifts:
        raise DataError("option drift_from is the day a drift starts: give a drift too "
                        "(amount_scale, new_category or fraud_pattern)")
    if parsed.new_category is not None and parsed.new_category_share is None:
        parsed = replace(parsed, new_category_share=NEW_CATEGORY_SHARE)
    if parsed.fraud_pattern is not None and parsed.fraud_pattern_share is None:
        parsed = replace(parsed, fraud_pattern_share=CARD_TEST_SHARE)
    return parsed


def _option(options: dict[str, Any], name: str, parse: Callable[[Any], Any]) -> Any:
    if name not in options or options[name] is None:
        return None
    try:
        return parse(options[name])
    except (ValueError, TypeError) as exc:
        raise DataError(f"option {name}={options[name]!r}: {exc}") from None


def _whole_number(value: Any) -> int:
    number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 1:
        raise ValueError("must be a whole number >= 1 (the --rows of the earlier period of this world)")
    return int(number)


def _number(value: Any) -> float | None:
    """A number from a number or its text; None when it is neither (or not finite)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.number)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if np.isfinite(number) else None


def _positive_number(value: Any) -> float:
    number = _number(value)
    if number is None or number <= 0:
        raise ValueError("must be a number above 0, e.g. 3")
    return number


def _share(value: Any) -> float:
    number = _number(value)
    if number is None or not 0 < number <= 1:
        raise ValueError("must be a share above 0 and at most 1, e.g. 0.2")
    return number


def _day(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        day = value
    elif isinstance(value, dt.date):
        day = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            day = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("must be an ISO-8601 date or time, e.g. 2026-10-20") from None
    else:
        raise ValueError("must be an ISO-8601 date or time, e.g. 2026-10-20")
    return day.replace(tzinfo=dt.timezone.utc) if day.tzinfo is None else day.astimezone(dt.timezone.utc)


def _new_category(value: Any) -> str:
    if not isinstance(value, str) or not _CATEGORY_NAME.match(value):
        raise ValueError("must be a category name of lower-case letters, digits and _, e.g. crypto_atm")
    if value in MERCHANT_CATEGORIES:
        raise ValueError(f"is already one of the contract's merchant categories ({', '.join(MERCHANT_CATEGORIES)}): "
                         "name a new one")
    return value


def _fraud_pattern(value: Any) -> str:
    if value not in FRAUD_PATTERNS:
        raise ValueError(f"unknown fraud pattern: choose one of {', '.join(FRAUD_PATTERNS)}")
    return value


def _make_merchants(n_merchants: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each merchant's category and the cumulative transaction probability over merchants.

    Every category gets at least one merchant, the rest are drawn by popularity; a merchant's share
    of its category is a lognormal weight, so each category's share of transactions is exactly its
    popularity and the fraud rate does not swing with how many rare-category merchants were drawn.
    """
    popularity = np.array([CATEGORY_POPULARITY[c] for c in MERCHANT_CATEGORIES])
    drawn = rng.choice(len(popularity), size=n_merchants - len(popularity), p=popularity)
    category = rng.permutation(np.concatenate([np.arange(len(popularity)), drawn]))
    weight = rng.lognormal(0.0, 1.0, n_merchants)
    weight_of_category = np.bincount(category, weights=weight, minlength=len(popularity))
    probability = popularity[category] * weight / weight_of_category[category]
    cdf = np.cumsum(probability)
    return category, cdf / cdf[-1]


def plan_chunks(counts: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """Group consecutive cards into chunks of at most ``chunk_rows`` transactions.

    A card is never split, so a card with more than ``chunk_rows`` transactions gets a chunk of its
    own. Cards without transactions ride along and never open a chunk, so no chunk is empty.
    Returns half-open card ranges.
    """
    chunks: list[tuple[int, int]] = []
    first, rows_in_chunk = 0, 0
    for card, count in enumerate(counts.tolist()):
        if count and rows_in_chunk and rows_in_chunk + count > chunk_rows:
            chunks.append((first, card))
            first, rows_in_chunk = card, 0
        rows_in_chunk += count
    chunks.append((first, len(counts)))
    return chunks


# ---------------------------------------------------------------------------------------------
# One chunk
# ---------------------------------------------------------------------------------------------


def generate_chunk(
    population: Population,
    cards: tuple[int, int],
    rng: np.random.Generator,
    first_row: int,
    seed: int,
    start_us: int,
    days: int,
    drift: Drift | None = None,
    id_prefix: str | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Every transaction of the cards in ``cards``; returns (raw table, truth table).

    The draws happen in a fixed order whatever their use, so a chunk is a pure function of its
    inputs and its generator's state. ``drift`` changes the rows from its day on with draws of its
    own generator, so the rows before the day are those of the same chunk without it.
    """
    first_card, end_card = cards
    counts = population.counts[first_card:end_card]
    n = int(counts.sum())

    session_card, session_size, offset_us = _draw_sessions(counts, rng)
    card = np.repeat(session_card, session_size)  # relative to first_card
    position = burst_positions(session_size)
    ts_us = _draw_session_starts(session_size, offset_us, rng, start_us, days)

    merchant = np.minimum(np.searchsorted(population.merchant_cdf, rng.random(n), side="right"), population.merchants - 1)
    category = population.merchant_category[merchant]
    scale = np.array([CATEGORY_AMOUNT_SCALE[c] for c in MERCHANT_CATEGORIES])[category]
    expected_amount = population.typical_amount[first_card + card] * scale
    noise = rng.lognormal(0.0, 0.45, n)
    spike = np.where(rng.random(n) < SPIKE_PROB, rng.uniform(*SPIKE_FACTOR, n), 1.0)
    amount = np.maximum(np.round(expected_amount * noise * spike, 2), 0.5)

    home_lat, home_lon, lat, lon = _draw_locations(population, first_card + card, rng)

    channel_cdf = np.cumsum([CHANNEL_PROBS[c] for c in CHANNELS])
    channel = np.minimum(np.searchsorted(channel_cdf / channel_cdf[-1], rng.random(n), side="right"), len(CHANNELS) - 1)

    risk = np.array([CATEGORY_RISK.get(c, 0.0) for c in MERCHANT_CATEGORIES])[category]
    categories, card_test = MERCHANT_CATEGORIES, np.zeros(n, dtype=bool)
    if drift is not None:
        amount, expected_amount, merchant, category, risk, channel, card_test = drift.apply(
            ts_us >= drift.from_us, amount, expected_amount, merchant, category, risk, channel)
        categories = drift.categories
    hour = (ts_us // _US_PER_HOUR) % 24
    z = fraud_logit(
        amount, expected_amount, position, risk, hour, haversine_km(home_lat, home_lon, lat, lon), channel == CHANNELS.index("online")
    )
    probability = np.where(card_test, CARD_TEST_FRAUD_PROBABILITY, sigmoid(z))
    is_fraud = (rng.random(n) < probability).astype(np.int8)

    order = np.lexsort((ts_us, card))  # each card's transactions in time order, cards in id order
    columns = {
        "card_id": _ids("c", first_card + card[order] + 1, 7),
        "merchant_id": _ids("m", merchant[order] + 1, 6),
        "merchant_category": pa.array(categories).take(pa.array(category[order])),
        "amount": pa.array(amount[order]),
        "ts": pa.array(ts_us[order], type=pa.timestamp("us", tz="UTC")),
        "channel": pa.array(CHANNELS).take(pa.array(channel[order])),
        "lat": pa.array(lat[order]),
        "lon": pa.array(lon[order]),
        LABEL: pa.array(is_fraud[order]),
    }
    return _chunk_tables(id_prefix or f"t{seed}-", first_row, columns, probability[order])


@dataclass
class Drift:
    """The drift options of a run, applied to one chunk at a time (:meth:`apply`)."""

    options: Options
    from_us: int  # the first drifted microsecond
    merchants: int  # the world's merchants: the new category's merchants are numbered after them
    rng: np.random.Generator  # the chunk's drift draws (set per chunk)

    @property
    def categories(self) -> list[str]:
        """The category names an index points into: the contract's, then the new one."""
        return MERCHANT_CATEGORIES + ([self.options.new_category] if self.options.new_category else [])

    @property
    def new_merchants(self) -> int:
        """How many merchants the new category has: its share of the world's merchants, at least one."""
        return max(1, round(self.merchants * (self.options.new_category_share or 0.0)))

    def apply(self, drifted: np.ndarray, amount: np.ndarray, expected_amount: np.ndarray, merchant: np.ndarray,
              category: np.ndarray, risk: np.ndarray, channel: np.ndarray) -> tuple[np.ndarray, ...]:
        """The rows where ``drifted`` is set, drifted; returns (amount, expected amount, merchant,
        category, risk, channel, card test) with the other rows unchanged. The draws happen in a
        fixed order whatever the options, so each option picks the same rows with or without the others."""
        n, options = len(amount), self.options
        to_new, pick, test, test_amount = self.rng.random(n), self.rng.random(n), self.rng.random(n), self.rng.uniform(*CARD_TEST_AMOUNT, n)
        card_test = np.zeros(n, dtype=bool)
        if options.new_category is not None:
            moved = drifted & (to_new < options.new_category_share)
            new_merchant = self.merchants + np.minimum((pick * self.new_merchants).astype(np.int64), self.new_merchants - 1)
            scale = np.array([CATEGORY_AMOUNT_SCALE[c] for c in MERCHANT_CATEGORIES])[category]
            factor = np.where(moved, 1.0 / scale, 1.0)  # the new category's amount scale is 1
            amount = np.where(moved, np.maximum(np.round(amount * factor, 2), 0.5), amount)
            expected_amount = expected_amount * factor
            merchant = np.where(moved, new_merchant, merchant)
            category = np.where(moved, len(MERCHANT_CATEGORIES), category)
            risk = np.where(moved, 0.0, risk)
        if options.fraud_pattern == "card_testing":
            card_test = drifted & (test < options.fraud_pattern_share)
            amount = np.where(card_test, np.round(test_amount, 2), amount)
            channel = np.where(card_test, CHANNELS.index("online"), channel)
        if options.amount_scale is not None:
            scaled = np.clip(np.round(amount * options.amount_scale, 2), MIN_AMOUNT, MAX_AMOUNT)
            amount = np.where(drifted, scaled, amount)
            expected_amount = np.where(drifted, expected_amount * options.amount_scale, expected_amount)
        return amount, expected_amount, merchant, category, risk, channel, card_test


def _draw_locations(
    population: Population, cards: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(home lat, home lon, lat, lon) per transaction: near home, or anywhere with FAR_PROB."""
    n = len(cards)
    home_lat, home_lon = population.home_lat[cards], population.home_lon[cards]
    far = rng.random(n) < FAR_PROB
    lat = np.round(np.where(far, rng.uniform(*LAT_RANGE, n), home_lat + rng.normal(0.0, HOME_SIGMA_DEG, n)), 6)
    lon = np.round(np.where(far, rng.uniform(*LON_RANGE, n), home_lon + rng.normal(0.0, HOME_SIGMA_DEG, n)), 6)
    return home_lat, home_lon, lat, lon


def _chunk_tables(id_prefix: str, first_row: int, columns: dict[str, pa.Array], probability: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """The raw table (ids numbered from ``first_row``) and its truth table, in TRANSACTION_SCHEMA order."""
    transaction_id = _ids(id_prefix, np.arange(first_row, first_row + len(probability)), 10)
    columns = {"transaction_id": transaction_id, **columns}
    raw = pa.Table.from_arrays([columns[name] for name in TRANSACTION_SCHEMA.names], schema=TRANSACTION_SCHEMA)
    truth = pa.Table.from_arrays([transaction_id, pa.array(probability)], schema=TRUTH_SCHEMA)
    return raw, truth


def _draw_sessions(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sessions of the chunk's cards: (session card, session size, per-transaction offset from the
    session start in us). A session is one transaction, or with BURST_PROB a burst of BURST_SIZES."""
    n = int(counts.sum())
    is_burst = rng.random(n) < BURST_PROB
    burst_size = rng.integers(BURST_SIZES[0], BURST_SIZES[1] + 1, n)
    session_card, session_size = split_into_sessions(counts, np.where(is_burst, burst_size, 1))
    gap_s = rng.exponential(BURST_GAP_S, n)
    gap_s[_position_in_group(session_size) == 0] = 0.0  # a session starts at its first transaction
    offset_us = (_position_in_group(session_size, values=gap_s) + gap_s) * _US_PER_S
    return session_card, session_size, offset_us.astype(np.int64)


def _draw_session_starts(
    session_size: np.ndarray, offset_us: np.ndarray, rng: np.random.Generator, start_us: int, days: int
) -> np.ndarray:
    """Each transaction's timestamp (us since the epoch): its session's start, drawn with the
    diurnal pattern over [start, start + days), plus its offset. A burst that would run past the
    end is moved back so that it ends inside the window."""
    n_sessions = len(session_size)
    day = rng.integers(0, days, n_sessions)
    hour = rng.choice(24, size=n_sessions, p=hour_probabilities())
    within_hour = (rng.random(n_sessions) * _US_PER_HOUR).astype(np.int64)
    session_start = start_us + day * _US_PER_DAY + hour * _US_PER_HOUR + within_hour
    last = np.cumsum(session_size) - 1
    latest_start = start_us + days * _US_PER_DAY - 1 - offset_us[last]
    session_start = np.maximum(np.minimum(session_start, latest_start), start_us)
    return np.repeat(session_start, session_size) + offset_us


def _ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    """``prefix`` + zero-padded numbers, e.g. c0000042 (wider numbers are kept whole)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers, type=pa.int64()), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def encode(table: pa.Table, fmt: str) -> bytes:
    """A raw table as csv or jsonl bytes, timestamps as ISO-8601 strings with a Z suffix."""
    iso = pc.binary_join_element_wise(pc.strftime(table["ts"], format="%Y-%m-%dT%H:%M:%S"), "Z", "")
    table = table.set_column(table.schema.get_field_index("ts"), "ts", iso)
    if fmt == "csv":
        import pyarrow.csv as pa_csv

        buffer = io.BytesIO()
        pa_csv.write_csv(table, buffer)
        return buffer.getvalue()
    return _to_jsonl(table)


def _to_jsonl(table: pa.Table, batch_rows: int = 100_000) -> bytes:
    """One JSON object per line, built column-wise in Arrow (pandas' to_json is ~5x slower and
    holds several copies). Strings are quoted without escaping: every string this module writes
    (ids, categories, channels, ISO times) is drawn from [A-Za-z0-9_:.-]. Floats always carry a
    decimal point or an exponent, so a reader never infers an integer column."""
    out = io.BytesIO()
    for start in range(0, table.num_rows, batch_rows):
        batch = table.slice(start, batch_rows)
        pieces: list = []
        for i, field in enumerate(batch.schema):
            pieces += [("{" if i == 0 else ",") + f'"{field.name}":', _json_values(batch[field.name], field.type)]
        lines = pc.binary_join_element_wise(*pieces, "}\n", "")
        out.write("".join(lines.to_pylist()).encode())
    return out.getvalue()


def _json_values(column: pa.ChunkedArray, type_: pa.DataType) -> pa.ChunkedArray:
    """A column's values as JSON literals."""
    text = pc.cast(column, pa.string())
    if pa.types.is_string(type_):
        return pc.binary_join_element_wise('"', text, '"', "")
    if pa.types.is_floating(type_):
        has_point = pc.match_substring_regex(text, r"[.eE]")
        return pc.if_else(has_point, text, pc.binary_join_element_wise(text, ".0", ""))
    return text


def _write_part(storage: Storage, uri: str, table: pa.Table, fmt: str) -> None:
    if fmt == "parquet":
        storage.write_parquet(uri, table)
    else:
        storage.write_bytes(uri, encode(table, fmt))


def _remove_stale_parts(storage: Storage, out_uri: str, written: list[str]) -> None:
    """Delete part files an earlier, larger generation left in ``out_uri`` (and its _truth/), so a
    reader of the folder sees exactly this run's rows."""
    keep = set(written)
    for folder in (out_uri, join(out_uri, "_truth")):
        for uri in storage.list(folder):
            relative = _relative(uri, folder)
            if "/" not in relative and _PART.match(relative) and uri not in keep:
                storage.delete(uri)


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


def generate(
    storage: Storage,
    out_uri: str,
    rows: int,
    days: int = 30,
    seed: int = 7,
    start: dt.datetime | str = "2026-10-01",
    fmt: str = "parquet",
    chunk_rows: int = 500_000,
    progress: Callable[[int], None] | None = None,
    options: Mapping[str, Any] | Options | None = None,
) -> GenerateResult:
    """Write ``rows`` synthetic transactions over ``days`` days from ``start`` (UTC) to ``out_uri``.

    One raw file per chunk of at most ``chunk_rows`` rows (more only when one card alone has more),
    the true fraud probabilities apart under ``_truth/``, then ``_generation.json``. ``progress`` is
    called after each chunk with the number of rows written so far. ``options``: a later period of
    the same world and drift (module docstring, :data:`OPTIONS`), checked before anything is written.
    """
    start_at = _validate(rows, days, seed, fmt, chunk_rows, start)
    start_us = (start_at - _EPOCH) // dt.timedelta(microseconds=1)
    chosen = options if isinstance(options, Options) else parse_options(options)
    end_at = start_at + dt.timedelta(days=days)
    drift_from = chosen.drift_from or start_at
    if chosen.drifts and drift_from >= end_at:
        raise DataError(f"option drift_from={drift_from.date().isoformat()} is not before the end of the generated "
                        f"days ({start_at.date().isoformat()} to {(end_at - dt.timedelta(days=1)).date().isoformat()}): "
                        "nothing would drift")
    population = make_population(chosen.world_rows or rows, np.random.default_rng([seed, 0]))
    if chosen.world_rows is not None and chosen.world_rows != rows:
        population = with_rows(population, rows, np.random.default_rng([seed, 2]))
    id_prefix = f"t{seed}-{start_at:%Y%m%d}-" if chosen.world_rows is not None else f"t{seed}-"
    drift = None
    if chosen.drifts:
        drift_from_us = (drift_from - _EPOCH) // dt.timedelta(microseconds=1)
        drift = Drift(chosen, drift_from_us, population.merchants, np.random.default_rng([seed, 3]))

    files: list[str] = []
    truth_files: list[str] = []
    written = fraud_rows = 0
    for index, cards in enumerate(plan_chunks(population.counts, chunk_rows)):
        rng = np.random.default_rng([seed, 1, index])
        if drift is not None:
            drift.rng = np.random.default_rng([seed, 3, index])
        raw, truth = generate_chunk(population, cards, rng, written, seed, start_us, days, drift, id_prefix)
        name = f"part-{index:05d}"
        files.append(join(out_uri, f"{name}.{fmt}"))
        truth_files.append(join(out_uri, "_truth", f"{name}.parquet"))
        _write_part(storage, files[-1], raw, fmt)
        storage.write_parquet(truth_files[-1], truth)
        written += raw.num_rows
        fraud_rows += int(pc.sum(raw[LABEL]).as_py() or 0)
        if progress is not None:
            progress(written)

    _remove_stale_parts(storage, out_uri, files + truth_files)
    result = GenerateResult(
        rows=written,
        fraud_rows=fraud_rows,
        files=files,
        truth_files=truth_files,
        cards=population.cards,
        merchants=population.merchants,
        start=start_at,
        end=start_at + dt.timedelta(days=days),
    )
    summary = _summary(result, out_uri, days, seed, fmt, chunk_rows)
    if chosen.given():
        summary["parameters"]["options"] = chosen.given()
    storage.write_json(join(out_uri, "_generation.json"), summary)
    return result


def _validate(rows: int, days: int, seed: int, fmt: str, chunk_rows: int, start: dt.datetime | str) -> dt.datetime:
    """Check the arguments; returns ``start`` as an aware UTC datetime."""
    for name, value in (("rows", rows), ("days", days), ("chunk_rows", chunk_rows)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"{name} must be a whole number >= 1, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a whole number >= 0, got {seed!r}")
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(start, str):
        try:
            start = dt.datetime.fromisoformat(start.replace("Z", "+00:00"))
        except ValueError:
            raise DataError(f"start {start!r} is not an ISO-8601 date or time, e.g. 2026-10-01") from None
    if not isinstance(start, dt.datetime):
        raise DataError(f"start must be a datetime or an ISO-8601 string, got {type(start).__name__}")
    return start.replace(tzinfo=dt.timezone.utc) if start.tzinfo is None else start.astimezone(dt.timezone.utc)


def _summary(result: GenerateResult, out_uri: str, days: int, seed: int, fmt: str, chunk_rows: int) -> dict:
    """The content of _generation.json. File names are relative to the output folder and there is
    no wall-clock time in it, so a rerun writes the same bytes wherever the output goes."""
    return {
        "generator_version": GENERATOR_VERSION,
        "parameters": {
            "rows": result.rows,
            "days": days,
            "seed": seed,
            "start": result.start.isoformat(),
            "fmt": fmt,
            "chunk_rows": chunk_rows,
            "fraud_intercept": FRAUD_INTERCEPT,
        },
        "rows": result.rows,
        "fraud_rows": result.fraud_rows,
        "fraud_rate": result.fraud_rate(),
        "cards": result.cards,
        "merchants": result.merchants,
        "start": result.start.isoformat(),
        "end": result.end.isoformat(),
        "files": [_relative(uri, out_uri) for uri in result.files],
        "truth_files": [_relative(uri, out_uri) for uri in result.truth_files],
    }


def _relative(uri: str, base: str) -> str:
    return uri[len(base.rstrip("/")):].lstrip("/")

