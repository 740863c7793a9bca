"""torch's CPU threads for a run: how many, and why (dpokit/openmp.py sets OpenMP's wait policy behind them)."""

from __future__ import annotations

import torch

from dpokit import openmp

# Without OpenMP's passive wait (dpokit/openmp.py: torch was imported before dpokit, or the user chose ACTIVE),
# two threads spin-wait for each other when another process holds a core (the demo: 44 s idle, 323 s with one
# core busy), so a model this small gets one thread, the safe choice there. With passive waiting (the default)
# every model keeps torch's thread count: one thread halved the speed of sequences of a few hundred tokens.
SMALL_MODEL_PARAMETERS = 50_000_000


def set_cpu_threads(model, requested: int = 0) -> int:
    """torch's intra-op CPU threads for a run with `model`; returns the count in force.

    requested > 0: that many (train.num_threads). 0 (auto): torch's default (the cores it sees) when OpenMP
    waits passively, else one thread for a model under SMALL_MODEL_PARAMETERS. A GPU run is left alone.
    """
    if requested > 0:
        torch.set_num_threads(requested)
        return requested
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS
    if _on_cpu(model) and small and not openmp.PASSIVE_WAIT:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def _on_cpu(model) -> bool:
    """A CPU run: CPU threads matter (on a GPU machine they only feed the GPU, and are left alone)."""
    return all(p.device.type == "cpu" for p in model.parameters()) and not torch.cuda.is_available()


def cpu_threads_note(model) -> list[str]:
    """The run's console line about CPU threads (none on a GPU): the count and OpenMP's wait policy behind it."""
    if not _on_cpu(model):
        return []
    wait = "passive" if openmp.PASSIVE_WAIT else "active (OMP_WAIT_POLICY set, or torch imported before dpokit)"
    return [f"CPU threads: {torch.get_num_threads()} (OpenMP waits {wait}; train.num_threads sets them)"]
