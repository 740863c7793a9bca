"""dpokit: Direct Preference Optimization and its family for causal language models."""

__version__ = "0.1.0"


def train(config, **overrides):
    """Run one training job; see `dpokit.training.loop.train`."""
    from dpokit.training.loop import train as _train

    return _train(config, **overrides)
