"""Training a model from a config (:mod:`.train`: stages, checkpoints, resume, signals, several processes)
and the batches prepared ahead of each step (:mod:`.loader`)."""
