"""Training: ``train`` (the step: fit the spec, launch, publish), ``launcher`` (torchrun, error files,
retries), ``worker`` (one DDP rank) and ``model`` (the MLP and how it is saved)."""
