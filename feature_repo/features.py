"""Feature definitions for the `feast` CLI: the use case's entities and feature views.

They read the offline tables of the latest `flywheel run` and are generated from the use case's
declaration (its features.yaml, see flywheel/aggregations.py and flywheel/features/views.py).
"""

from flywheel.config import load_settings
from flywheel.features.build import latest_tables
from flywheel.features.definitions import build_definitions
from flywheel.features.views import views_of
from flywheel.storage import Storage
from flywheel.usecase import load_usecase

_settings = load_settings()
# Feast finds its objects among this module's names: one per entity and per feature view.
globals().update({obj.name: obj for obj in build_definitions(views_of(load_usecase(_settings.usecase)),
                                                             latest_tables(Storage.from_settings(_settings)))})
