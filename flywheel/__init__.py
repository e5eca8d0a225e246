"""flywheel: a workflow-orchestrated ML platform on Kubeflow.

All logic lives in this package; KFP components, pipelines, the Feast repo and the KServe predictor
are thin layers over it.
"""

__version__ = "0.1.0"
