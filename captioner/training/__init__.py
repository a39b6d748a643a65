"""Training: `loop.fit(cfg)` (features, epochs, validation, checkpoints), self-critical epochs, the weight average,
the resumable run state and the distributed helpers."""
