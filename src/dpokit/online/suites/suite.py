"""What a suite is: one entry of runner.SUITES, and what its run function is given.

A suite is a module with a function `run(SuiteRun) -> results`, plus one line in runner.SUITES:
`Suite(help, run, rows, check_args)`. Nothing else names it: `--suite`'s choices and help, the check
before any model loads, the run and the rows of eval.md and the report all come from that line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from dpokit.config import EvalConfig
from dpokit.config.errors import ConfigError

Row = tuple[str, str, str]  # (label, key in the results, format): one line of eval.md and of the report


class SuiteError(ConfigError):
    """A suite that cannot run with what it was given (a missing judge or baseline); names what to add."""


def nothing_missing(args) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Suite:
    """One row of the table.

    help        a few words for `--suite`'s help
    run         SuiteRun -> the suite's results; a suite measured on each model gives {"policy": ..., "baseline": ...}
                (`SuiteRun.per_model`), a comparison of the two one mapping
    rows        (label, key, format) of the results in eval.md and the report, the policy's value beside the baseline's;
                eval.json carries them, so `dpokit report` shows a suite it has never heard of
    check_args  the parsed `dpokit eval` arguments -> what the suite lacks (one sentence naming the flag to add),
                or None; asked before any model is loaded
    """

    help: str
    run: Callable[["SuiteRun"], dict]
    rows: Sequence[Row]
    check_args: Callable[[Any], Optional[str]] = nothing_missing


@dataclass
class SuiteRun:
    """What a suite's run function gets: the models, the evaluation's settings and what the sampled evaluation judged.

    cfg: the EvalConfig (suite_max_new_tokens, max_prompts, seed, the suites' own files and modes);
    judgments: the sampled evaluation's win-rate judgments ({"prompt_index", "win", "length_diff"});
    rating_judge: an MTBenchJudge (API); pairwise_judge: anything with compare(prompts, a, b).
    """

    policy: Any
    tokenizer: Any
    baseline: Any = None  # None: the policy only
    cfg: EvalConfig = field(default_factory=EvalConfig)
    judgments: Sequence[dict] = ()
    rating_judge: Any = None
    pairwise_judge: Any = None

    @property
    def models(self) -> dict[str, Any]:
        return {"policy": self.policy} if self.baseline is None else {"policy": self.policy, "baseline": self.baseline}

    def per_model(self, measure: Callable[[Any], dict]) -> dict[str, dict]:
        """{"policy": measure(policy), "baseline": measure(baseline)} (the baseline's only when there is one)."""
        return {who: measure(model) for who, model in self.models.items()}
