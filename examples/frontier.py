"""The DPO paper's controlled-sentiment experiment in miniature: the reward vs KL frontier.

Rafailov et al. 2023 (arXiv 2305.18290), section 6.1 and Figure 2 (left): a policy must write
positive continuations of review openings; each method is a cloud of points (reward, KL(pi || SFT)),
and the better method reaches more reward for the same KL. Here, on the built-in review world:

    reward      world.sentiment: 1 positive, 0 negative, 0.5 neither (exact; no classifier)
    SFT model   dpokit.demo.sft.build_sft_model() (a tiny Llama trained on the review language)
    data        on-policy, as in the paper: N samples of the SFT model per training opening,
                scored by the reward, best vs worst per prompt (ties dropped)
    DPO         one run per beta on those pairs (`dpokit train`)
    Preferred-FT  SFT on the chosen completions only (`dpokit sft` on the same pairs), several lengths
    best-of-N   N samples of the SFT model, the best by the reward; KL = log N - (N-1)/N (analytic)
    SFT         the SFT model itself (KL 0)

Every policy is sampled at temperature 1 on held-out openings (never seen in SFT or DPO), and its
KL to the SFT model is estimated from its own samples, in nats per completion.

    python examples/frontier.py                 # ~10 minutes on 2 CPU cores; writes docs/frontier.md
    python examples/frontier.py --quick         # a smoke run (a minute)

Outputs: <out-dir>/ (samples, pairs, every run, frontier.json), and with --docs DIR (default docs/):
DIR/frontier.md (table, verdict, the command) and DIR/frontier.png (matplotlib, the optional
`plot` extra) or DIR/frontier.svg when matplotlib is not installed. Reruns reuse finished stages
(samples, trained models, evaluations) from <out-dir>; delete it for a fresh run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Settings:
    train_prompts: int = 1024  # training openings sampled for the preference data
    samples_per_prompt: int = 8  # N for the on-policy pairs (best vs worst of N)
    eval_prompts: int = 256  # held-out openings
    eval_samples: int = 8  # samples per held-out opening for every policy
    max_new_tokens: int = 24  # reviews are at most 14 words + EOS
    sample_batch: int = 512  # sequences per generate call
    # DPO: (beta, optimizer steps). With Adam and deterministic preferences (the best sample always
    # wins), beta alone barely moves the end point of a fixed-length run: the sweep varies both.
    dpo_runs: list = field(
        default_factory=lambda: [
            (5.0, 15),
            (5.0, 30),
            (5.0, 60),
            (5.0, 120),
            (5.0, 240),
            (2.0, 60),
            (2.0, 120),
            (2.0, 240),
            (1.0, 45),
            (1.0, 60),
            (1.0, 120),
            (0.5, 60),
            (0.1, 60),
        ]
    )
    dpo_lr: float = 1e-4
    pft_steps: list = field(default_factory=lambda: [15, 30, 60, 120, 240, 480])
    pft_lr: float = 1e-4
    batch_size: int = 32
    best_of: list = field(default_factory=lambda: [1, 2, 4, 8, 16])
    seed: int = 0


QUICK = Settings(
    train_prompts=128,
    samples_per_prompt=4,
    eval_prompts=32,
    eval_samples=2,
    dpo_runs=[(1.0, 8), (0.1, 16)],
    pft_steps=[8],
    best_of=[1, 2, 4],
)


def log(msg: str) -> None:
    print(f"[frontier] {msg}", flush=True)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n-1)/n (Stiennon et al. 2020; Beirami et al. 2024): exact for a
    continuous reward, an upper bound when rewards tie."""
    return math.log(n) - (n - 1) / n


def reward_classes(rewards: list[float]) -> dict[float, float]:
    """The base policy's distribution over reward values (here 0, 0.5, 1), from its samples."""
    counts: dict[float, int] = {}
    for r in rewards:
        counts[r] = counts.get(r, 0) + 1
    return {r: c / len(rewards) for r, c in sorted(counts.items())}


def best_of_n_kl_exact(n: int, p: dict[float, float]) -> float:
    """The KL of best-of-n for a reward with few values: only the class probabilities change,
    q_c = F(c)^n - F(c-)^n (F the base CDF), within a class the base distribution is kept."""
    kl, below = 0.0, 0.0
    for value, pc in p.items():
        q = (below + pc) ** n - below**n
        below += pc
        if q > 0:
            kl += q * math.log(q / pc)
    return kl


def optimal_frontier(p: dict[float, float], kl_max: float, points: int = 200) -> list[tuple[float, float]]:
    """The best reward any policy can have at each KL: pi*(y) ∝ pi_SFT(y) exp(r(y)/beta) (the policy DPO's
    objective is maximised by), which only reweights the reward classes. (kl, reward) for beta from large to small."""
    curve = []
    for i in range(points):
        beta = 10 ** (2 - 4 * i / (points - 1))  # 100 .. 0.01
        logw = {v: math.log(pc) + v / beta for v, pc in p.items()}
        top = max(logw.values())
        z = sum(math.exp(w - top) for w in logw.values())
        q = {v: math.exp(w - top) / z for v, w in logw.items()}
        kl = sum(qc * math.log(qc / p[v]) for v, qc in q.items() if qc > 0)
        if kl > kl_max:
            break
        curve.append((kl, sum(v * qc for v, qc in q.items())))
    return curve


# --- stages ---------------------------------------------------------------------------------------


def make_pairs(s: Settings, sft_path: str, out: Path) -> tuple[Path, dict]:
    from dpokit.demo import world
    from dpokit.config import PairingConfig, SamplingConfig
    from dpokit.online.backends import HFBackend
    from dpokit.online.loading import load_model
    from dpokit.online.pairing import pair_file
    from dpokit.online.sampling import sample_to_file
    from dpokit.online.scoring import FunctionScorer, score_file

    prompts = random.Random(s.seed).sample(world.all_openings("train"), s.train_prompts)
    model, tokenizer = load_model(sft_path)
    cfg = SamplingConfig(
        num_samples=s.samples_per_prompt,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=s.max_new_tokens,
        seed=s.seed,
        batch_size=s.sample_batch,
        backend="hf",
    )
    sample_to_file(prompts, out / "samples.jsonl", cfg, HFBackend(model, tokenizer), model_id=sft_path)
    score_file(out / "samples.jsonl", out / "scored.jsonl", FunctionScorer(world.sentiment))
    summary = pair_file(out / "scored.jsonl", out / "pairs.jsonl", PairingConfig(strategy="best_worst"))
    return out / "pairs.jsonl", summary


def train_run(
    s: Settings, sft_path: str, pairs: Path, run_dir: Path, task: str, steps: int, lr: float, beta: float = 0.1
) -> Path:
    from dpokit.training.loop import train

    final = run_dir / "final"
    if (final / "config.json").exists():
        return final
    config = {
        "model": {"name_or_path": sft_path},
        "data": {"path": str(pairs), "max_length": 48, "max_prompt_length": 16},
        "loss": {"type": "sigmoid", "beta": beta},
        "optim": {"lr": lr, "scheduler": "cosine", "warmup_ratio": 0.1},
        "train": {
            "task": task,
            "batch_size": s.batch_size,
            "max_steps": steps,
            "logging_steps": 10,
            "progress_bar": False,
            "seed": s.seed,
        },
        "out_dir": str(run_dir),
    }
    if task == "preference":
        del config["train"]["task"]  # works with or without the train.task key
    train(config)
    return final


class Evaluator:
    """Samples each policy on the held-out openings; reward, KL to the SFT model, fluency, length."""

    def __init__(self, s: Settings, sft_path: str):
        from dpokit.demo import world
        from dpokit.online.loading import load_model
        from dpokit.online.scoring import FunctionScorer

        self.s = s
        self.reference, self.tokenizer = load_model(sft_path)
        self.prompts = world.eval_prompts(s.eval_prompts, seed=s.seed)
        self.scorer = FunctionScorer(world.sentiment)

    def __call__(self, model_dir: str, out_json: Path) -> dict:
        from dpokit.config import EvalConfig
        from dpokit.demo import world
        from dpokit.online.evaluation import evaluate
        from dpokit.online.loading import load_model
        from dpokit.online.sampling import read_samples

        if out_json.exists():
            return json.loads(out_json.read_text())
        policy = self.reference if model_dir is None else load_model(model_dir)[0]
        samples_path = out_json.with_name(out_json.stem + "_samples.jsonl")
        cfg = EvalConfig(num_samples=self.s.eval_samples, max_new_tokens=self.s.max_new_tokens, seed=self.s.seed + 7)
        m = evaluate(
            policy,
            self.tokenizer,
            self.prompts,
            cfg,
            reference=self.reference,
            baseline=None,
            scorer=self.scorer,
            batch_size=self.s.sample_batch,
            samples_out=samples_path,
        )
        rows = read_samples(samples_path)
        m["well_formed_share"] = sum(bool(r["finished"]) and world.is_well_formed(r["completion"]) for r in rows) / max(
            1, len(rows)
        )
        out_json.write_text(json.dumps(m, indent=2) + "\n")
        return m


def best_of_n(s: Settings, ev: Evaluator, out: Path) -> list[dict]:
    """Best-of-N of the SFT model for each N: max N disjoint groups of the same max(N) samples per prompt."""
    from dpokit.demo import world
    from dpokit.online.evaluation import draw

    path = out / "best_of_n.json"
    if path.exists():
        return json.loads(path.read_text())
    n_max = max(s.best_of)
    samples = draw(
        ev.reference, ev.tokenizer, ev.prompts, n_max, 1.0, 1.0, s.max_new_tokens, s.seed + 11, s.sample_batch
    )
    rewards = [world.sentiment(x.completion) for x in samples]
    fluent = [x.finished and world.is_well_formed(x.completion) for x in samples]
    classes = reward_classes(rewards)
    points = []
    for n in s.best_of:
        best, best_fluent = [], []
        for p in range(len(ev.prompts)):
            block = list(range(p * n_max, (p + 1) * n_max))
            for g in range(n_max // n):
                group = block[g * n : (g + 1) * n]
                i = max(group, key=lambda j: rewards[j])  # the first of the best on ties
                best.append(rewards[i])
                best_fluent.append(fluent[i])
        mean = sum(best) / len(best)
        sem = math.sqrt(sum((b - mean) ** 2 for b in best) / max(1, len(best) - 1) / len(best))
        points.append(
            {
                "method": "best-of-N",
                "label": f"N={n}",
                "reward": mean,
                "reward_sem": sem,
                "kl": best_of_n_kl(n),
                "kl_sem": 0.0,
                "kl_tokenwise": None,
                "kl_exact": best_of_n_kl_exact(n, classes),
                "well_formed_share": sum(best_fluent) / len(best_fluent),
                "mean_length": None,
                "kl_note": "analytic",
                "reward_classes": classes,
            }
        )
    path.write_text(json.dumps(points, indent=2) + "\n")
    return points


def _point(method: str, label: str, m: dict, **extra) -> dict:
    return {
        "method": method,
        "label": label,
        "reward": m["mean_score"],
        "reward_sem": m["mean_score_sem"],
        "kl": m["kl_to_reference"],
        "kl_sem": m["kl_to_reference_sem"],
        "kl_tokenwise": m["kl_tokenwise"],
        "well_formed_share": m["well_formed_share"],
        "mean_length": m["mean_length"],
        **extra,
    }


# --- the verdict ----------------------------------------------------------------------------------


def upper_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper concave hull of (kl, reward) points: what mixtures of those policies reach at each KL.

    A mixture of two policies (one or the other, chosen per prompt) has the average reward and at most
    the average KL (KL is convex), so every point on a chord between two points is reachable.
    """
    pts = sorted(set(points))
    hull: list[tuple[float, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] lies on or below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    # keep only the rising part: more KL for less reward is never on the frontier
    best, out = -math.inf, []
    for x, y in hull:
        if y > best:
            out.append((x, y))
            best = y
    return out


def frontier_at(hull: list[tuple[float, float]], kl: float) -> float:
    """Best reward reachable with KL <= kl on the hull (flat after its last point)."""
    if kl < hull[0][0]:
        return -math.inf
    for (x1, y1), (x2, y2) in zip(hull, hull[1:]):
        if x1 <= kl <= x2:
            return y1 + (y2 - y1) * (kl - x1) / (x2 - x1) if x2 > x1 else max(y1, y2)
    return hull[-1][1]


def verdict(points: list[dict]) -> dict:
    sft = next(p for p in points if p["method"] == "SFT")
    dpo = [p for p in points if p["method"] == "DPO"]
    pft = [p for p in points if p["method"] == "Preferred-FT"]
    # The SFT model is every method's beta -> infinity end; a measured KL below 0 is noise: clip at 0.
    hull = upper_hull([(0.0, sft["reward"])] + [(max(0.0, p["kl"]), p["reward"]) for p in dpo])
    checks = []
    for p in pft:
        at = frontier_at(hull, max(0.0, p["kl"]))
        noise = 2 * math.hypot(p["reward_sem"], max((q["reward_sem"] for q in dpo), default=0.0))
        checks.append(
            {
                "label": p["label"],
                "kl": p["kl"],
                "reward": p["reward"],
                "dpo_frontier": at,
                "margin": at - p["reward"],
                "within_noise": at - p["reward"] >= -noise,
                "noise_2se": noise,
            }
        )
    within_5 = [p for p in dpo if p["kl"] <= 5.0]
    best5 = max(within_5, key=lambda p: p["reward"]) if within_5 else None
    return {
        "dpo_at_or_above_pft": all(c["margin"] >= 0 for c in checks),
        "dpo_at_or_above_pft_within_noise": all(c["within_noise"] for c in checks),
        "pft_checks": checks,
        "best_dpo_reward_at_kl_le_5": None if best5 is None else best5["reward"],
        "best_dpo_at_kl_le_5": None if best5 is None else best5["label"],
        "best_dpo_kl_at_kl_le_5": None if best5 is None else best5["kl"],
        "reaches_0_9_at_kl_le_5": best5 is not None and best5["reward"] >= 0.9,
        "dpo_hull": hull,
    }


# --- plot and table -------------------------------------------------------------------------------

STYLE = {
    "DPO": ("#d62728", "o"),
    "Preferred-FT": ("#1f77b4", "s"),
    "best-of-N": ("#2ca02c", "^"),
    "SFT": ("#000000", "*"),
}
LEGEND = {
    "DPO": "DPO (beta/steps; line: its frontier)",
    "Preferred-FT": "Preferred-FT (steps)",
    "best-of-N": "best-of-N (KL: formula)",
    "SFT": "SFT",
}


def _series(points: list[dict], method: str) -> tuple[list[dict], list[tuple[float, float]]]:
    """A method's points, and the line drawn through them: its frontier (upper hull) for DPO, else by KL."""
    pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["kl"])
    if method == "DPO":
        sft = next(p for p in points if p["method"] == "SFT")
        return pts, upper_hull([(0.0, sft["reward"])] + [(max(0.0, p["kl"]), p["reward"]) for p in pts])
    return pts, [(p["kl"], p["reward"]) for p in pts]


def plot_png(points: list[dict], optimum: list[tuple[float, float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    if optimum:
        ax.plot(
            [k for k, _ in optimum],
            [r for _, r in optimum],
            color="grey",
            linestyle="--",
            linewidth=1,
            label="KL-optimal policy (exact)",
        )
    for method, (color, marker) in STYLE.items():
        pts, line = _series(points, method)
        if not pts:
            continue
        if len(line) > 1:
            ax.plot([k for k, _ in line], [r for _, r in line], color=color, linewidth=1.2, alpha=0.8)
        ax.errorbar(
            [p["kl"] for p in pts],
            [p["reward"] for p in pts],
            yerr=[p["reward_sem"] for p in pts],
            xerr=[p["kl_sem"] or 0 for p in pts],
            color=color,
            marker=marker,
            linestyle="none",
            markersize=10 if method == "SFT" else 6,
            capsize=2,
            label=LEGEND[method],
        )
        if method == "best-of-N":
            ax.plot(
                [p["kl_exact"] for p in pts],
                [p["reward"] for p in pts],
                color=color,
                marker=marker,
                markerfacecolor="none",
                linestyle=":",
                label="best-of-N (KL: exact, tied rewards)",
            )
        for i, p in enumerate(pts):
            if method != "SFT":
                ax.annotate(
                    p.get("short", p["label"]),
                    (p["kl"], p["reward"]),
                    textcoords="offset points",
                    xytext=(-4, 6) if method == "DPO" else (6, -10),
                    ha="right" if method == "DPO" else "left",
                    fontsize=7,
                    color=color,
                )
    x_max = max(p["kl"] for p in points) * 1.12
    ax.set_xlim(-0.03 * x_max, x_max)
    if x_max > 5:
        ax.axvline(5.0, color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("KL(policy || SFT), nats per completion (estimated from the policy's own samples)")
    ax.set_ylabel("reward: mean sentiment of samples on held-out openings")
    ax.set_title("Reward vs KL, review world: the DPO paper's Fig. 2 (left) in miniature")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_svg(points: list[dict], optimum: list[tuple[float, float]], path: Path) -> None:
    """The same plot without matplotlib: hand-written SVG (renders in browsers and on GitHub)."""
    w, h, left, right, top, bottom = 720, 480, 70, 20, 40, 60
    x_max = max(1.0, max(p["kl"] for p in points) * 1.1)
    y_min = min(0.0, min(p["reward"] for p in points))
    sx = lambda x: left + (w - left - right) * (max(0.0, x) / x_max)  # noqa: E731
    sy = lambda y: top + (h - top - bottom) * (1 - (y - y_min) / (1.0 - y_min))  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="13">Reward vs KL frontier, review world</text>',
    ]
    for i in range(6):
        y = y_min + (1 - y_min) * i / 5
        parts.append(
            f'<line x1="{left}" x2="{w - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.1f}</text>'
        )
    for i in range(6):
        x = x_max * i / 5
        parts.append(
            f'<line y1="{top}" y2="{h - bottom}" x1="{sx(x):.1f}" x2="{sx(x):.1f}" stroke="#ddd"/>'
            f'<text x="{sx(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x:.1f}</text>'
        )
    parts.append(f'<text x="{w / 2}" y="{h - 18}" text-anchor="middle">KL(policy || SFT), nats</text>')
    parts.append(
        f'<text x="16" y="{h / 2}" text-anchor="middle" transform="rotate(-90 16 {h / 2})">reward (mean sentiment)</text>'
    )
    if optimum:
        parts.append(
            '<polyline fill="none" stroke="grey" stroke-dasharray="4 3" points="'
            + " ".join(f"{sx(k):.1f},{sy(r):.1f}" for k, r in optimum if k <= x_max)
            + '"/>'
        )
    for k, (method, (color, _)) in enumerate(STYLE.items()):
        pts, line = _series(points, method)
        if len(line) > 1:
            parts.append(
                f'<polyline fill="none" stroke="{color}" points="'
                + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in line)
                + '"/>'
            )
        for p in pts:
            parts.append(f'<circle cx="{sx(p["kl"]):.1f}" cy="{sy(p["reward"]):.1f}" r="4" fill="{color}"/>')
            if method != "SFT":
                parts.append(
                    f'<text x="{sx(p["kl"]) + 5:.1f}" y="{sy(p["reward"]) + 13:.1f}" fill="{color}" font-size="9">{p.get("short", p["label"])}</text>'
                )
        parts.append(
            f'<rect x="{w - 150}" y="{h - bottom - 80 + 16 * k}" width="10" height="10" fill="{color}"/>'
            f'<text x="{w - 135}" y="{h - bottom - 71 + 16 * k}">{method}</text>'
        )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def table(points: list[dict]) -> str:
    def num(v, fmt):
        return "" if v is None else fmt.format(v)

    lines = [
        "| method | setting | reward ± s.e. | KL (nats) ± s.e. | KL tokenwise | well-formed | mean length |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if p.get("kl_note") == "analytic":
            kl = f"{p['kl']:.2f} (formula; exact {p['kl_exact']:.2f})"
        else:
            kl = f"{p['kl']:.2f} ± {p['kl_sem']:.2f}"
        lines.append(
            f"| {p['method']} | {p['label']} | {p['reward']:.3f} ± {p['reward_sem']:.3f} | {kl} | "
            f"{num(p['kl_tokenwise'], '{:.2f}')} | {p['well_formed_share']:.1%} | {num(p['mean_length'], '{:.1f}')} |"
        )
    return "\n".join(lines)


def _fmt(value, fmt="{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def write_docs(
    docs: Path,
    s: Settings,
    points: list[dict],
    v: dict,
    pairs: dict,
    image: str,
    command: str,
    wall: float,
    cpu: float,
    classes: dict,
) -> None:
    checks = "\n".join(
        f"| {c['label']} | {c['kl']:.2f} | {c['reward']:.3f} | {c['dpo_frontier']:.3f} | {c['margin']:+.3f} | ±{c['noise_2se']:.3f} | "
        f"{'yes' if c['margin'] >= 0 else ('within noise' if c['within_noise'] else 'no')} |"
        for c in v["pft_checks"]
    )
    n_at = sum(c["margin"] >= 0 for c in v["pft_checks"])
    n_all = len(v["pft_checks"])
    if v["dpo_at_or_above_pft"]:
        ok_pft = "yes.**"
    elif v["dpo_at_or_above_pft_within_noise"]:
        ok_pft = (
            f"not strictly.** DPO is at or above Preferred-FT at {n_at} of its {n_all} points and below it at "
            f"{n_all - n_at}, by less than two standard errors each: within noise, the two are level."
        )
    else:
        ok_pft = f"no.** DPO is below Preferred-FT beyond noise at some KL (at or above at {n_at} of {n_all} points)."
    ok_09 = "yes" if v["reaches_0_9_at_kl_le_5"] else "no"
    dpo_runs = ", ".join(f"(beta {b}, {n} steps)" for b, n in s.dpo_runs)
    p0, ph, p1 = classes.get(0.0, 0.0), classes.get(0.5, 0.0), classes.get(1.0, 0.0)
    text = f"""# The reward vs KL frontier (the DPO paper's sentiment experiment, in miniature)

The DPO paper (Rafailov et al. 2023, section 6.1, Figure 2 left) compares alignment methods by the
reward they reach for a given KL divergence from the SFT model. `examples/frontier.py` redoes that
experiment on dpokit's built-in review world, offline, on a CPU:

- **task**: continue a review opening; **reward** = `world.sentiment` of the continuation (1
  positive, 0 negative, 0.5 neither): exact, so no reward model stands between us and the truth;
- **SFT model**: `dpokit.demo.sft.build_sft_model()`, a tiny Llama trained on the review language;
  its samples are positive {p1:.0%}, negative {p0:.0%}, neither {ph:.0%} of the time;
- **preference data, on-policy as in the paper**: {s.samples_per_prompt} samples of the SFT model
  for each of {s.train_prompts} training openings, scored by the reward, best vs worst per opening
  (`dpokit sample` -> `dpokit score` -> `dpokit pair`): {pairs["pairs"]} pairs
  ({pairs["prompts_all_tied"]} openings dropped because all their samples tied);
- **DPO**: `dpokit train` (sigmoid loss, lr {s.dpo_lr}, batches of {s.batch_size} pairs) on those
  pairs: {dpo_runs};
- **Preferred-FT**: `dpokit sft` on the chosen completions of the same pairs (the paper's
  Preferred-FT), lr {s.pft_lr}, {", ".join(str(n) for n in s.pft_steps)} steps;
- **best-of-N**: N samples of the SFT model, the best by the reward, N = {", ".join(str(n) for n in s.best_of)};
  plotted at the usual formula KL = log N - (N-1)/N, which is exact for a continuous reward; for
  this reward, whose values tie, the exact KL is smaller (hollow markers, and the table);
- **SFT**: the starting model (KL 0);
- **KL-optimal policy** (dashed): the best reward any policy can have at a given KL,
  pi*(y) ∝ pi_SFT(y) exp(r(y)/beta), the policy the RLHF objective (and so DPO's) is maximised by.
  It only reweights the reward classes, so it is computed exactly from the SFT model's reward
  distribution.

Every policy is sampled at temperature 1 on {s.eval_prompts} held-out openings (never seen in SFT
or DPO training), {s.eval_samples} samples each. Reward is their mean sentiment; KL(policy || SFT) is
estimated from the same samples, in nats per completion (`dpokit.online.evaluation`: the mean of
log pi(y|x) - log pi_SFT(y|x); "KL tokenwise" is the lower-variance estimate that sums the exact
next-token KL along each sample). ± is one standard error over samples.

## Command

```
{command}
```

Wall time of the run that made this page: {wall / 60:.1f} minutes ({cpu / 60:.1f} CPU-minutes; a shared
2-core machine, one torch thread).

## Plot

![reward vs KL]({image})

## Table

{table(points)}

"Well-formed" is the share of samples that are sentences of the review grammar and end with EOS:
a reward bought with word salad would show there.

## Verdict

- **DPO at or above Preferred-FT at every KL: {ok_pft} For each Preferred-FT point, the DPO
  frontier at its KL (the upper concave hull of the SFT point and the DPO points; a mixture of two
  policies reaches every point of the chord between them, KL being convex) against its reward.
  "Noise" is two standard errors of the difference.

| Preferred-FT | KL | reward | DPO frontier at that KL | DPO - PFT | noise | DPO at or above |
|---|---:|---:|---:|---:|---:|---|
{checks}

- **DPO reaches reward >= 0.9 at KL <= 5 nats: {ok_09}.** (Best DPO point with KL <= 5:
  {v["best_dpo_at_kl_le_5"]}, reward {_fmt(v["best_dpo_reward_at_kl_le_5"])}, KL {_fmt(v["best_dpo_kl_at_kl_le_5"], "{:.2f}")}.)

{NOTES}"""
    (docs / "frontier.md").write_text(text)


NOTES = """## DPO and Preferred-FT here, and how this differs from the paper

- **Both aim at the same, optimal target.** The reward takes three values and the SFT model already
  writes a positive review {p1} of the time. For such a reward, best-of-N only reweights the reward
  classes and keeps the SFT model's text within each class, which is exactly the shape of the
  KL-optimal policy: best-of-N at its exact KL sits on the dashed optimal curve, as the plot shows.
  Preferred-FT imitates the chosen completions, the best of {n} SFT samples, so it distils a policy
  on that curve and moves along it as it trains. DPO's objective is maximised by the optimal policy
  too. With nothing to separate their targets, both methods trace nearly the same curve, and the
  verdict table shows by how little they differ. In the paper the reward is a continuous classifier
  score on open-ended text, where the chosen texts are likely far from the optimum, and DPO's use of
  the rejected side pays off.
- **DPO spends some of its KL on fluency.** Pushing the rejected completions down also moves
  probability to ungrammatical text in a model this small: DPO's well-formed share falls as its KL
  grows (see the table), KL that buys no reward, while Preferred-FT raises the likelihood of fluent
  SFT samples and stays as fluent as the SFT model until its longest runs. That is what keeps DPO
  slightly under the optimal curve in the middle range, where Preferred-FT is on it.
- **beta alone does not trace DPO's curve.** The best completion always wins its pair, so the DPO
  loss keeps pushing the margin up whatever beta is (the deterministic-preference case of Azar et
  al. 2023, the IPO paper), and Adam takes beta's scale out of the update size: with beta <= 1 a
  run of a given length ends at about the same reward. Only a large beta (2 to 5 here), whose
  margins saturate within the run, holds the policy back (beta 5 barely moves past KL 0.5 however
  long it trains). The sweep therefore varies training length as well as beta; the paper's points
  are, likewise, a hyperparameter sweep.
{furthest}
- **No PPO or unlikelihood points.** dpokit has no PPO; the paper's PPO curve is not reproduced.
- **Scale.** A 2-layer model with a ~100-word vocabulary and an exact reward: absolute numbers are
  not comparable with GPT-2 on IMDb.
- **KL estimates** are Monte-Carlo from {eval} samples per policy; near KL 0 an estimate can come
  out slightly negative (noise); the verdict treats such a point as KL 0.
"""


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Reward vs KL frontier on the review world (DPO paper Fig. 2).")
    parser.add_argument("--out-dir", default="runs/frontier")
    parser.add_argument("--docs", default="docs", help="where frontier.md and the plot go ('' = not written)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument(
        "--docs-only", action="store_true", help="rewrite the docs from <out-dir>/frontier.json, no run"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the models are tiny, and on a busy machine a second thread mostly waits)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.time(), time.process_time()
    s = QUICK if args.quick else Settings()
    if args.docs_only:
        saved = json.loads((Path(args.out_dir) / "frontier.json").read_text())
        s = Settings(**{**saved["settings"], "dpo_runs": [tuple(r) for r in saved["settings"]["dpo_runs"]]})
        classes = {float(k): v for k, v in saved["reward_classes"].items()}
        make_docs(
            args,
            s,
            saved["points"],
            saved["verdict"],
            saved["pairs"],
            [tuple(x) for x in saved["optimal_frontier"]],
            classes,
            saved["wall_seconds"],
            saved["cpu_seconds"],
        )
        return 0
    torch.manual_seed(s.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(dataclasses.asdict(s), indent=2) + "\n")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from dpokit.demo.sft import build_sft_model

    log("building (or reusing) the SFT model ...")
    sft_path = str(build_sft_model(log=lambda m: log(m)))
    log(f"SFT model: {sft_path}")

    t = time.time()
    pairs, pairs_summary = make_pairs(s, sft_path, out)
    log(f"on-policy pairs: {pairs_summary['pairs']} from {pairs_summary['prompts']} prompts ({time.time() - t:.0f}s)")

    ev = Evaluator(s, sft_path)
    points = []
    t = time.time()
    sft_metrics = ev(None, out / "eval_sft.json")
    points.append(_point("SFT", "SFT", sft_metrics))
    log(f"SFT: reward {sft_metrics['mean_score']:.3f} ({time.time() - t:.0f}s)")

    t = time.time()
    bon = best_of_n(s, ev, out)
    points += bon
    classes = {float(k): v for k, v in bon[0]["reward_classes"].items()}
    log(f"best-of-N done ({time.time() - t:.0f}s)")

    for beta, steps in s.dpo_runs:
        t = time.time()
        name = f"dpo_beta{beta}_steps{steps}"
        final = train_run(s, sft_path, pairs, out / name, "preference", steps, s.dpo_lr, beta)
        m = ev(str(final), out / f"eval_{name}.json")
        points.append(_point("DPO", f"β={beta:g}, {steps} st", m, beta=beta, steps=steps, short=f"{beta:g}/{steps}"))
        log(
            f"DPO beta={beta} {steps} steps: reward {m['mean_score']:.3f}, KL {m['kl_to_reference']:.2f}, "
            f"well-formed {m['well_formed_share']:.1%} ({time.time() - t:.0f}s)"
        )
    for steps in s.pft_steps:
        t = time.time()
        final = train_run(s, sft_path, pairs, out / f"pft_steps{steps}", "sft", steps, s.pft_lr)
        m = ev(str(final), out / f"eval_pft_steps{steps}.json")
        points.append(_point("Preferred-FT", f"{steps} st", m, steps=steps, short=str(steps)))
        log(
            f"Preferred-FT {steps} steps: reward {m['mean_score']:.3f}, KL {m['kl_to_reference']:.2f}, "
            f"well-formed {m['well_formed_share']:.1%} ({time.time() - t:.0f}s)"
        )

    v = verdict(points)
    optimum = optimal_frontier(classes, max(p["kl"] for p in points) * 1.12)
    wall, cpu = time.time() - started, time.process_time() - cpu_started
    (out / "frontier.json").write_text(
        json.dumps(
            {
                "settings": dataclasses.asdict(s),
                "points": points,
                "verdict": v,
                "pairs": pairs_summary,
                "reward_classes": classes,
                "optimal_frontier": optimum,
                "wall_seconds": round(wall, 1),
                "cpu_seconds": round(cpu, 1),
            },
            indent=2,
        )
        + "\n"
    )
    print(table(points))
    log(
        f"DPO >= Preferred-FT at every KL: {v['dpo_at_or_above_pft']} (within noise: {v['dpo_at_or_above_pft_within_noise']}); "
        f"reward >= 0.9 at KL <= 5: {v['reaches_0_9_at_kl_le_5']}; wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min"
    )
    if args.docs:
        make_docs(args, s, points, v, pairs_summary, optimum, classes, wall, cpu)
    return 0


def make_docs(
    args, s: Settings, points: list[dict], v: dict, pairs_summary: dict, optimum, classes: dict, wall: float, cpu: float
) -> None:
    global NOTES
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    if plot_png(points, optimum, docs / "frontier.png"):
        image = "frontier.png"
    else:
        plot_svg(points, optimum, docs / "frontier.svg")
        image = "frontier.svg"
    command = (
        "python examples/frontier.py"
        + (" --quick" if args.quick else "")
        + (f" --out-dir {args.out_dir}" if args.out_dir != "runs/frontier" else "")
    )
    best = {m: max((p for p in points if p["method"] == m), key=lambda p: p["reward"]) for m in ("DPO", "Preferred-FT")}
    d, f = best["DPO"], best["Preferred-FT"]
    bon = next(
        (p["reward"] for p in points if p["method"] == "best-of-N" and p["label"] == f"N={s.samples_per_prompt}"), None
    )
    bound = "" if bon is None else f" (reward {bon:.3f})"
    if d["reward"] >= f["reward"]:
        furthest = (
            f"- **DPO goes further.** Its best point reaches reward {d['reward']:.3f} (KL {d['kl']:.2f}); Preferred-FT's "
            f"best is {f['reward']:.3f} (KL {f['kl']:.2f}), and imitating the chosen texts it can at most reach the "
            f"best-of-{s.samples_per_prompt} policy they come from{bound}."
        )
    else:
        furthest = (
            f"- **Preferred-FT went further here.** Its longest run reaches reward {f['reward']:.3f} at KL {f['kl']:.2f}, "
            f"DPO's best {d['reward']:.3f} at KL {d['kl']:.2f}: its target, the best of {s.samples_per_prompt} SFT samples, "
            f"is itself almost all positive and fluent, and it pays no fluency tax on the way."
        )
    NOTES = (
        NOTES.replace("{eval}", str(s.eval_prompts * s.eval_samples))
        .replace("{p1}", f"{classes.get(1.0, 0.0):.0%}")
        .replace("{n}", str(s.samples_per_prompt))
        .replace("{furthest}", furthest)
    )
    write_docs(docs, s, points, v, pairs_summary, image, command, wall, cpu, classes)
    log(f"wrote {docs / 'frontier.md'} and {docs / image}")


if __name__ == "__main__":
    sys.exit(main())
