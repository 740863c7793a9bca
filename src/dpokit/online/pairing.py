"""Preference pairs from scored samples: rejection sampling's last step.

For each prompt, the scored completions (from `dpokit score`) become pairs (chosen, rejected)
with score(chosen) > score(rejected):

  strategy best_worst   one pair per prompt: the highest-scored vs the lowest-scored completion
           all_pairs    every pair of completions whose scores differ by at least the margin,
                        largest margin first (at most max_pairs_per_prompt)

Rules, applied to every candidate pair (i, j):
  - ties are never pairs: equal scores carry no preference. A prompt whose completions all score
    the same gives no pair and is counted as `all_tied`; in all_pairs, each equal-score pair is
    counted in `tied_pairs`.
  - margin: score_i - score_j >= min_margin (pairs below it are counted, not kept).
  - identical completions (same text) are never paired (a noisy judge may score them differently).
  - max_length_ratio: a pair whose longer completion has more than this many times the tokens of
    the shorter one is dropped (counted): it would teach length rather than quality.
  - length_balance "closest" (best_worst only): among the candidates passing the rules above, take
    the one with the smallest length difference (then the largest margin); "none" takes the largest
    margin (then the smallest length difference). Remaining ties go to the lowest sample indices,
    so the result is exact and reproducible.
Completions with no score (NaN/None: e.g. an unreadable judge reply) are left out and counted;
drop_unfinished leaves out completions cut off at max_new_tokens (no EOS).

The settings are PairingConfig (config.py). Output rows are `dpokit train` preference rows: {"prompt", "chosen", "rejected"} (text, or a
conversational prompt with assistant-message completions), plus score_chosen, score_rejected,
margin, chosen_tokens and rejected_tokens for inspection.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

from dpokit.config import LENGTH_BALANCES, PAIRING_STRATEGIES, Config, PairingConfig
from dpokit.config.flags import Flag, Verb, require
from dpokit.online.sampling import samples_by_prompt


def _length(row: dict) -> int:
    if row.get("completion_tokens") is not None:
        return int(row["completion_tokens"])
    return len(str(row["completion"]).split())


def _score(row: dict) -> float:
    value = row.get("score")
    return math.nan if value is None else float(value)


def _completion(prompt, text: str):
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _pair_row(prompt, chosen: dict, rejected: dict) -> dict:
    sc, sr = _score(chosen), _score(rejected)
    return {
        "prompt": prompt,
        "chosen": _completion(prompt, chosen["completion"]),
        "rejected": _completion(prompt, rejected["completion"]),
        "score_chosen": sc,
        "score_rejected": sr,
        "margin": sc - sr,
        "chosen_tokens": _length(chosen),
        "rejected_tokens": _length(rejected),
    }


def _usable(rows: list[dict], cfg: PairingConfig, counts: Counter) -> list[dict]:
    """The completions that can be paired, in sample order: scored and (with drop_unfinished) finished."""
    kept = []
    for row in sorted(rows, key=lambda r: r.get("sample_index", 0)):
        if math.isnan(_score(row)):
            counts["completions_unscored"] += 1
        elif cfg.drop_unfinished and row.get("finished") is False:
            counts["completions_unfinished"] += 1
        else:
            kept.append(row)
    return kept


def _candidates(kept: list[dict], cfg: PairingConfig) -> tuple[list[tuple], Counter]:
    """Every pair passing the rules, as (margin, length difference, chosen index, rejected index), and the drops."""
    candidates = []
    reasons: Counter = Counter()
    for i, a in enumerate(kept):
        for j, b in enumerate(kept):
            if j <= i:
                continue
            sa, sb = _score(a), _score(b)
            if sa == sb:
                reasons["tied_pairs"] += 1
                continue
            hi, lo = (i, j) if sa > sb else (j, i)
            margin = abs(sa - sb)
            if kept[hi]["completion"] == kept[lo]["completion"]:
                reasons["identical_pairs"] += 1
                continue
            if margin < cfg.min_margin:
                reasons["pairs_below_margin"] += 1
                continue
            la, lb = _length(kept[hi]), _length(kept[lo])
            if cfg.max_length_ratio is not None and max(la, lb) > cfg.max_length_ratio * max(1, min(la, lb)):
                reasons["pairs_length_ratio"] += 1
                continue
            candidates.append((margin, abs(la - lb), hi, lo))
    return candidates, reasons


def _why_unpaired(reasons: Counter) -> str:
    """Why a prompt gave nothing: the margin when no pair reached it, else the length ratio."""
    if reasons["pairs_length_ratio"]:
        return "prompts_length_ratio"
    if reasons["pairs_below_margin"]:
        return "prompts_below_margin"
    return "prompts_identical"


def _chosen(kept: list[dict], candidates: list[tuple], cfg: PairingConfig, counts: Counter) -> list[dict]:
    """The pair rows the strategy takes from the candidates."""
    prompt = kept[0]["prompt"]
    if cfg.strategy == "best_worst":
        index = lambda c: (kept[c[2]].get("sample_index", c[2]), kept[c[3]].get("sample_index", c[3]))  # noqa: E731
        if cfg.length_balance == "closest":
            best = min(candidates, key=lambda c: (c[1], -c[0], index(c)))
        else:
            best = min(candidates, key=lambda c: (-c[0], c[1], index(c)))
        return [_pair_row(prompt, kept[best[2]], kept[best[3]])]
    ordered = sorted(candidates, key=lambda c: (-c[0], c[1], c[2], c[3]))
    if cfg.max_pairs_per_prompt is not None:
        counts["pairs_over_cap"] += max(0, len(ordered) - cfg.max_pairs_per_prompt)
        ordered = ordered[: cfg.max_pairs_per_prompt]
    return [_pair_row(prompt, kept[c[2]], kept[c[3]]) for c in ordered]


def pairs_for_prompt(rows: list[dict], cfg: PairingConfig, counts: Counter) -> list[dict]:
    """The pairs of one prompt's scored completions; every drop is counted in `counts`."""
    kept = _usable(rows, cfg, counts)
    if len(kept) < 2:
        counts["prompts_fewer_than_two"] += 1
        return []
    if len({_score(r) for r in kept}) == 1:
        counts["prompts_all_tied"] += 1
        counts["tied_pairs"] += len(kept) * (len(kept) - 1) // 2
        return []
    candidates, reasons = _candidates(kept, cfg)
    counts.update(reasons)
    if not candidates:
        counts[_why_unpaired(reasons)] += 1
        return []
    return _chosen(kept, candidates, cfg, counts)


def build_pairs(groups: list[list[dict]], cfg: PairingConfig = PairingConfig()) -> tuple[list[dict], dict]:
    """Pairs from scored completions grouped per prompt -> (pair rows, summary of counts)."""
    counts: Counter = Counter()
    pairs: list[dict] = []
    for rows in groups:
        counts["prompts"] += 1
        new = pairs_for_prompt(rows, cfg, counts)
        counts["prompts_paired"] += bool(new)
        pairs += new
    summary = {
        "config": dataclasses.asdict(cfg),
        "pairs": len(pairs),
        **{
            k: counts[k]
            for k in (
                "prompts",
                "prompts_paired",
                "prompts_all_tied",
                "prompts_below_margin",
                "prompts_length_ratio",
                "prompts_identical",
                "prompts_fewer_than_two",
                "tied_pairs",
                "pairs_below_margin",
                "pairs_length_ratio",
                "identical_pairs",
                "pairs_over_cap",
                "completions_unscored",
                "completions_unfinished",
            )
        },
    }
    if pairs:
        summary["mean_margin"] = sum(p["margin"] for p in pairs) / len(pairs)
        summary["mean_score_chosen"] = sum(p["score_chosen"] for p in pairs) / len(pairs)
        summary["mean_score_rejected"] = sum(p["score_rejected"] for p in pairs) / len(pairs)
        summary["mean_tokens_chosen"] = sum(p["chosen_tokens"] for p in pairs) / len(pairs)
        summary["mean_tokens_rejected"] = sum(p["rejected_tokens"] for p in pairs) / len(pairs)
    return pairs, summary


def format_summary(summary: dict) -> str:
    dropped = ", ".join(
        f"{summary[k]} {label}"
        for k, label in (
            ("prompts_all_tied", "all tied"),
            ("prompts_below_margin", "below the margin"),
            ("prompts_length_ratio", "over the length ratio"),
            ("prompts_identical", "identical completions"),
            ("prompts_fewer_than_two", "fewer than 2 scored completions"),
        )
        if summary.get(k)
    )
    line = f"[pair] {summary['pairs']} pairs from {summary['prompts_paired']}/{summary['prompts']} prompts"
    if dropped:
        line += f"; prompts without a pair: {dropped}"
    if summary.get("tied_pairs") and summary["config"]["strategy"] == "all_pairs":
        line += f"; {summary['tied_pairs']} tied pairs dropped"
    if summary.get("pairs"):
        line += (
            f"; mean score chosen {summary['mean_score_chosen']:.3f} vs rejected {summary['mean_score_rejected']:.3f}, "
            f"tokens {summary['mean_tokens_chosen']:.1f} vs {summary['mean_tokens_rejected']:.1f}"
        )
    return line


def pair_file(scored_path: str | Path, out_path: str | Path, cfg: PairingConfig = PairingConfig()) -> dict:
    """Scored samples JSONL -> pairs JSONL (+ `<out>.summary.json`); returns the summary."""
    pairs, summary = build_pairs(samples_by_prompt(scored_path, label="--in"), cfg)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(out)
    out.with_name(out.name + ".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


PAIR_HELP = """\
Build preference pairs from scored samples (from `dpokit score`): best vs worst per prompt, or
all pairs above a score margin. Ties, pairs below the margin and (optionally) pairs of very
different lengths are dropped and counted. The output trains directly with `dpokit train`.

  dpokit pair --in scored.jsonl --out pairs.jsonl
  dpokit pair --in scored.jsonl --out pairs.jsonl --strategy all_pairs --min-margin 1 --max-length-ratio 1.5
  dpokit pair pair.yaml pairing.min_margin=1 io.out=pairs.jsonl

Every flag is an alias of a config key (shown in its help: io.*, pairing.*), so the settings can come
from a YAML file and key=value overrides too, as for `dpokit train`.
"""


PAIR_FLAGS = (
    Flag(("--in",), "io.input", "scored samples JSONL, dpokit score's output (required)", dest="in_path"),
    Flag(("--out",), "io.out", "pairs JSONL, with <out>.summary.json beside it (required)", dest="out"),
    Flag(("--strategy",), "pairing.strategy", choices=PAIRING_STRATEGIES),
    Flag(("--min-margin",), "pairing.min_margin"),
    Flag(("--length-balance",), "pairing.length_balance", choices=LENGTH_BALANCES),
    Flag(("--max-length-ratio",), "pairing.max_length_ratio"),
    Flag(("--max-pairs-per-prompt",), "pairing.max_pairs_per_prompt"),
    Flag(("--drop-unfinished",), "pairing.drop_unfinished"),
)


def run_cli(cfg: Config) -> int:
    """`dpokit pair` on its config: io.input, io.out, pairing.*."""
    in_path = require(cfg, "io.input", "--in", "the scored samples file")
    out = require(cfg, "io.out", "--out", "the output file")
    print(format_summary(pair_file(in_path, out, cfg.pairing)))
    return 0


VERB = Verb("pair", "build preference pairs from scored samples", PAIR_HELP, run_cli, flags=PAIR_FLAGS)
