"""Verifiable-instruction accuracy, as IFEval defines it (Zhou et al. 2023, arXiv:2311.07911, section 3).

Input rows are IFEval's: {"key", "prompt", "instruction_id_list", "kwargs"} with one kwargs mapping per
instruction (None values are the paper's unused arguments and are dropped). Four numbers:
  prompt_level_strict_acc   share of prompts whose every instruction is followed
  inst_level_strict_acc     share of all instructions followed
  *_loose_acc               the same, where an instruction counts as followed if any of 8 variants of the
                            response follows it: the response with or without its first line, with or without
                            its last line (4), each as is or with every '*' removed (x2). Loose catches
                            "Sure, here it is:" openings and markdown that strict checking penalises.
Each comes with its standard error (`*_sem`; instruction-level treats instructions as independent draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dpokit.data.records import DataError
from dpokit.inputs import iter_jsonl
from dpokit.online.suites.answers import answer
from dpokit.online.suites.ifeval_checks import CHECKERS
from dpokit.online.suites.stats import mean_sem

DEFAULT_PROMPTS = Path(__file__).with_name("data") / "ifeval_prompts.jsonl"


class IFEvalDataError(DataError):
    """A prompt file row that cannot be checked; the message names the file, row and field."""


def load_ifeval(path: str | Path | None = None, max_prompts: int | None = None) -> list[dict]:
    """Rows of an IFEval-format JSONL (default: the shipped prompt set), each checked: ids known, kwargs bindable."""
    path = Path(path) if path else DEFAULT_PROMPTS
    rows = []
    for number, row in iter_jsonl(path, "suite", "--ifeval-prompts"):  # the gateway: a file, within its limit
        if max_prompts is not None and len(rows) >= max_prompts:
            break
        where = f"{path}, row {number}"
        for field in ("prompt", "instruction_id_list"):
            if field not in row:
                raise IFEvalDataError(f"{where}: missing field '{field}'")
        ids, kwargs = row["instruction_id_list"], row.get("kwargs") or [{} for _ in row["instruction_id_list"]]
        if len(kwargs) != len(ids):
            raise IFEvalDataError(f"{where}: field 'kwargs' has {len(kwargs)} entries for {len(ids)} instruction ids")
        clean = []
        for i, (instruction, args) in enumerate(zip(ids, kwargs)):
            if instruction not in CHECKERS:
                raise IFEvalDataError(
                    f"{where}: field 'instruction_id_list'[{i}]: unknown instruction id {instruction!r}"
                )
            args = {k: v for k, v in (args or {}).items() if v is not None}
            try:
                CHECKERS[instruction]("", **args)
            except TypeError as e:
                raise IFEvalDataError(f"{where}: field 'kwargs'[{i}] does not fit {instruction}: {e}") from None
            except ValueError as e:
                raise IFEvalDataError(f"{where}: field 'kwargs'[{i}]: {e}") from None
            clean.append(args)
        rows.append(
            {"key": row.get("key", number), "prompt": row["prompt"], "instruction_id_list": list(ids), "kwargs": clean}
        )
    return rows if max_prompts is None else rows[:max_prompts]


def loose_variants(response: str) -> list[str]:
    """The 8 variants of the paper's loose check: first line / last line / both removed, each with '*' removed too."""
    lines = response.split("\n")
    cuts = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cuts + [c.replace("*", "") for c in cuts]


def followed(instruction: str, args: dict, response: str, loose: bool) -> bool:
    check = CHECKERS[instruction]
    if not loose:
        return bool(response.strip()) and check(response, **args)
    return any(v.strip() and check(v, **args) for v in loose_variants(response))


def score_ifeval(rows: Sequence[dict], responses: Sequence[str]) -> dict:
    """The four accuracies (and SEMs) of `responses` (one per row), and each prompt's per-instruction results."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(responses)} responses for {len(rows)} prompts")
    out: dict = {"num_prompts": len(rows), "num_instructions": sum(len(r["instruction_id_list"]) for r in rows)}
    per_prompt = []
    for mode in ("strict", "loose"):
        prompt_level, inst_level = [], []
        for i, (row, response) in enumerate(zip(rows, responses)):
            results = [
                followed(inst, args, response, mode == "loose")
                for inst, args in zip(row["instruction_id_list"], row["kwargs"])
            ]
            prompt_level.append(float(all(results)))
            inst_level.extend(float(r) for r in results)
            if mode == "strict":
                per_prompt.append({"key": row["key"], "response": response, "strict": results})
            else:
                per_prompt[i]["loose"] = results
        out[f"prompt_level_{mode}_acc"], out[f"prompt_level_{mode}_acc_sem"] = mean_sem(prompt_level)
        out[f"inst_level_{mode}_acc"], out[f"inst_level_{mode}_acc_sem"] = mean_sem(inst_level)
    out["per_prompt"] = per_prompt
    return out


def run_ifeval(
    model, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 256, seed: int = 0, batch_size: int = 16
) -> dict:
    """Greedy answers to each prompt (as one user turn), scored by `score_ifeval`."""
    samples = answer(
        model,
        tokenizer,
        [[{"role": "user", "content": r["prompt"]}] for r in rows],
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
    return score_ifeval(rows, [s.completion for s in samples])
