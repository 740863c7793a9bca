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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpokit.config import Config, EvalConfig, SamplingConfig
from dpokit.config.flags import Flag, Verb, require, resolved_args
from dpokit.generation import Sample, sample
from dpokit.online.eval_metrics import (
    against_baseline,
    against_reference,
    completion_length,
    format_report,
    progress_bar,
)
from dpokit.online.judges import PairwiseJudge, judge_flags, judge_options
from dpokit.online.loading import TRUST_FLAGS, ModelTrust, load_model
from dpokit.online.log_ratios import (  # noqa: F401  (kept importable from here)
    KL_ESTIMATOR,
    examples_of,
    k3_kl,
    kl_to_reference,
    log_ratios,
    preference_accuracy,
)
from dpokit.online.prompts import Prompt, describe_counts, load_prompts, render_prompt
from dpokit.online.scoring import build_scorer
from dpokit.online.suites.local_judge import LocalPairwiseJudge
from dpokit.online.suites.multiturn import MTBenchJudge
from dpokit.online.suites.runner import SUITE_FLAGS, check_suite_args, run_suites, suite_rows
from dpokit.online.suites.stats import mean_sem
from dpokit.online.suites.view import markdown, write_view
from dpokit.training.run_dir import holding


# --- the evaluation ------------------------------------------------------------------------------


def draw(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    num_samples: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 64,
    progress: str | None = None,
) -> list[Sample]:
    """num_samples samples per prompt (prompt-major); conversational prompts through the chat template.

    progress: the description of a progress bar over the samples (None: no bar).
    """
    texts = [render_prompt(p, tokenizer) for p in prompts]
    with progress_bar(len(texts) * num_samples, progress or "", "sample", progress is not None) as bar:
        return sample(
            model,
            tokenizer,
            texts,
            num_samples=num_samples,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            on_batch=bar.update,
        )


def evaluate(
    policy,
    tokenizer,
    prompts: Sequence[Prompt],
    cfg: EvalConfig | None = None,
    *,
    reference=None,
    baseline: Any = "reference",
    scorer=None,
    judge=None,
    pairs=None,
    batch_size: int = 64,
    samples_out: str | Path | None = None,
    progress: bool = False,
    judgments: list | None = None,
) -> dict:
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
    cfg = _with_max_new_tokens(cfg or EvalConfig())
    prompts = list(prompts)
    bar = (lambda what: f"[eval] {what}") if progress else (lambda what: None)
    samples = _draw_as(cfg, policy, tokenizer, prompts, cfg.seed, batch_size, bar("sampling the policy"))
    sample_prompts = [p for p in prompts for _ in range(cfg.num_samples)]
    out, scores = _own_metrics(prompts, samples, sample_prompts, cfg, scorer)
    if reference is not None:
        pairs = pairs if pairs is not None else cfg.pairs
        out.update(against_reference(policy, reference, tokenizer, samples, cfg, pairs, bar, progress))
    if isinstance(baseline, str) and baseline == "reference":
        baseline = reference
    if baseline is not None:
        if isinstance(baseline, (list, tuple)):
            base_samples = list(baseline)
        elif baseline is policy:
            base_samples = samples
        else:
            shown = bar("sampling the baseline")
            base_samples = _draw_as(cfg, baseline, tokenizer, prompts, cfg.seed + 1, batch_size, shown)
        out.update(
            against_baseline(samples, base_samples, sample_prompts, scores, scorer, judge, cfg.num_samples, judgments)
        )
        out["length_change"] = out["mean_length"] - out["baseline_mean_length"]
    out["examples"] = [s.prompt + s.completion for s in samples[:: max(1, cfg.num_samples)][:2]]
    if samples_out is not None:
        _write_samples(Path(samples_out), samples, sample_prompts, scores, cfg.num_samples)
    return out


def _with_max_new_tokens(cfg: EvalConfig) -> EvalConfig:
    """cfg, with SamplingConfig's max_new_tokens where it has none."""
    if cfg.max_new_tokens is None:
        return dataclasses.replace(cfg, max_new_tokens=SamplingConfig().max_new_tokens)
    return cfg


def _draw_as(
    cfg: EvalConfig, model, tokenizer, prompts: list[Prompt], seed: int, batch_size: int, progress: str | None
) -> list[Sample]:
    """`draw` with the evaluation's sampling settings (num_samples, temperature, top_p, max_new_tokens)."""
    return draw(
        model,
        tokenizer,
        prompts,
        cfg.num_samples,
        cfg.temperature,
        cfg.top_p,
        cfg.max_new_tokens,
        seed,
        batch_size,
        progress=progress,
    )


def _own_metrics(
    prompts: list[Prompt], samples: list[Sample], sample_prompts: list[Prompt], cfg: EvalConfig, scorer
) -> tuple[dict[str, Any], list | None]:
    """What was sampled, the samples' mean length and finished share, and with a scorer their scores (returned too)
    and mean score."""
    out: dict[str, Any] = {
        "num_prompts": len(prompts),
        "num_samples": len(samples),
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens,
    }
    out["mean_length"], out["mean_length_sem"] = mean_sem([completion_length(s) for s in samples])
    out["finished_share"] = sum(s.finished for s in samples) / max(1, len(samples))
    scores = None
    if scorer is not None:
        scores = scorer.score(sample_prompts, [s.completion for s in samples])
        out["mean_score"], out["mean_score_sem"] = mean_sem(scores)
    return out, scores


def _write_samples(path: Path, samples: list[Sample], sample_prompts: list, scores, num_samples: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, s in enumerate(samples):
            row = {
                "prompt": sample_prompts[i],
                "sample_index": i % num_samples,
                "completion": s.completion,
                "prompt_tokens": len(s.prompt_ids),
                "completion_tokens": len(s.completion_ids),
                "finished": s.finished,
            }
            if scores is not None:
                row["score"] = scores[i]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


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
    Flag(
        ("--reference",),
        "model.ref_name_or_path",
        "reference model for KL and implicit rewards (usually the SFT model)",
        dest="reference",
    ),
    Flag(("--baseline",), "eval.baseline", "model to compare with (none: the reference)"),
    Flag(
        ("--prompts",),
        "io.prompts",
        "held-out prompts (a data file) for the sampled evaluation; needed unless only suites run",
    ),
    Flag(("--prompt-column",), "io.prompt_column"),
    Flag(("--max-prompts",), "eval.max_prompts"),
    Flag(("--scorer",), "scoring.scorer", "module:function or rm:MODEL"),
    *judge_flags("OpenAI-compatible base URL for a pairwise judge (and multiturn's rating judge)"),
    Flag(("--pairs",), "eval.pairs", "held-out preference pairs for preference accuracy"),
    Flag(
        ("--max-pairs",),
        "eval.max_pairs",
        "use only the first N pairs of --pairs (each costs a policy and a reference forward of both sides)",
        metavar="N",
    ),
    Flag(("-n", "--num-samples"), "eval.num_samples"),
    Flag(("--temperature",), "eval.temperature"),
    Flag(("--top-p",), "eval.top_p"),
    Flag(("--max-new-tokens",), "eval.max_new_tokens", "none: sampling.max_new_tokens"),
    Flag(("--seed",), "eval.seed"),
    Flag(
        ("--out",),
        "io.out",
        "write the metrics as JSON here, the table as markdown beside it (.md), and the samples (.samples.jsonl)",
        dest="out",
    ),
    *SUITE_FLAGS,
    *TRUST_FLAGS,  # for every model it loads: policy, reference, baseline, reward model, local judge
)


def eval_settings(cfg: Config) -> EvalConfig:
    """The EvalConfig `dpokit eval` runs with: cfg.eval, each suite once, max_new_tokens none -> sampling.max_new_tokens."""
    return dataclasses.replace(
        cfg.eval,
        suites=list(dict.fromkeys(cfg.eval.suites)),
        max_new_tokens=cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
    )


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
        metrics = evaluate(
            policy,
            tokenizer,
            prompts,
            e,
            reference=reference,
            baseline=baseline,
            scorer=scorer,
            judge=judge,
            samples_out=samples_out,
            progress=True,
            judgments=judgments,
        )
        print(format_report(metrics))
    if e.suites:
        suite_baseline = reference if isinstance(baseline, str) else baseline  # "reference": the default
        metrics["suites"] = run_suites(
            e.suites,
            policy,
            tokenizer,
            suite_baseline,
            cfg=e,
            judgments=judgments,
            rating_judge=rating_judge,
            pairwise_judge=rating_judge or judge,
        )
        metrics["suite_rows"] = suite_rows(e.suites)  # how eval.md and `dpokit report` show each suite's results
        metrics["baseline"] = e.baseline or cfg.model.ref_name_or_path
        print(markdown(metrics))
    if out:
        write_view(metrics, out)
        print(f"[eval] metrics written to {out} and {Path(out).with_suffix('.md')}")
    return 0


VERB = Verb(
    "eval",
    "evaluate a policy against a baseline (score, win rate, KL, length, suites)",
    EVAL_HELP,
    run_cli,
    flags=EVAL_FLAGS,
)
