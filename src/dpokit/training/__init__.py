"""The training loop and what it needs around it: setup, optimiser, checkpoints, signals, export, metrics, detectors."""
