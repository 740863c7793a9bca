"""Test-session settings.

One intra-op thread per process: the tiny models gain nothing from more, and on a
shared 2-core machine (or with the 2-process DDP tests) two threads per process
oversubscribe the cores and run many times slower.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses some tests start

import torch  # noqa: E402

torch.set_num_threads(1)
