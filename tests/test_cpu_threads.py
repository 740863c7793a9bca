"""torch's CPU threads (issue 22.0): torch's count with OpenMP's passive wait (dpokit sets it before torch loads),
one thread for a small model only where OpenMP spins; the user's count when given."""

from __future__ import annotations

import pytest
import torch

from dpokit.config import load_config
from dpokit.cpu_threads import SMALL_MODEL_PARAMETERS, set_cpu_threads
from dpokit.models import load_policy
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
def test_auto_keeps_torchs_threads_for_a_small_model_when_openmp_waits_passively(monkeypatch):
    from dpokit import openmp

    monkeypatch.setattr(openmp, "PASSIVE_WAIT", True)
    assert set_cpu_threads(_Params(SMALL_MODEL_PARAMETERS - 1)) == 2 and torch.get_num_threads() == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto leaves the threads alone on a GPU machine")
def test_auto_gives_a_small_model_one_thread_where_openmp_spins(monkeypatch):
    from dpokit import openmp

    monkeypatch.setattr(openmp, "PASSIVE_WAIT", False)
    assert set_cpu_threads(_Params(SMALL_MODEL_PARAMETERS - 1)) == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert set_cpu_threads(_Params(SMALL_MODEL_PARAMETERS)) == 2 and torch.get_num_threads() == 2


def test_importing_dpokit_sets_a_passive_wait_before_torch_unless_the_user_chose():
    import os
    import subprocess
    import sys

    code = "import dpokit, os, torch; from dpokit import openmp; print(os.environ.get('OMP_WAIT_POLICY', 'unset'), openmp.PASSIVE_WAIT)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "True"]
    chosen = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert chosen.split() == ["ACTIVE", "False"]
    late = subprocess.run(
        [sys.executable, "-c", "import torch; " + code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert late.split()[-1] == "False"  # torch loaded OpenMP first: too late to choose its wait policy


def test_a_requested_count_wins():
    assert set_cpu_threads(_Params(10), requested=3) == 3 and torch.get_num_threads() == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto leaves the threads alone on a GPU machine")
def test_loading_the_policy_applies_train_num_threads():
    load_policy(load_config(None, {"model.name_or_path": str(tiny_model_dir()), "train.num_threads": 1}))
    assert torch.get_num_threads() == 1
    load_policy(load_config(None, {"model.name_or_path": str(tiny_model_dir()), "train.num_threads": 2}))
    assert torch.get_num_threads() == 2
