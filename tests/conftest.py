"""Test-session settings.

One intra-op thread per process: the tiny models gain nothing from more, and on a
shared 2-core machine (or with the 2-process DDP tests) two threads per process
oversubscribe the cores and run many times slower.

$DPOKIT_CACHE points at one temporary folder per test session, set before anything
imports dpokit: tests never write into the user's ~/.cache/dpokit, and the demo SFT
model (and the reference log-prob cache) is still built once per session, not per test.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses some tests start
SESSION_CACHE = tempfile.mkdtemp(prefix="dpokit-test-cache-")
os.environ["DPOKIT_CACHE"] = SESSION_CACHE  # inherited too: CLI subprocesses use the same cache
atexit.register(shutil.rmtree, SESSION_CACHE, ignore_errors=True)

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped (and said so) where there is none. bench/gpu_check.sh runs them."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
