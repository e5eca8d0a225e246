"""Closing the loop: what serving saw (capture), how it compares with training (profiles, drift,
skew), how the model does as labels arrive, and retraining asked for on that evidence."""
