"""The suites `dpokit eval --suite ...` was asked for, on the policy and the baseline (docs/evaluation.md).

    ifeval      both models answer the IFEval-style prompts; the four accuracies of each
    lc_winrate  the length-controlled win rate of the policy over the baseline, from the win-rate judgments of
                the sampled evaluation (`evaluate(..., judgments=...)`: a judge, the local judge or a scorer)
    multiturn   both models hold the two-turn conversations; single mode: the judge rates each model's turns,
                pairwise: the judge compares the policy's turns with the baseline's
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from dpokit.config.errors import ConfigError
from dpokit.config.online import EVAL_SUITES, MULTITURN_MODES
from dpokit.online.suites.ifeval import load_ifeval, run_ifeval
from dpokit.online.suites.lc_winrate import lc_win_rate
from dpokit.online.suites.multiturn import converse, load_questions, score_pairwise, score_single


class SuiteError(ConfigError):
    """A suite that cannot run with what it was given (a missing judge or baseline); names what to add."""


@dataclass
class SuiteOptions:
    ifeval_prompts: Optional[str] = None
    multiturn_questions: Optional[str] = None
    multiturn_mode: str = "single"
    max_new_tokens: int = 256
    max_prompts: Optional[int] = None
    seed: int = 0
    lc_bootstrap: int = 200


def check_suite_args(args) -> None:
    """Refuse, before any model is loaded or sampled, options that could not give what was asked; names what is missing."""
    suites = set(args.suite)
    if not args.prompts and (not suites or "lc_winrate" in suites):
        raise SuiteError("--prompts is needed for the sampled evaluation" + (" (lc_winrate reads its win-rate judgments)" if suites else ""))
    if "lc_winrate" in suites and not (args.judge_url or args.local_judge or args.scorer):
        raise SuiteError("lc_winrate needs win-rate judgments: give a judge (--judge-url, --local-judge) or --scorer")
    if "lc_winrate" in suites and not (args.baseline or args.reference):  # the win rate compares with the baseline
        raise SuiteError("lc_winrate needs a baseline to judge the policy's samples against: --reference (the default "
                         "baseline) or --baseline")
    if getattr(args, "pairs", None) and not args.reference:  # preference accuracy is log pi/ref on the held-out pairs
        raise SuiteError("--pairs needs --reference: held-out preference accuracy is the implicit reward log pi/ref")
    if "multiturn" in suites and args.multiturn_mode == "single" and not args.judge_url:
        raise SuiteError("multiturn single mode needs a judge behind an API: --judge-url and --judge-model "
                         "(or --multiturn-mode pairwise with --local-judge)")
    if "multiturn" in suites and args.multiturn_mode == "pairwise" and not (args.judge_url or args.local_judge):
        raise SuiteError("multiturn pairwise mode needs a judge: --judge-url with --judge-model, or --local-judge")
    if "multiturn" in suites and args.multiturn_mode == "pairwise" and not (args.baseline or args.reference):
        raise SuiteError("multiturn pairwise mode needs a baseline: --baseline or --reference")


def lc_from_judgments(judgments: Sequence[dict], bootstrap: int, seed: int) -> dict:
    usable = [j for j in judgments if j["win"] is not None and math.isfinite(j["win"])]  # NaN: no readable verdict
    if not usable:  # check_suite_args has refused the options that give no judgments at all
        raise SuiteError(f"lc_winrate: none of the {len(judgments)} win-rate judgments is usable (each lacks a score or "
                         "a readable verdict); see the samples and the judge's replies")
    out = lc_win_rate([j["win"] for j in usable], [j["length_diff"] for j in usable], [j["prompt_index"] for j in usable],
                      bootstrap=bootstrap, seed=seed)
    out["skipped_judgments"] = len(judgments) - len(usable)  # a missing score or an unreadable verdict: counted, not hidden
    return out


def run_suites(names: Sequence[str], policy, tokenizer, baseline=None, *, options: SuiteOptions | None = None,
               judgments: Sequence[dict] | None = None, rating_judge=None, pairwise_judge=None) -> dict[str, Any]:
    """{suite: results}; per-model suites give {"policy": ..., "baseline": ...} (baseline None: policy only).

    rating_judge: an MTBenchJudge (multiturn single mode); pairwise_judge: anything with compare(prompts, a, b)
    (multiturn pairwise mode: an MTBenchJudge or the local judge).
    """
    options = options or SuiteOptions()
    models = {"policy": policy} if baseline is None else {"policy": policy, "baseline": baseline}
    out: dict[str, Any] = {}
    for name in names:
        if name == "ifeval":
            rows = load_ifeval(options.ifeval_prompts, options.max_prompts)
            out[name] = {who: run_ifeval(m, tokenizer, rows, max_new_tokens=options.max_new_tokens, seed=options.seed)
                         for who, m in models.items()}
        elif name == "lc_winrate":
            out[name] = lc_from_judgments(judgments or [], options.lc_bootstrap, options.seed)
        elif name == "multiturn":
            questions = load_questions(options.multiturn_questions, options.max_prompts)
            talks = {who: converse(m, tokenizer, questions, max_new_tokens=options.max_new_tokens, seed=options.seed)
                     for who, m in models.items()}
            if options.multiturn_mode == "single":
                if rating_judge is None:
                    raise SuiteError("multiturn single mode needs a judge behind an API: --judge-url and --judge-model "
                                     "(or --multiturn-mode pairwise with --local-judge)")
                out[name] = {who: score_single(rating_judge, questions, talk) for who, talk in talks.items()}
            else:
                if pairwise_judge is None or baseline is None:
                    raise SuiteError("multiturn pairwise mode needs a baseline (--baseline or --reference) and a judge "
                                     "(--judge-url with --judge-model, or --local-judge)")
                result = score_pairwise(pairwise_judge, questions, talks["policy"], talks["baseline"])
                result["conversations"] = talks
                out[name] = result
        else:
            raise SuiteError(f"unknown suite {name!r}")
    return out


def add_suite_flags(p, d) -> None:
    """`dpokit eval`'s suite flags; d: the EvalConfig defaults."""
    p.add_argument("--suite", action="append", choices=EVAL_SUITES, default=list(d.suites), metavar="NAME",
                   help="also run a suite (repeatable): ifeval (verifiable instructions), lc_winrate (length-controlled "
                        "win rate, from the win-rate judgments of --prompts), multiturn (two-turn conversations, judged)")
    p.add_argument("--ifeval-prompts", default=d.ifeval_prompts, metavar="FILE",
                   help="IFEval-format JSONL (key, prompt, instruction_id_list, kwargs); default: the shipped 48 prompts")
    p.add_argument("--multiturn-questions", default=d.multiturn_questions, metavar="FILE",
                   help="two-turn questions, JSONL rows with \"turns\": [q1, q2]; default: the shipped 10")
    p.add_argument("--multiturn-mode", choices=MULTITURN_MODES, default=d.multiturn_mode,
                   help="single: the judge rates each turn 1-10 (needs --judge-url); pairwise: policy vs baseline per turn")
    p.add_argument("--suite-max-new-tokens", type=int, default=d.suite_max_new_tokens, metavar="N",
                   help="tokens per answer in ifeval and multiturn (greedy decoding)")
    p.add_argument("--lc-bootstrap", type=int, default=d.lc_bootstrap, metavar="N",
                   help="bootstrap resamples for the LC win rate's standard error (0: none)")
    p.add_argument("--local-judge", metavar="MODEL",
                   help="a local HF model as the pairwise judge (log-probability of 'A' vs 'B', both orders) when no "
                        "--judge-url is given: for the win rate, lc_winrate and multiturn pairwise")


def options_from_args(args) -> SuiteOptions:
    return SuiteOptions(ifeval_prompts=args.ifeval_prompts, multiturn_questions=args.multiturn_questions,
                        multiturn_mode=args.multiturn_mode, max_new_tokens=args.suite_max_new_tokens,
                        max_prompts=args.max_prompts, seed=args.seed, lc_bootstrap=args.lc_bootstrap)
