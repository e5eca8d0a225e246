"""Feature definitions for the `feast` CLI: the card and merchant entities and feature views.

They read the offline tables of the latest `flywheel run` (see flywheel/features/definitions.py for
the definitions themselves, with a comment on every feature).
"""

from flywheel.config import load_settings
from flywheel.features.build import latest_tables
from flywheel.features.definitions import build_definitions
from flywheel.storage import Storage

_settings = load_settings()
_card_table, _merchant_table = latest_tables(Storage.from_settings(_settings))
card, merchant, card_features, merchant_features = build_definitions(_card_table, _merchant_table)
