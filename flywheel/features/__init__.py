"""Features: aggregates from the lake, Feast definitions and stores, and the model's input transform.

Modules: ``build`` (the features step: offline tables, apply + materialize, the point-in-time
training set), ``compute`` (card and merchant aggregates), ``definitions`` (Feast entities and views),
``store`` (Feast configured from the settings, one feature world per training set) and ``transform``
(a transaction plus its features to the model's input vector, shared by training and serving).
"""

__all__ = ["build", "compute", "definitions", "store", "transform"]
