"""dpokit: Direct Preference Optimization and its family for causal language models."""

from dpokit import openmp  # noqa: F401 - first: OMP_WAIT_POLICY must be set before torch loads OpenMP
from dpokit.version import __version__

__all__ = ["__version__", "train"]


def train(config, overrides=None, data=None):
    """Run one training job: `dpokit.train("my.yaml", ["loss.beta=0.05"])`; see `dpokit.training.loop.train`.

    config: a Config, a dict, or a YAML path; overrides: ["key=value", ...] or {key: value}.
    Imported on call, so `import dpokit` stays light (no torch until a job runs).
    """
    from dpokit.training.loop import train as run

    return run(config, overrides, data)
