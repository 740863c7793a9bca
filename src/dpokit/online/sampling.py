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

Backends (online/backends.py): Hugging Face `generate` (default), or vLLM when it is installed and a
GPU is present. Prompts are read and rendered by online/prompts.py; the model is loaded by
online/loading.py, with the safety checks of `dpokit train` (model.trust_remote_code, model.allow_pickle; or
--trust-remote-code, --allow-pickle). Every setting is a config key (sampling.*, io.*, model.*): the flags are
their aliases (SAMPLE_FLAGS), and `dpokit sample CONFIG key=value` reads them from a YAML file too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dpokit.config import SAMPLING_BACKENDS, Config, SamplingConfig
from dpokit.config.flags import Flag, Verb, require
from dpokit.data.records import DataError
from dpokit.inputs import iter_lines, loads_bounded
from dpokit.online.backends import make_backend
from dpokit.online.loading import TRUST_FLAGS, ModelTrust
from dpokit.online.prompts import Prompt, describe_counts, load_prompts, prompt_key, render_prompt


@dataclass
class SamplingReport:
    path: Path
    prompts: int  # distinct prompts asked for
    already_done: int  # found complete in the file and skipped
    generated: int  # prompts generated in this call
    generate_calls: int
    rows: int  # completion rows now in the file
    seconds: float


# --- the resumable job --------------------------------------------------------------------------


def _settings(cfg: SamplingConfig, model_id: str) -> dict:
    settings = dataclasses.asdict(cfg)
    settings.pop("backend")
    settings.pop("batch_size")  # what decides the samples is the chunking (each chunk has its own seed)
    settings["prompts_per_chunk"] = cfg.prompts_per_chunk
    settings["model"] = model_id
    return settings


def read_samples(
    path: str | Path, label: str = "", must_exist: bool = False, needs: tuple[str, ...] = ("prompt", "completion")
) -> list[dict]:
    """Every row of a samples (or scored) JSONL file, read through the input gateway.

    A torn last line (an interrupted append: no final line break) is ignored; any other line that is not
    a JSON object holding the `needs` fields is an error naming the line. A missing file is no rows for
    an output being resumed, and an error for an input (`must_exist`).
    """
    if not must_exist and not os.path.lexists(path):
        return []
    shown = f"{label} {path}" if label else str(path)
    rows = []
    for number, raw in iter_lines(path, "samples", label):
        if not raw.strip():
            continue
        try:
            row = loads_bounded(raw)
        except ValueError as error:  # JSONDecodeError, JSONTooDeep, bad UTF-8
            if not raw.endswith(b"\n"):  # the last line, cut off mid-write: resumable, not damage
                break
            raise DataError(f"line {number} is not valid JSON ({str(error)[:80]})", shown, row=number) from None
        if not isinstance(row, dict):
            raise DataError(f"line {number} is not a JSON object", shown, row=number)
        missing = [name for name in needs if name not in row]
        if missing:
            raise DataError(
                f"line {number} has no {missing[0]!r} (not a dpokit samples file?)", shown, row=number, field=missing[0]
            )
        rows.append(row)
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
            raise DataError(
                f"exists with other sampling settings ({what}); use another output path or delete it", str(out)
            )
    side.write_text(json.dumps(settings, indent=2) + "\n")


def _distinct(prompts: list[Prompt]) -> tuple[list[str], list[Prompt]]:
    """The prompts without repeats (each kept where it first comes) and their keys."""
    keys, unique = [], []
    seen: set[str] = set()
    for p in prompts:
        k = prompt_key(p)
        if k not in seen:
            seen.add(k)
            keys.append(k)
            unique.append(p)
    return keys, unique


def _whole_prompts(out: Path, keys: list[str], num_samples: int) -> tuple[dict[str, list[dict]], list[dict]]:
    """The prompts already complete in `out` (by key) and the rows of those not among `keys` (an earlier, longer list).

    Torn or partial groups are cut from the file, so it holds only whole prompts.
    """
    rows = read_samples(out)
    done = complete_groups(rows, num_samples)
    asked = set(keys)
    kept = [r for k in keys if k in done for r in done[k]]
    extra = [r for k, g in done.items() if k not in asked for r in g]
    if len(kept) + len(extra) != len(rows):
        _rewrite(out, kept + extra)
    return done, extra


def _rows(todo: list[tuple[int, Prompt]], samples: list, num_samples: int) -> list[dict]:
    """The file's rows for a chunk's (prompt index, prompt)s, from the backend's samples (num_samples per prompt)."""
    rows = []
    for n, (index, prompt) in enumerate(todo):
        for j in range(num_samples):
            s = samples[n * num_samples + j]
            rows.append(
                {
                    "prompt": prompt,
                    "prompt_index": index,
                    "sample_index": j,
                    "completion": s.completion,
                    "prompt_tokens": len(s.prompt_ids),
                    "completion_tokens": len(s.completion_ids),
                    "finished": bool(s.finished),
                }
            )
    return rows


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
    keys, unique = _distinct(prompts)
    done, extra = _whole_prompts(out, keys, cfg.num_samples)
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
        append_rows(out, _rows(todo, samples, cfg.num_samples))
        generated += len(todo)
        if progress is not None:
            progress(already + generated, len(unique))
    total_rows = (already + generated) * cfg.num_samples + len(extra)
    return SamplingReport(out, len(unique), already, generated, calls, total_rows, round(time.time() - started, 2))


def samples_by_prompt(
    path: str | Path, prompts: list[Prompt] | None = None, num_samples: int | None = None, label: str = ""
) -> list[list[dict]]:
    """Rows of a samples/scored file grouped per prompt (in file order, or in the order of `prompts`)."""
    rows = read_samples(path, label=label, must_exist=True)
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

Every flag is an alias of a config key (shown in its help), so the settings can come from a YAML
file and key=value overrides too, as for `dpokit train` (the flags win over CONFIG, key=value over both):

  dpokit sample sample.yaml sampling.num_samples=8 io.out=samples.jsonl
"""


SAMPLE_FLAGS = (
    Flag(("--model",), "model.name_or_path", "model folder, hub id, or demo:sentiment-sft (required)", dest="model"),
    Flag(("--prompts",), "io.prompts", "data file with prompts, anything data.path accepts (required)", dest="prompts"),
    Flag(("--out",), "io.out", "output JSONL, appended to; resumable (required)", dest="out"),
    Flag(("-n", "--num-samples"), "sampling.num_samples", "completions per prompt"),
    Flag(("--temperature",), "sampling.temperature", "0: greedy"),
    Flag(("--top-p",), "sampling.top_p"),
    Flag(("--max-new-tokens",), "sampling.max_new_tokens"),
    Flag(("--seed",), "sampling.seed"),
    Flag(("--batch-size",), "sampling.batch_size", "sequences per generate call"),
    Flag(("--backend",), "sampling.backend", choices=SAMPLING_BACKENDS),
    Flag(("--split",), "io.split", "the prompts' split when they are a dataset with splits"),
    Flag(("--prompt-column",), "io.prompt_column"),
    Flag(("--max-prompts",), "io.max_prompts", "only the first N prompts"),
    *TRUST_FLAGS,
)


def run_cli(cfg: Config) -> int:
    """`dpokit sample` on its config: model.*, sampling.*, io.prompts, io.split, io.prompt_column, io.max_prompts, io.out."""
    import transformers  # lazy: keeps `dpokit --help` fast; every verb that runs a model imports it anyway

    model = require(cfg, "model.name_or_path", "--model", "the model to sample")
    prompts_path = require(cfg, "io.prompts", "--prompts", "the prompts file")
    out = require(cfg, "io.out", "--out", "the output file")
    transformers.utils.logging.disable_progress_bar()
    prompts, counts = load_prompts(prompts_path, cfg.io.split, cfg.io.prompt_column, cfg.io.max_prompts)
    print(f"[sample] {describe_counts(counts)}", flush=True)
    backend = make_backend(cfg.sampling, model, trust=ModelTrust.of(cfg.model))

    def progress(done: int, total: int) -> None:
        print(f"[sample] {done}/{total} prompts", flush=True)

    report = sample_to_file(prompts, out, cfg.sampling, backend, model_id=model, progress=progress)
    print(
        f"[sample] {report.generated} prompts generated, {report.already_done} already done; "
        f"{report.rows} rows in {report.path} ({report.seconds:.1f}s, backend {backend.name})"
    )
    return 0


VERB = Verb("sample", "sample N completions per prompt (resumable)", SAMPLE_HELP, run_cli, flags=SAMPLE_FLAGS)
