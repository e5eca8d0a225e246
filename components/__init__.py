"""Thin KFP components: one per step. Each unpacks its artifacts and calls `flywheel.steps`.

They are lightweight Python components on the project image with `install_kfp_package=False`, so the
same function runs under `kfp.local` (SubprocessRunner) and on the cluster.
"""

from components.scoring import plan_scoring, score, summarize
from components.steps import deploy, evaluate, features, ingest, train, validate

__all__ = ["ingest", "validate", "features", "train", "evaluate", "deploy", "plan_scoring", "score", "summarize"]
