"""torch's CPU threads: one for small models on CPU (auto), the user's count when given (issue 15.9)."""

from __future__ import annotations

import pytest
import torch

from dpokit.config import load_config
from dpokit.models import SMALL_MODEL_PARAMETERS, load_policy, set_cpu_threads
from tiny_assets import tiny_model_dir


class _Params:
    """A stand-in model: parameters of a given total size, no memory (an expanded scalar)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def parameters(self):
        yield torch.zeros(1).expand(self.n)


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto leaves the threads alone on a GPU machine")
def test_auto_gives_a_small_cpu_model_one_thread_and_leaves_a_large_one_alone():
    assert set_cpu_threads(_Params(SMALL_MODEL_PARAMETERS - 1)) == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert set_cpu_threads(_Params(SMALL_MODEL_PARAMETERS)) == 0 and torch.get_num_threads() == 2


def test_a_requested_count_wins():
    assert set_cpu_threads(_Params(10), requested=3) == 3 and torch.get_num_threads() == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto leaves the threads alone on a GPU machine")
def test_loading_the_policy_applies_train_num_threads():
    load_policy(load_config(None, {"model.name_or_path": str(tiny_model_dir())}))
    assert torch.get_num_threads() == 1  # a tiny model, auto
    load_policy(load_config(None, {"model.name_or_path": str(tiny_model_dir()), "train.num_threads": 2}))
    assert torch.get_num_threads() == 2
