"""The KServe predictor for the fraud model."""
