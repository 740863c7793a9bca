"""Which tokens of the demo's retention text carry `retention/nll_delta`: sentiment words, EOS, or the rest.

    python bench/retention_split.py --policy runs/demo/final                 # the demo's retention set
    python bench/retention_split.py --policy runs/demo/final --corpus-mix    # the SFT corpus' own 40/60 mix
    python bench/retention_split.py --policy runs/demo/final --json          # the numbers, for bench/refresh_docs.py

`retention/nll_delta` is a mean over every completion token (docs/evaluation.md), so it cannot
tell forgetting (the language's other words get less likely) from the alignment itself (the
words DPO trains away from get less likely). This splits the sum: per kind of token, its mean
policy - reference NLL, and its share of the overall delta (the shares add up to the delta).
The examples are tokenised as the trainer's retention set is (`prepare_sft_file`), with the demo
config's `data.max_length`, and scored one at a time on the CPU.

`--corpus-mix` scores the retention set the demo shipped before: the same 200 reviews drawn with
the SFT corpus' share of positive ones (40%), i.e. mostly the text the demo's DPO run is meant to
make unlikely (docs/evaluation.md, "Choosing the retention set").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

ROW_KINDS = {1.0: "positive reviews", 0.0: "negative reviews"}
TOKEN_KINDS = ("negative words", "positive words", "EOS", "other words")


def corpus_mix_rows(n: int = 200) -> list[dict]:
    """The retention rows the demo shipped before: build_sft_text's seed, the SFT corpus' positive share."""
    from dpokit.demo import world
    from dpokit.demo.sft import SFTConfig

    corpus = world.sft_corpus(n, seed=2_000_003, positive_share=SFTConfig.positive_share)
    return [{"prompt": opening, "completion": continuation} for opening, continuation in corpus]


def _token_kind(tokenizer, token_id: int) -> str:
    from dpokit.demo import world

    if token_id == tokenizer.eos_token_id:
        return "EOS"
    word = tokenizer.convert_ids_to_tokens(token_id).lstrip("Ġ▁ ")
    if word in world.NEGATIVE_WORDS:
        return "negative words"
    return "positive words" if word in world.POSITIVE_WORDS else "other words"


def completion_nll(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """(len(completion_ids),) -log p(y_t | x, y_<t) of each completion token."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
    start = len(prompt_ids)
    targets = ids[0, start:]
    return -logps[start - 1 : -1].gather(-1, targets[:, None])[:, 0]


def split(policy_dir: str, retention_path: str) -> dict:
    """{"delta", "nll_ref", "tokens", "by_token": {kind: {...}}, "by_row": {kind: {...}}} over the retention set."""
    from dpokit.config import load_config, shipped_config
    from dpokit.data.sft import prepare_sft_file
    from dpokit.demo import world
    from dpokit.demo.assets import resolve_demo_assets
    from dpokit.online.loading import load_model

    cfg = resolve_demo_assets(load_config(str(shipped_config("demo")), [f"data.retention_path={retention_path}"]))
    reference, tokenizer = load_model(cfg.model.name_or_path, device="cpu")
    policy, _ = load_model(policy_dir, device="cpu")
    reference.eval(), policy.eval()
    rows = [json.loads(line) for line in Path(cfg.data.retention_path).read_text().splitlines() if line.strip()]
    examples, _ = prepare_sft_file(cfg.data.retention_path, "--retention", cfg, tokenizer)
    if len(examples) != len(rows):
        raise SystemExit(f"{len(rows) - len(examples)} retention rows were skipped; the split needs every row")
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # key -> [reference NLL, policy NLL, tokens]
    for row, example in zip(rows, examples):
        ref_nll = completion_nll(reference, example.prompt_ids, example.completion_ids)
        pol_nll = completion_nll(policy, example.prompt_ids, example.completion_ids)
        row_kind = ROW_KINDS.get(world.sentiment(row["completion"]), "ties")
        for token_id, r, p in zip(example.completion_ids, ref_nll.tolist(), pol_nll.tolist()):
            for key in ("all", "token:" + _token_kind(tokenizer, int(token_id)), "row:" + row_kind):
                entry = sums[key]
                entry[0], entry[1], entry[2] = entry[0] + r, entry[1] + p, entry[2] + 1

    total = sums["all"][2]

    def summary(entry: list[float]) -> dict:
        ref, pol, n = entry
        delta = pol - ref
        return {"tokens": n, "nll_ref": ref / n, "nll": pol / n, "delta": delta / n, "share_of_delta": delta / total}

    return {
        "retention_path": retention_path,
        "tokens": total,
        "nll_ref": sums["all"][0] / total,
        "delta": (sums["all"][1] - sums["all"][0]) / total,
        "by_token": {kind: summary(sums["token:" + kind]) for kind in TOKEN_KINDS if "token:" + kind in sums},
        "by_row": {
            kind: summary(sums["row:" + kind]) for kind in (*ROW_KINDS.values(), "ties") if "row:" + kind in sums
        },
    }


def format_split(result: dict) -> str:
    """A plain-text table: one line per kind of token, then per kind of row."""
    lines = [
        f"retention/nll_delta {result['delta']:.3f} nats per token over {result['tokens']} completion tokens "
        f"(reference NLL {result['nll_ref']:.3f})",
        f"{'tokens of':<16} {'count':>6} {'ref NLL':>8} {'policy NLL':>10} {'delta/token':>11} {'share of delta':>14}",
    ]
    for group in ("by_token", "by_row"):
        for kind, s in result[group].items():
            lines.append(
                f"{kind:<16} {s['tokens']:>6} {s['nll_ref']:>8.3f} {s['nll']:>10.3f} {s['delta']:>+11.3f} "
                f"{s['share_of_delta']:>+14.3f}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="the trained model folder (a run's final/)")
    parser.add_argument("--retention", default="demo:sentiment-sft-text", help="retention rows (default: the demo's)")
    parser.add_argument("--corpus-mix", action="store_true", help="score the SFT corpus' own 40/60 mix instead")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        retention = args.retention
        if args.corpus_mix:
            retention = str(Path(tmp) / "corpus-mix.jsonl")
            Path(retention).write_text("".join(json.dumps(row) + "\n" for row in corpus_mix_rows()))
        result = split(args.policy, retention)
    if args.corpus_mix:
        result["retention_path"] = "corpus-mix"
    print(json.dumps(result, indent=2) if args.json else format_split(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
