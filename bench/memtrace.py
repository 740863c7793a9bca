"""Memory accounting of bench/dpo_vs_trl.py: an RSS trace per phase of a child, and the fp32 floor of a shape."""

from __future__ import annotations

import os
import time
from pathlib import Path

from workloads import memory_floor, param_counts


class MemTrace:
    """RSS at named points of a child and the highest RSS since the previous point (a 10 ms sampler thread).

    `max` of a point is the peak of the phase that ends there, so the rows say which phase sets the
    process's peak and by how much each phase grows the resident set (weights, reference, AdamW state...).
    """

    def __init__(self):
        import threading

        self.rows, self._max, self._page = [], 0, os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while True:
            self._max = max(self._max, self.rss())
            time.sleep(0.01)

    def mark(self, at: str) -> None:
        now = self.rss()
        self.rows.append({"at": at, "rss_mib": now / 2**20, "max_mib": max(self._max, now) / 2**20})
        self._max = now

    def wrap_backward(self, accelerator, step: list) -> None:
        """Mark the end of the forward (the activations kept for backward are resident) before each backward."""
        backward = accelerator.backward

        def marked(loss, **kw):
            self.mark(f"step {step[0]}: forward")
            return backward(loss, **kw)

        accelerator.backward = marked


def format_floor(workload: str, model: Path) -> str:
    """Parameter counts and the fp32 bytes every full fine-tune pays (weights, gradients, AdamW state), from the config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    n, f = param_counts(config), memory_floor(config)
    gib = {k: f"{v / 2**30:.2f}" for k, v in f.items() if k != "params"}
    return (
        f"{workload}: {n['total'] / 1e6:.1f}M parameters (embedding {n['embed'] / 1e6:.1f}M, {n['layers']} layers x "
        f"{n['layer'] / 1e6:.2f}M); fp32 GiB: weights {gib['weights']}, grads {gib['grads']}, AdamW {gib['adamw']}, "
        f"reference copy {gib['reference']}, floor (weights+grads+AdamW) {gib['floor']}"
    )


def format_trace(r: dict) -> str:
    """The child's RSS at each point and the peak of the phase ending there (MiB), with the growth per phase."""
    rows = r.get("memtrace") or []
    lines = [f"memory trace, {r['workload']} / {r['variant']} (MiB): point | RSS | phase peak | RSS change"]
    prev = 0.0
    for row in rows:
        lines.append(f"  {row['at']:<62} {row['rss_mib']:8.0f} {row['max_mib']:8.0f} {row['rss_mib'] - prev:+8.0f}")
        prev = row["rss_mib"]
    return "\n".join(lines)
