"""The suites `dpokit eval --suite ...` was asked for, on the policy and the baseline (docs/evaluation.md).

`SUITES` is the table, name -> Suite(help, run, rows, check_args) (suite.py says what each part is): a new
suite is its own module and one line here.

    ifeval      both models answer the IFEval-style prompts; the four accuracies of each
    lc_winrate  the length-controlled win rate of the policy over the baseline, from the win-rate judgments of
                the sampled evaluation (`evaluate(..., judgments=...)`: a judge, the local judge or a scorer)
    multiturn   both models hold the two-turn conversations; single mode: the judge rates each model's turns,
                pairwise: the judge compares the policy's turns with the baseline's
    length_stats  both models answer the IFEval-style prompts; the answers' length: mean, median, 90th percentile
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

from dpokit.config import EvalConfig
from dpokit.config.errors import check_choice
from dpokit.config.flags import Flag
from dpokit.config.online import MULTITURN_MODES
from dpokit.online.suites import length_stats
from dpokit.online.suites.ifeval import load_ifeval, run_ifeval
from dpokit.online.suites.lc_winrate import lc_win_rate
from dpokit.online.suites.multiturn import converse, load_questions, score_pairwise, score_single
from dpokit.online.suites.suite import Suite, SuiteError, SuiteRun
from dpokit.report.eval_table import SUITE_ROWS

__all__ = [
    "SUITES",
    "Suite",
    "SuiteError",
    "SuiteRun",
    "SUITE_FLAGS",
    "check_suite_args",
    "check_suite_names",
    "lc_from_judgments",
    "run_suites",
    "suite_rows",
]

_SINGLE_NEEDS_API = (
    "multiturn single mode needs a judge behind an API: --judge-url and --judge-model "
    "(or --multiturn-mode pairwise with --local-judge)"
)


# --- ifeval ---------------------------------------------------------------------------------------


def _ifeval(run: SuiteRun) -> dict:
    rows = load_ifeval(run.cfg.ifeval_prompts, run.cfg.max_prompts)
    return run.per_model(
        lambda m: run_ifeval(m, run.tokenizer, rows, max_new_tokens=run.cfg.suite_max_new_tokens, seed=run.cfg.seed)
    )


# --- lc_winrate -----------------------------------------------------------------------------------


def _lc_winrate_lacks(args) -> Optional[str]:
    if not args.prompts:
        return "--prompts is needed for the sampled evaluation (lc_winrate reads its win-rate judgments)"
    if not (args.judge_url or args.local_judge or args.scorer):
        return "lc_winrate needs win-rate judgments: give a judge (--judge-url, --local-judge) or --scorer"
    if not (args.baseline or args.reference):  # the win rate compares with the baseline
        return "lc_winrate needs a baseline to judge the policy's samples against: --reference (the default baseline) or --baseline"
    return None


def lc_from_judgments(judgments: Sequence[dict], bootstrap: int, seed: int) -> dict:
    usable = [j for j in judgments if j["win"] is not None and math.isfinite(j["win"])]  # NaN: no readable verdict
    if not usable:  # check_suite_args has refused the options that give no judgments at all
        raise SuiteError(
            f"lc_winrate: none of the {len(judgments)} win-rate judgments is usable (each lacks a score or "
            "a readable verdict); see the samples and the judge's replies"
        )
    out = lc_win_rate(
        [j["win"] for j in usable],
        [j["length_diff"] for j in usable],
        [j["prompt_index"] for j in usable],
        bootstrap=bootstrap,
        seed=seed,
    )
    out["skipped_judgments"] = len(judgments) - len(
        usable
    )  # a missing score or an unreadable verdict: counted, not hidden
    return out


def _lc_winrate(run: SuiteRun) -> dict:
    return lc_from_judgments(run.judgments or [], run.cfg.lc_bootstrap, run.cfg.seed)


# --- multiturn ------------------------------------------------------------------------------------


def _multiturn_lacks(args) -> Optional[str]:
    if args.multiturn_mode == "single" and not args.judge_url:
        return _SINGLE_NEEDS_API
    if args.multiturn_mode == "pairwise" and not (args.judge_url or args.local_judge):
        return "multiturn pairwise mode needs a judge: --judge-url with --judge-model, or --local-judge"
    if args.multiturn_mode == "pairwise" and not (args.baseline or args.reference):
        return "multiturn pairwise mode needs a baseline: --baseline or --reference"
    return None


def _multiturn(run: SuiteRun) -> dict:
    questions = load_questions(run.cfg.multiturn_questions, run.cfg.max_prompts)
    talks = run.per_model(
        lambda m: converse(m, run.tokenizer, questions, max_new_tokens=run.cfg.suite_max_new_tokens, seed=run.cfg.seed)
    )
    if run.cfg.multiturn_mode == "single":
        if run.rating_judge is None:
            raise SuiteError(_SINGLE_NEEDS_API)
        return {who: score_single(run.rating_judge, questions, talk) for who, talk in talks.items()}
    if run.pairwise_judge is None or run.baseline is None:
        raise SuiteError(
            "multiturn pairwise mode needs a baseline (--baseline or --reference) and a judge "
            "(--judge-url with --judge-model, or --local-judge)"
        )
    result = score_pairwise(run.pairwise_judge, questions, talks["policy"], talks["baseline"])
    result["conversations"] = talks
    return result


# --- the table ------------------------------------------------------------------------------------

SUITES: dict[str, Suite] = {
    "ifeval": Suite("verifiable instructions", _ifeval, SUITE_ROWS["ifeval"]),
    "lc_winrate": Suite(
        "length-controlled win rate, from the win-rate judgments of --prompts",
        _lc_winrate,
        SUITE_ROWS["lc_winrate"],
        _lc_winrate_lacks,
    ),
    "multiturn": Suite("two-turn conversations, judged", _multiturn, SUITE_ROWS["multiturn"], _multiturn_lacks),
    "length_stats": length_stats.SUITE,
}


def check_suite_names(names: Sequence[str]) -> None:
    """A ConfigError naming the suites there are (and the nearest one) for a name the table does not have."""
    for name in names:
        check_choice("eval.suites", name, tuple(SUITES))


def check_suite_args(args) -> None:
    """Refuse, before any model is loaded or sampled, options that could not give what was asked; names what is missing."""
    suites = list(dict.fromkeys(args.suite))
    check_suite_names(suites)
    if not args.prompts and not suites:
        raise SuiteError("--prompts is needed for the sampled evaluation")
    for name in SUITES:  # in the table's order, whatever order the flags came in
        lacks = SUITES[name].check_args(args) if name in suites else None
        if lacks:
            raise SuiteError(lacks)
    if getattr(args, "pairs", None) and not args.reference:  # preference accuracy is log pi/ref on the held-out pairs
        raise SuiteError("--pairs needs --reference: held-out preference accuracy is the implicit reward log pi/ref")


def run_suites(
    names: Sequence[str],
    policy,
    tokenizer,
    baseline=None,
    *,
    cfg: EvalConfig | None = None,
    judgments: Sequence[dict] | None = None,
    rating_judge=None,
    pairwise_judge=None,
) -> dict[str, Any]:
    """{suite: results}, each by its SUITES entry; per-model suites give {"policy": ..., "baseline": ...} (baseline None:
    policy only).

    cfg: the EvalConfig (suite_max_new_tokens, max_prompts, seed, ifeval_prompts, multiturn_questions,
    multiturn_mode, lc_bootstrap). rating_judge: an MTBenchJudge (multiturn single mode); pairwise_judge: anything
    with compare(prompts, a, b) (multiturn pairwise mode: an MTBenchJudge or the local judge).
    """
    check_suite_names(names)
    run = SuiteRun(policy, tokenizer, baseline, cfg or EvalConfig(), judgments or [], rating_judge, pairwise_judge)
    return {name: SUITES[name].run(run) for name in names}


def suite_rows(names: Sequence[str]) -> dict[str, list]:
    """The rows of each suite's results in eval.md and the report, by suite: eval.json carries them."""
    return {name: [list(row) for row in SUITES[name].rows] for name in names}


# `dpokit eval`'s suite flags: aliases of eval.* keys (config/flags.py)
SUITE_FLAGS = (
    Flag(
        ("--suite",),
        "eval.suites",
        lambda: "also run a suite (repeatable): " + ", ".join(f"{name} ({s.help})" for name, s in SUITES.items()),
        dest="suite",
        metavar="NAME",
        choices=lambda: tuple(SUITES),
        repeat=True,
    ),
    Flag(
        ("--ifeval-prompts",),
        "eval.ifeval_prompts",
        "IFEval-format JSONL (key, prompt, instruction_id_list, kwargs); none: the shipped 48 prompts",
        metavar="FILE",
    ),
    Flag(
        ("--multiturn-questions",),
        "eval.multiturn_questions",
        'two-turn questions, JSONL rows with "turns": [q1, q2]; none: the shipped 10',
        metavar="FILE",
    ),
    Flag(
        ("--multiturn-mode",),
        "eval.multiturn_mode",
        "single: the judge rates each turn 1-10 (needs --judge-url); pairwise: policy vs baseline per turn",
        choices=MULTITURN_MODES,
    ),
    Flag(
        ("--suite-max-new-tokens",),
        "eval.suite_max_new_tokens",
        "tokens per answer in the suites that answer prompts (greedy decoding)",
        metavar="N",
    ),
    Flag(
        ("--lc-bootstrap",),
        "eval.lc_bootstrap",
        "bootstrap resamples for the LC win rate's standard error (0: none)",
        metavar="N",
    ),
    Flag(
        ("--local-judge",),
        "eval.local_judge",
        "a local HF model as the pairwise judge (log-probability of 'A' vs 'B', both orders) when no "
        "--judge-url is given: for the win rate, lc_winrate and multiturn pairwise",
        metavar="MODEL",
    ),
)
