"""`dpokit eval`: a policy on held-out prompts, against a baseline, as the DPO paper measures it.

From the policy's own samples (temperature 1, top_p 1 by default, so they are draws from the policy):
  mean_score            mean reward of the samples (any Scorer: rule, reward model, pointwise judge)
  win_rate              share of (prompt, sample) slots where the policy's sample beats the baseline's
                        (by the scorer, ties 1/2; or by a pairwise judge, position bias cancelled);
                        win_rate_unjudged counts the slots left out (no score, or no readable verdict)
  kl_to_reference       KL(policy || reference) in nats per completion, Monte-Carlo over samples y ~ pi,
                        EOS included, by Schulman's k3 estimator (2020, "Approximating KL divergence"):
                        mean of (r - 1) - log r with r = ref(y|x) / pi(y|x). Unbiased like the plain mean
                        of log pi/ref (E_pi[r] = 1), but never negative per sample, so a policy close to its
                        reference shows a small positive KL, not -0.01.
  kl_tokenwise          the same KL with lower variance: sum over the sampled positions of the exact
                        next-token KL(pi(.|x,y<t) || ref(.|x,y<t)) (same expectation, Rao-Blackwellised)
  mean_length           completion tokens (EOS excluded), with the baseline's and the change
  finished_share        samples that ended with EOS within max_new_tokens
  preference_accuracy   on held-out pairs: share whose chosen side gets the strictly higher implicit reward
                        log pi/ref; a tie counts as not chosen, 0, as in training's rewards/accuracies (one
                        definition, losses.preference_correct), so a policy equal to its reference scores 0;
                        max_pairs keeps the first N pairs (pairs_used of pairs_total are reported)
Each mean comes with its standard error (`*_sem`) where it is a sample mean.
KL from samples at another temperature or top_p is not an unbiased estimate; it is still reported
(with `kl_estimator_biased: true`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dpokit.config import Config, EvalConfig, SamplingConfig
from dpokit.config.flags import Flag, Verb, require, resolved_args
from dpokit.generation import Sample, sample
from dpokit.online.judges import PairwiseJudge, judge_flags, judge_options
from dpokit.online.loading import TRUST_FLAGS, ModelTrust, load_model
from dpokit.online.log_ratios import (  # noqa: F401  (kept importable from here)
    KL_ESTIMATOR, examples_of, k3_kl, kl_to_reference, log_ratios, preference_accuracy)
from dpokit.online.prompts import Prompt, describe_counts, load_prompts, render_prompt
from dpokit.online.scoring import build_scorer
from dpokit.online.suites.local_judge import LocalPairwiseJudge
from dpokit.online.suites.multiturn import MTBenchJudge
from dpokit.online.suites.runner import SUITE_FLAGS, check_suite_args, run_suites, suite_rows
from dpokit.online.suites.view import markdown, write_view
from dpokit.training.run_dir import holding


# --- the evaluation ------------------------------------------------------------------------------


def _mean_sem(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def completion_length(s: Sample) -> int:
    """Generated tokens without the EOS."""
    return len(s.completion_ids) - (1 if s.finished else 0)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A bar on stderr with the count, the rate and the time left, for a phase that would otherwise be silent."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def draw(model, tokenizer, prompts: Sequence[Prompt], num_samples: int = 4, temperature: float = 1.0, top_p: float = 1.0,
         max_new_tokens: int = 128, seed: int = 0, batch_size: int = 64, progress: str | None = None) -> list[Sample]:
    """num_samples samples per prompt (prompt-major); conversational prompts through the chat template.

    progress: the description of a progress bar over the samples (None: no bar).
    """
    texts = [render_prompt(p, tokenizer) for p in prompts]
    with progress_bar(len(texts) * num_samples, progress or "", "sample", progress is not None) as bar:
        return sample(model, tokenizer, texts, num_samples=num_samples, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, on_batch=bar.update)


def evaluate(policy, tokenizer, prompts: Sequence[Prompt], cfg: EvalConfig | None = None, *, reference=None,
             baseline: Any = "reference", scorer=None, judge=None, pairs=None, batch_size: int = 64,
             samples_out: str | Path | None = None, progress: bool = False, judgments: list | None = None) -> dict:
    """Sample the policy on `prompts` and measure it (see the module docstring for each metric).

    cfg: the evaluation's settings (EvalConfig; default EvalConfig()): num_samples, temperature, top_p,
      max_new_tokens (None: SamplingConfig's), seed, max_pairs (only the first N held-out pairs; pairs_used
      and pairs_total say how many of how many); the suite fields are run_suites'.
    reference: the model KL and the implicit reward are measured against (usually the SFT model).
    baseline: what the win rate and length change compare to: "reference" (default), another model,
      a list of its `Sample`s (num_samples per prompt, prompt-major, e.g. from an earlier call), or None.
    scorer: a `Scorer` for mean_score and (without a judge) the win rate; judge: a PairwiseJudge.
    pairs: held-out preference rows or file for preference_accuracy (needs the reference); None: cfg.pairs.
    batch_size: sequences per generation batch. samples_out: write the policy's samples (with scores) there as JSONL.
    progress: progress bars on stderr (count, rate, time left) for sampling and the log-prob passes.
    judgments: a list to which each win-rate judgment is appended as {"prompt_index", "win", "length_diff"}
      (policy minus baseline tokens; "win" None where a score was missing, NaN where the judge's verdict was unreadable): the length-controlled win rate's input.
    """
    cfg = cfg or EvalConfig()
    if cfg.max_new_tokens is None:
        cfg = dataclasses.replace(cfg, max_new_tokens=SamplingConfig().max_new_tokens)
    prompts = list(prompts)
    bar = (lambda what: f"[eval] {what}") if progress else (lambda what: None)
    samples = draw(policy, tokenizer, prompts, cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed,
                   batch_size, progress=bar("sampling the policy"))
    sample_prompts = [p for p in prompts for _ in range(cfg.num_samples)]
    out: dict[str, Any] = {"num_prompts": len(prompts), "num_samples": len(samples), "temperature": cfg.temperature,
                           "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}
    out["mean_length"], out["mean_length_sem"] = _mean_sem([completion_length(s) for s in samples])
    out["finished_share"] = sum(s.finished for s in samples) / max(1, len(samples))
    scores = None
    if scorer is not None:
        scores = scorer.score(sample_prompts, [s.completion for s in samples])
        out["mean_score"], out["mean_score_sem"] = _mean_sem(scores)
    if reference is not None:
        out.update(_against_reference(policy, reference, tokenizer, samples, cfg, pairs if pairs is not None else cfg.pairs,
                                      bar, progress))
    if isinstance(baseline, str) and baseline == "reference":
        baseline = reference
    if baseline is not None:
        base_samples = (list(baseline) if isinstance(baseline, (list, tuple)) else samples if baseline is policy
                        else draw(baseline, tokenizer, prompts, cfg.num_samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                                  cfg.seed + 1, batch_size, progress=bar("sampling the baseline")))
        out.update(_against_baseline(samples, base_samples, sample_prompts, scores, scorer, judge, cfg.num_samples, judgments))
        out["length_change"] = out["mean_length"] - out["baseline_mean_length"]
    out["examples"] = [s.prompt + s.completion for s in samples[:: max(1, cfg.num_samples)][:2]]
    if samples_out is not None:
        _write_samples(Path(samples_out), samples, sample_prompts, scores, cfg.num_samples)
    return out


def _against_reference(policy, reference, tokenizer, samples: list[Sample], cfg: EvalConfig, pairs, bar, progress: bool) -> dict:
    """The KL estimates from the policy's samples and, with held-out pairs, the implicit reward's preference accuracy."""
    out: dict[str, Any] = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with progress_bar(len(samples), bar("KL to the reference") or "", "sample", progress) as kl_bar:
        ratios, tokenwise = log_ratios(policy, reference, [s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                                       pad, tokenwise=True, progress=kl_bar)
    out["kl_to_reference"], out["kl_to_reference_sem"] = _mean_sem(k3_kl(ratios).tolist())
    out["kl_estimator"] = KL_ESTIMATOR
    out["kl_tokenwise"], out["kl_tokenwise_sem"] = _mean_sem(tokenwise.tolist())
    out["kl_estimator_biased"] = not (cfg.temperature == 1.0 and cfg.top_p == 1.0)
    if pairs is not None:
        examples = examples_of(pairs)
        used = examples if cfg.max_pairs is None else examples[: cfg.max_pairs]
        out["pairs_used"], out["pairs_total"] = len(used), len(examples)
        with progress_bar(2 * len(used), bar("held-out pairs (chosen + rejected)") or "", "seq", progress) as pair_bar:
            out["preference_accuracy"] = preference_accuracy(policy, reference, tokenizer, used, progress=pair_bar)
    return out


def _against_baseline(samples, base_samples, sample_prompts, scores, scorer, judge, num_samples: int, judgments) -> dict:
    """The baseline's mean length (and score), and the win rate by the judge or else the scorer."""
    if len(base_samples) != len(samples):
        raise ValueError(f"baseline has {len(base_samples)} samples, the policy {len(samples)}")
    out: dict[str, Any] = {}
    out["baseline_mean_length"], _ = _mean_sem([completion_length(s) for s in base_samples])
    if judge is not None:
        wins = judge.compare(sample_prompts, [s.completion for s in samples], [s.completion for s in base_samples])
        out["win_rate_by"] = getattr(judge, "name", "pairwise judge")
    elif scorer is not None:
        base_scores = scorer.score(sample_prompts, [s.completion for s in base_samples])
        out["baseline_mean_score"], out["baseline_mean_score_sem"] = _mean_sem(base_scores)
        wins = [None if a is None or b is None or not (math.isfinite(a) and math.isfinite(b))
                else 1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(scores, base_scores)]
        out["win_rate_by"] = getattr(scorer, "name", "scorer")
    else:
        return out
    out["win_rate"], out["win_rate_sem"] = _mean_sem(wins)
    out["win_rate_unjudged"] = sum(w is None or not math.isfinite(w) for w in wins)  # left out of the win rate
    if judgments is not None:
        judgments.extend({"prompt_index": i // num_samples, "win": w, "length_diff": completion_length(a) - completion_length(b)}
                         for i, (w, a, b) in enumerate(zip(wins, samples, base_samples)))
    return out


def _write_samples(path: Path, samples: list[Sample], sample_prompts: list, scores, num_samples: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            row = {"prompt": sample_prompts[i], "sample_index": i % num_samples, "completion": s.completion,
                   "prompt_tokens": len(s.prompt_ids), "completion_tokens": len(s.completion_ids), "finished": s.finished}
            if scores is not None:
                row["score"] = scores[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


_ROWS = [
    ("mean_score", "mean score", "{:.3f}"),
    ("baseline_mean_score", "baseline mean score", "{:.3f}"),
    ("win_rate", "win rate vs baseline", "{:.1%}"),
    ("win_rate_unjudged", "unjudged (left out of the win rate)", "{:d}"),
    ("kl_to_reference", "KL(policy || reference), nats/completion, k3 from the policy's samples", "{:.2f}"),
    ("kl_tokenwise", "KL(policy || reference), nats/completion, exact next-token KL summed along the samples", "{:.2f}"),
    ("preference_accuracy", "held-out preference accuracy", "{:.1%}"),
    ("mean_length", "mean length (tokens)", "{:.1f}"),
    ("baseline_mean_length", "baseline mean length", "{:.1f}"),
    ("length_change", "length change", "{:+.1f}"),
    ("finished_share", "finished (EOS) share", "{:.1%}"),
    ("num_samples", "samples", "{:d}"),
]


def format_report(metrics: Mapping) -> str:
    rows = []
    for key, label, fmt in _ROWS:
        value = metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        text = fmt.format(value)
        sem = metrics.get(f"{key}_sem")
        if isinstance(sem, float) and math.isfinite(sem):
            text += " ± " + (fmt.format(sem) if "%" in fmt else f"{sem:.3f}" if "3f" in fmt else f"{sem:.2f}")
        if key == "preference_accuracy" and "pairs_used" in metrics:
            text += f"  (on {metrics['pairs_used']} of {metrics['pairs_total']} pairs)"
        rows.append((label, text))
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join(f"{label:<{width}}  {text}" for label, text in rows)


# --- CLI ----------------------------------------------------------------------------------------

EVAL_HELP = """\
Evaluate a policy on held-out prompts against a baseline: mean score of its samples, win rate,
KL(policy || reference) in nats (from the policy's own samples), mean completion length and its
change, and held-out preference accuracy of the implicit reward. --suite adds the evaluations DPO
users report (docs/evaluation.md; the suites are listed under --suite below), each on the policy and
the baseline.

  dpokit eval --policy runs/dpo/final --reference runs/sft/final --prompts heldout.jsonl \\
              --scorer mypkg.rewards:exact_match --pairs heldout_pairs.jsonl
  dpokit eval --policy runs/dpo/final --reference demo:sentiment-sft --prompts p.jsonl \\
              --judge-url http://127.0.0.1:8000/v1 --judge-model judge --suite lc_winrate --suite multiturn
  dpokit eval --policy runs/dpo/final --reference runs/sft/final --suite ifeval --out runs/dpo/eval.json

The baseline defaults to the reference (--baseline names another model). With --judge-url the
win rate is by a pairwise judge (both orders asked) and the mean score by --scorer if given;
--local-judge MODEL does the pairwise judging with a local model instead. --out FILE.json also
writes FILE.md, the table of every number (policy vs baseline, with standard errors); a run
directory's eval.json is shown by `dpokit report`.

Every flag is an alias of a config key (shown in its help: model.*, eval.*, io.*, scoring.scorer,
judge.*), so the settings can come from a YAML file and key=value overrides too, as for `dpokit train`:

  dpokit eval eval.yaml model.name_or_path=runs/dpo/final eval.suites=[ifeval]
"""


EVAL_FLAGS = (
    Flag(("--policy",), "model.name_or_path", "model folder, hub id or demo:sentiment-sft (required)", dest="policy"),
    Flag(("--reference",), "model.ref_name_or_path", "reference model for KL and implicit rewards (usually the SFT model)",
         dest="reference"),
    Flag(("--baseline",), "eval.baseline", "model to compare with (none: the reference)"),
    Flag(("--prompts",), "io.prompts", "held-out prompts (a data file) for the sampled evaluation; needed unless only suites run"),
    Flag(("--prompt-column",), "io.prompt_column"),
    Flag(("--max-prompts",), "eval.max_prompts"),
    Flag(("--scorer",), "scoring.scorer", "module:function or rm:MODEL"),
    *judge_flags("OpenAI-compatible base URL for a pairwise judge (and multiturn's rating judge)"),
    Flag(("--pairs",), "eval.pairs", "held-out preference pairs for preference accuracy"),
    Flag(("--max-pairs",), "eval.max_pairs",
         "use only the first N pairs of --pairs (each costs a policy and a reference forward of both sides)", metavar="N"),
    Flag(("-n", "--num-samples"), "eval.num_samples"),
    Flag(("--temperature",), "eval.temperature"),
    Flag(("--top-p",), "eval.top_p"),
    Flag(("--max-new-tokens",), "eval.max_new_tokens", "none: sampling.max_new_tokens"),
    Flag(("--seed",), "eval.seed"),
    Flag(("--out",), "io.out",
         "write the metrics as JSON here, the table as markdown beside it (.md), and the samples (.samples.jsonl)", dest="out"),
    *SUITE_FLAGS,
    *TRUST_FLAGS,  # for every model it loads: policy, reference, baseline, reward model, local judge
)


def eval_settings(cfg: Config) -> EvalConfig:
    """The EvalConfig `dpokit eval` runs with: cfg.eval, each suite once, max_new_tokens none -> sampling.max_new_tokens."""
    return dataclasses.replace(cfg.eval, suites=list(dict.fromkeys(cfg.eval.suites)),
                               max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens)


def run_cli(cfg: Config) -> int:
    """`dpokit eval` on its config: model.* (policy, reference, trust), eval.*, io.prompts/prompt_column/out,
    scoring.scorer, judge.*."""
    import transformers  # lazy: keeps `dpokit --help` fast; loading the models imports it anyway

    require(cfg, "model.name_or_path", "--policy", "the policy to evaluate")
    transformers.utils.logging.disable_progress_bar()
    check_suite_args(resolved_args(cfg, EVAL_FLAGS))
    # A dpokit run directory is locked for the whole evaluation: a run starting there meanwhile would replace the
    # model being measured, and this eval.json would then describe the earlier model (run_dir.holding).
    with holding(Path(cfg.io.out).parent if cfg.io.out else None, "--out"):
        return _evaluate(cfg, eval_settings(cfg))


def _evaluate(cfg: Config, e: EvalConfig) -> int:
    client_options = judge_options(cfg.judge)
    trust = ModelTrust.of(cfg.model)
    judge_url, judge_model, out = cfg.judge.base_url, cfg.judge.model, cfg.io.out
    policy, tokenizer = load_model(cfg.model.name_or_path, trust)
    reference = load_model(cfg.model.ref_name_or_path, trust)[0] if cfg.model.ref_name_or_path else None
    baseline = load_model(e.baseline, trust)[0] if e.baseline else "reference"
    scorer = build_scorer(cfg.scoring.scorer, trust) if cfg.scoring.scorer else None
    judge = rating_judge = None
    if judge_url:
        judge = PairwiseJudge(judge_url, judge_model, **client_options)
        rating_judge = MTBenchJudge(judge_url, judge_model, **client_options)
    elif e.local_judge:
        judge = LocalPairwiseJudge(*load_model(e.local_judge, trust), name=f"local judge {e.local_judge}")
    metrics: dict[str, Any] = {}
    judgments: list[dict] = []
    if cfg.io.prompts:
        prompts, counts = load_prompts(cfg.io.prompts, column=cfg.io.prompt_column, max_prompts=e.max_prompts)
        print(f"[eval] {cfg.io.prompts}: {describe_counts(counts)}", flush=True)
        samples_out = Path(out).with_suffix(".samples.jsonl") if out else None
        metrics = evaluate(policy, tokenizer, prompts, e, reference=reference, baseline=baseline, scorer=scorer, judge=judge,
                           samples_out=samples_out, progress=True, judgments=judgments)
        print(format_report(metrics))
    if e.suites:
        suite_baseline = reference if isinstance(baseline, str) else baseline  # "reference": the default
        metrics["suites"] = run_suites(e.suites, policy, tokenizer, suite_baseline, cfg=e, judgments=judgments,
                                       rating_judge=rating_judge, pairwise_judge=rating_judge or judge)
        metrics["suite_rows"] = suite_rows(e.suites)  # how eval.md and `dpokit report` show each suite's results
        metrics["baseline"] = e.baseline or cfg.model.ref_name_or_path
        print(markdown(metrics))
    if out:
        write_view(metrics, out)
        print(f"[eval] metrics written to {out} and {Path(out).with_suffix('.md')}")
    return 0


VERB = Verb("eval", "evaluate a policy against a baseline (score, win rate, KL, length, suites)", EVAL_HELP, run_cli,
            flags=EVAL_FLAGS)
