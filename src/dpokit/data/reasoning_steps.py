"""Step-level preferences (Step-DPO, Lai et al., 2024): the prompt is a question plus the accepted
reasoning steps so far, and chosen / rejected are one next step each.

Layout `step_dpo`, detected by the `initial_reason_steps` column (the name in the Step-DPO
paper's data, xinlai/Math-Step-DPO-10K):

    {"prompt": "Tom has 3 boxes of 4 apples and eats 2. How many are left?",
     "initial_reason_steps": ["Step 1: 3 boxes of 4 apples is 3 * 4 = 12 apples."],
     "chosen": "Step 2: He eats 2, so 12 - 2 = 10 apples are left.",
     "rejected": "Step 2: He eats 2, so 12 + 2 = 14 apples are left."}

`initial_reason_steps` is a list of steps or one text (possibly empty: the first step is judged).
The prompt is text: the question and each accepted step on their own lines, ending in a newline,
so the judged step starts a line ("question\\nstep 1\\nstep 2\\n"); the completion gets EOS like
any text completion. Only the judged step is in the loss, never the accepted ones.
"""

from __future__ import annotations

from dpokit.data.rows import RowSkip


def from_step_dpo(row: dict) -> tuple[str, str, str]:
    question = _text(row, "prompt")
    steps = row.get("initial_reason_steps")
    if steps is None or isinstance(steps, str):
        steps = [steps] if steps and steps.strip() else []
    if not isinstance(steps, list) or not all(isinstance(step, str) for step in steps):
        raise RowSkip(
            "initial_reason_steps must be a text or a list of texts (the accepted steps)", "initial_reason_steps"
        )
    prompt = "\n".join(piece.rstrip("\n") for piece in [question, *steps]) + "\n"
    return prompt, _text(row, "chosen"), _text(row, "rejected")


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowSkip(f"{field} is missing", field)
    if not isinstance(value, str):
        raise RowSkip(f"{field} must be a string (step_dpo rows are text), got {type(value).__name__}", field)
    if not value.strip():
        raise RowSkip(f"{field} is empty or whitespace-only", field)
    return value
