"""`dpokit sample`: N completions per prompt, batched, written to JSONL, resumable after an interruption.

    dpokit sample --model runs/sft/final --prompts prompts.jsonl --out samples.jsonl -n 8 --max-new-tokens 256

Output: one JSON object per completion, prompt-major,

    {"prompt": <as read: text or messages>, "prompt_index": i, "sample_index": j, "completion": text,
     "prompt_tokens": n, "completion_tokens": m, "finished": true}

`completion_tokens` counts the generated tokens including the EOS; `finished` says the completion
ended with EOS within max_new_tokens (an unfinished one was cut off). A conversational prompt (a
list of messages) is rendered with the tokenizer's chat template and the generation prompt; the
completion is the assistant's reply text.

Resuming. Prompts are processed in fixed chunks of max(1, batch_size // num_samples) prompts, each
chunk one `generate` call; a chunk's rows are appended with one write, flushed and fsynced, so the
file only ever holds whole prompts (a torn last line from a crash is cut off on restart, and a prompt
with fewer than num_samples rows is dropped and regenerated). On restart the prompts already in the
file are not generated again. Each chunk has its own seed, derived from `seed` and the chunk's
position, so an interrupted-and-resumed run writes the same file as an uninterrupted one.
A `<out>.settings.json` beside the file records the sampling settings and the model; resuming with
other settings is refused (use another --out, or delete the file).

Backends: Hugging Face `generate` through `dpokit.generation.sample` (default), or vLLM when it is
installed and a GPU is present (`backend: auto` picks it then; `vllm` requires it). The vLLM path is
a guarded import, untested on CPU-only machines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from dpokit.data.records import DataError

Prompt = Union[str, list]  # text, or a list of chat messages


@dataclass
class SamplingConfig:
    num_samples: int = 4  # completions per prompt
    temperature: float = 1.0  # 0 = greedy (then every sample of a prompt is the same)
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 64  # sequences per generate call; a chunk holds max(1, batch_size // num_samples) prompts
    backend: str = "auto"  # auto | hf | vllm

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        if self.backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"backend must be auto, hf or vllm, got {self.backend!r}")

    @property
    def prompts_per_chunk(self) -> int:
        return max(1, self.batch_size // self.num_samples)


@dataclass
class SamplingReport:
    path: Path
    prompts: int  # distinct prompts asked for
    already_done: int  # found complete in the file and skipped
    generated: int  # prompts generated in this call
    generate_calls: int
    rows: int  # completion rows now in the file
    seconds: float


# --- models and paths ---------------------------------------------------------------------------


def resolve_model_path(spec: str) -> str:
    """`demo:sentiment-sft` (the embedded demo's SFT model, built on first use) or a folder / hub id as given."""
    from dpokit.demo.assets import PREFIX, demo_paths

    if spec.startswith(PREFIX):
        paths = demo_paths()
        key = spec[len(PREFIX) :]
        if key not in paths:
            raise DataError(f"unknown demo asset {spec!r}; known: {', '.join(PREFIX + k for k in paths)}")
        return paths[key]
    return spec


def load_model(spec: str, dtype: str = "auto", device: str | None = None):
    """(model in eval mode, tokenizer) from a folder, hub id or demo: name; on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpokit.models import DTYPES, ModelLoadError

    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model {spec!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


# --- prompts ------------------------------------------------------------------------------------


def prompt_key(prompt: Prompt) -> str:
    """The identity of a prompt in a samples file: the text itself, or its messages as canonical JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def render_prompt(prompt: Prompt, tokenizer) -> str:
    """The text the model continues: the prompt itself, or the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("conversational prompts need a tokenizer with a chat template, and this one has none")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _prompt_of_row(row: dict, column: str) -> Prompt | None:
    from dpokit.data.layouts import RowSkip, detect_layout, to_example

    if column in row and row[column] not in (None, "", []):
        value = row[column]
    elif "messages" in row and isinstance(row["messages"], list) and row["messages"]:
        value = row["messages"]
        if isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
            value = value[:-1]  # a finished conversation: the prompt is what comes before the last reply
    else:
        layout = detect_layout(row)
        if layout is None:
            return None
        try:
            value = to_example(row, layout).prompt
        except RowSkip:
            return None
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        return value
    return None


def load_prompts(path: str, split: str = "train", column: str = "prompt", max_prompts: int | None = None) -> tuple[list[Prompt], dict]:
    """Distinct prompts of a data file, in order: a `column` (text or messages), `messages` minus the
    last assistant turn, or the prompt of any preference layout. -> (prompts, counts)."""
    from dpokit.data.loading import read_rows

    prompts: list[Prompt] = []
    seen: set[str] = set()
    counts = {"rows_read": 0, "prompts": 0, "duplicates": 0, "rows_without_prompt": 0}
    for _, row in read_rows(path, split):
        counts["rows_read"] += 1
        prompt = _prompt_of_row(row, column)
        if prompt is None:
            counts["rows_without_prompt"] += 1
            continue
        key = prompt_key(prompt)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        prompts.append(prompt)
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    counts["prompts"] = len(prompts)
    if not prompts:
        raise DataError(f"no prompts found (looked for a {column!r} column, `messages`, or a preference layout)", path)
    return prompts, counts


# --- backends -----------------------------------------------------------------------------------


class HFBackend:
    """`transformers` generate through `dpokit.generation.sample` (left padding, seeded, EOS-trimmed)."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, texts: list[str], cfg: SamplingConfig, seed: int) -> list:
        """-> num_samples `generation.Sample`s per text, prompt-major."""
        from dpokit.generation import sample

        return sample(self.model, self.tokenizer, texts, num_samples=cfg.num_samples, temperature=cfg.temperature,
                      top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed,
                      batch_size=max(1, len(texts) * cfg.num_samples))


class VLLMBackend:  # pragma: no cover - needs vllm and a GPU
    """vLLM offline generation; same output as HFBackend (token ids kept, EOS included when generated)."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, **llm_kwargs):
        from vllm import LLM

        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, tokenizer=model_path, **llm_kwargs)

    def generate(self, texts: list[str], cfg: SamplingConfig, seed: int) -> list:
        from vllm import SamplingParams

        from dpokit.generation import Sample

        eos = self.tokenizer.eos_token_id
        params = SamplingParams(n=cfg.num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_tokens=cfg.max_new_tokens, seed=seed)
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        samples = []
        for text, ids, out in zip(texts, prompt_ids, outputs):
            for c in out.outputs:
                completion_ids = list(c.token_ids)
                finished = c.finish_reason == "stop"
                if finished and (not completion_ids or completion_ids[-1] != eos):
                    completion_ids.append(eos)  # vLLM may leave the stop token out of token_ids
                samples.append(Sample(text, c.text, list(ids), completion_ids, finished))
        return samples


def vllm_available() -> bool:
    import importlib.util

    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def make_backend(cfg: SamplingConfig, model_spec: str, model=None, tokenizer=None):
    """The backend `cfg.backend` asks for; `auto` = vLLM when installed with a GPU (and a model path), else HF."""
    use_vllm = cfg.backend == "vllm" or (cfg.backend == "auto" and model is None and vllm_available())
    if use_vllm:
        if not vllm_available():
            raise RuntimeError("backend 'vllm' needs the vllm package and a CUDA GPU; use backend 'hf'")
        from transformers import AutoTokenizer

        path = resolve_model_path(model_spec)
        return VLLMBackend(path, tokenizer or AutoTokenizer.from_pretrained(path), seed=cfg.seed)
    if model is None:
        model, tokenizer = load_model(model_spec)
    return HFBackend(model, tokenizer)


# --- the resumable job --------------------------------------------------------------------------


def _settings(cfg: SamplingConfig, model_id: str) -> dict:
    settings = dataclasses.asdict(cfg)
    settings.pop("backend")
    settings.pop("batch_size")  # what decides the samples is the chunking (each chunk has its own seed)
    settings["prompts_per_chunk"] = cfg.prompts_per_chunk
    settings["model"] = model_id
    return settings


def read_samples(path: str | Path) -> list[dict]:
    """Every row of a samples (or scored) JSONL file; a torn last line is ignored."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    lines = p.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # the last line (before the final "\n"): an interrupted write
                break
            raise DataError(f"line {i + 1} is not valid JSON", str(path)) from None
    return rows


def complete_groups(rows: list[dict], num_samples: int) -> dict[str, list[dict]]:
    """Rows of the prompts that have all num_samples samples, by prompt key, each sorted by sample_index."""
    groups: dict[str, dict[int, dict]] = {}
    for row in rows:
        groups.setdefault(prompt_key(row["prompt"]), {})[int(row["sample_index"])] = row
    return {k: [g[j] for j in range(num_samples)] for k, g in groups.items() if all(j in g for j in range(num_samples))}


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)


def append_rows(path: Path, rows: list[dict]) -> None:
    """One write, flushed and fsynced: after a crash the file holds all of these rows or a torn last line."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _check_settings(out: Path, settings: dict) -> None:
    side = out.with_name(out.name + ".settings.json")
    if side.exists() and out.exists():
        old = json.loads(side.read_text())
        changed = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise DataError(f"exists with other sampling settings ({what}); use another output path or delete it", str(out))
    side.write_text(json.dumps(settings, indent=2) + "\n")


def sample_to_file(
    prompts: list[Prompt],
    out_path: str | Path,
    cfg: SamplingConfig,
    backend,
    tokenizer=None,
    model_id: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> SamplingReport:
    """Sample cfg.num_samples completions for every prompt into `out_path`, skipping prompts already there.

    backend: an object with `generate(texts, cfg, seed) -> samples` (HFBackend, VLLMBackend, or a test
    double); tokenizer renders conversational prompts (defaults to the backend's).
    """
    started = time.time()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or getattr(backend, "tokenizer", None)
    _check_settings(out, _settings(cfg, model_id))
    keys, unique = [], []
    seen: set[str] = set()
    for p in prompts:
        k = prompt_key(p)
        if k not in seen:
            seen.add(k)
            keys.append(k)
            unique.append(p)
    rows = read_samples(out)
    done = complete_groups(rows, cfg.num_samples)
    kept = [r for k in keys if k in done for r in done[k]]
    extra = [r for k, g in done.items() if k not in seen for r in g]  # prompts of an earlier, longer list
    if len(kept) + len(extra) != len(rows):  # torn or partial groups: keep only whole prompts
        _rewrite(out, kept + extra)
    already = sum(k in done for k in keys)
    step = cfg.prompts_per_chunk
    calls = generated = 0
    for chunk_index, start in enumerate(range(0, len(unique), step)):
        todo = [(start + i, p) for i, p in enumerate(unique[start : start + step]) if keys[start + i] not in done]
        if not todo:
            continue
        texts = [render_prompt(p, tokenizer) for _, p in todo]
        samples = backend.generate(texts, cfg, seed=cfg.seed * 1_000_003 + chunk_index)
        calls += 1
        if len(samples) != len(todo) * cfg.num_samples:
            raise RuntimeError(f"backend returned {len(samples)} samples for {len(todo)} prompts x {cfg.num_samples}")
        new_rows = []
        for n, (index, prompt) in enumerate(todo):
            for j in range(cfg.num_samples):
                s = samples[n * cfg.num_samples + j]
                new_rows.append({"prompt": prompt, "prompt_index": index, "sample_index": j, "completion": s.completion,
                                 "prompt_tokens": len(s.prompt_ids), "completion_tokens": len(s.completion_ids),
                                 "finished": bool(s.finished)})
        append_rows(out, new_rows)
        generated += len(todo)
        if progress is not None:
            progress(already + generated, len(unique))
    total_rows = (already + generated) * cfg.num_samples + len(extra)
    return SamplingReport(out, len(unique), already, generated, calls, total_rows, round(time.time() - started, 2))


def samples_by_prompt(path: str | Path, prompts: list[Prompt] | None = None, num_samples: int | None = None) -> list[list[dict]]:
    """Rows of a samples/scored file grouped per prompt (in file order, or in the order of `prompts`)."""
    rows = read_samples(path)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(prompt_key(row["prompt"]), []).append(row)
    for g in groups.values():
        g.sort(key=lambda r: r.get("sample_index", 0))
    if prompts is None:
        return list(groups.values())
    return [groups[prompt_key(p)] for p in prompts if prompt_key(p) in groups]


# --- CLI ----------------------------------------------------------------------------------------

SAMPLE_HELP = """\
Sample N completions per prompt from a model, into a JSONL file (one row per completion:
prompt, completion, prompt_tokens, completion_tokens, finished). Interrupted runs resume:
rerun the same command and the prompts already in --out are not generated again.

  dpokit sample --model runs/sft/final --prompts prompts.jsonl --out samples.jsonl -n 8
  dpokit sample --model demo:sentiment-sft --prompts prompts.jsonl --out s.jsonl --temperature 0.7 --top-p 0.9

Prompts come from a `prompt` column (text or chat messages; --prompt-column renames it),
a `messages` column (the last assistant turn is left out), or any preference layout.
Conversational prompts go through the model's chat template.
"""


def add_cli(verbs) -> None:
    import argparse

    p = verbs.add_parser("sample", help="sample N completions per prompt (resumable)", description=SAMPLE_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, hub id, or demo:sentiment-sft")
    p.add_argument("--prompts", required=True, help="data file with prompts (anything data.path accepts)")
    p.add_argument("--out", required=True, help="output JSONL (appended to; resumable)")
    p.add_argument("-n", "--num-samples", type=int, default=4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (default 64)")
    p.add_argument("--backend", choices=("auto", "hf", "vllm"), default="auto")
    p.add_argument("--split", default="train")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--max-prompts", type=int, default=None)
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = SamplingConfig(args.num_samples, args.temperature, args.top_p, args.max_new_tokens, args.seed, args.batch_size, args.backend)
    prompts, counts = load_prompts(args.prompts, args.split, args.prompt_column, args.max_prompts)
    print(f"[sample] {counts['prompts']} prompts ({counts['duplicates']} duplicates, {counts['rows_without_prompt']} rows without a prompt)", flush=True)
    backend = make_backend(cfg, args.model)

    def progress(done: int, total: int) -> None:
        print(f"[sample] {done}/{total} prompts", flush=True)

    report = sample_to_file(prompts, args.out, cfg, backend, model_id=args.model, progress=progress)
    print(f"[sample] {report.generated} prompts generated, {report.already_done} already done; "
          f"{report.rows} rows in {report.path} ({report.seconds:.1f}s, backend {backend.name})")
    return 0
