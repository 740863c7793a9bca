"""OpenMP's wait policy, chosen before torch loads OpenMP: the reason the CPU thread count can stay at torch's default.

With OMP_WAIT_POLICY=ACTIVE (libgomp's behaviour when unset) an idle worker thread spins on its core
waiting for the next parallel region. On a machine where another process holds a core, two spinning
threads wait for each other and every matmul pays for it: the demo took 44 s idle and 323 s with one
core busy, which is why dpokit used to drop small models to one thread. That rule cost sequences of
several hundred tokens half their speed (issue 22.0: 1.17 s against 0.63 s a step on the realistic
workload): matmul size depends on tokens x hidden, not on parameters. PASSIVE lets idle threads sleep,
so two threads keep their idle speed and lose nothing under load.

libgomp reads the variable once, when torch is first imported, so it is set when dpokit is imported
(dpokit/__init__.py imports this module first), unless the user set it or torch was imported first;
`PASSIVE_WAIT` says whether it is in force for this process.
"""

from __future__ import annotations

import os
import sys


def _prefer_passive_wait() -> bool:
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # a user's own choice wins
        return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"
    # torch (and so OpenMP) is already loaded: the environment now read back is the one it saw only if it was
    # set before, which we cannot tell apart from a later change; count it as in force only if it says PASSIVE
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


PASSIVE_WAIT = _prefer_passive_wait()
