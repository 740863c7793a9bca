"""`dpokit pipeline CONFIG`: rounds of sample -> score -> pair -> DPO, each round's policy sampling the next.

    round 0   evaluate the SFT model on the held-out prompts (the baseline of every later round)
    round k   sample   policy_{k-1} (the SFT model for k = 1) on the round's prompts, N per prompt
              score    every completion with the scorer
              pair     best vs worst per prompt (or all pairs above a margin; ties dropped and counted)
              dpo      `dpokit train` on the pairs, starting from policy_{k-1}, with the reference
                       fixed (the SFT model; default) or refreshed (policy_{k-1}, `reference: refresh`)
              eval     policy_k on the held-out prompts against the SFT model: mean score, win rate,
                       KL(policy_k || SFT) in nats, length and its change

Everything a round makes sits in its own folder:

    out_dir/pipeline.yaml            the resolved pipeline config
    out_dir/round_0/eval.json        the SFT model's metrics
    out_dir/round_k/samples.jsonl    completions (resumable)       round_k/scored.jsonl  with scores
    out_dir/round_k/pairs.jsonl      DPO pairs (+ .summary.json)   round_k/dpo/          a dpokit run dir
    out_dir/round_k/eval.json        metrics (+ eval_samples.jsonl)
    out_dir/round_k/round.json       written last: the round is finished
    out_dir/summary.json, summary.md one row per round

Resuming is at round granularity: a round with round.json is skipped on restart. Inside an
unfinished round, finished steps are kept too (sampled prompts are not sampled again, scored rows
not scored again, a saved DPO model not retrained, a written eval not rerun).

Note: a fixed reference from round 2 on needs the trainer to load the reference from its own path
(`model.ref_name_or_path`); `reference: refresh` works with any trainer.

The config (PipelineConfig, load_pipeline_config) is in config.py, loaded like `dpokit train`'s.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

import yaml

from dpokit.config import ConfigError, PipelineConfig, load_config, load_pipeline_config, resolve_config_path
from dpokit.config.flags import Verb
from dpokit.demo.assets import resolve_demo_names
from dpokit.inputs import read_json
from dpokit.online.backends import make_backend, vllm_available
from dpokit.online.evaluation import draw, evaluate
from dpokit.online.loading import ModelTrust, load_model, resolve_model_path
from dpokit.online.pairing import format_summary, pair_file
from dpokit.online.prompts import describe_counts, load_prompts
from dpokit.online.sampling import sample_to_file
from dpokit.online.scoring import build_scorer, score_file
from dpokit.training.loop import train
from dpokit.training.run_dir import LOCK, MARKER, claim


def resolve_prompts(source: Union[str, list], column: str = "prompt", key: str = "prompts") -> list:
    """A list of prompts from a list, a data file, or a demo: name (demo:openings-train|eval|all: the review world's
    openings), resolved by the one resolver of demo: names; `key` is the config key named in its errors."""
    if isinstance(source, list):
        return list(source)
    resolved = resolve_demo_names({key: source}, ConfigError, prompt_sets=True)[key]
    if isinstance(resolved, list):
        return resolved
    prompts, counts = load_prompts(resolved, column=column)
    print(f"[pipeline] {source}: {describe_counts(counts)}", flush=True)
    return prompts


@contextmanager
def _timed(timings: dict, stage: str):
    """timings[stage]: the seconds the block took."""
    started = time.time()
    yield
    timings[stage] = round(time.time() - started, 1)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    tmp.replace(path)


def train_source(cfg: PipelineConfig):
    """The pipeline's dpokit train config: its mapping, or the path of its YAML file or shipped name."""
    return resolve_config_path(cfg.train) if isinstance(cfg.train, str) else dict(cfg.train or {})


def model_trust(cfg: PipelineConfig) -> ModelTrust:
    """The one trust switch, train.model.trust_remote_code / train.model.allow_pickle (the keys every verb reads):
    it covers every model the pipeline loads (the policies it samples and evaluates, a reward model) and training's.
    The deprecated top-level keys it replaces (PipelineConfig warns) still switch it on, for one release."""
    model = load_config(train_source(cfg)).model
    return ModelTrust(
        model.trust_remote_code or cfg.trust_remote_code, model.allow_pickle or cfg.allow_pickle, where="pipeline"
    )


class Pipeline:
    """Runs (or resumes) the rounds of a PipelineConfig; `run()` returns the per-round summary."""

    def __init__(self, cfg: PipelineConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out_dir)
        self.trust = model_trust(cfg)  # the one trust switch: every model the pipeline loads, and training's
        self.sft_path = resolve_model_path(cfg.policy)
        self.scorer = build_scorer(cfg.scorer, self.trust)
        self.prompts = resolve_prompts(cfg.prompts, cfg.prompt_column)
        self.eval_prompts = (
            None if cfg.eval_prompts is None else resolve_prompts(cfg.eval_prompts, cfg.prompt_column, "eval_prompts")
        )
        if self.eval_prompts is not None and cfg.eval.max_prompts is not None:
            self.eval_prompts = self.eval_prompts[: cfg.eval.max_prompts]
        self.eval_pairs = cfg.eval.pairs and resolve_model_path(cfg.eval.pairs)  # demo:sentiment-eval: the built pairs
        self._sft = None  # (model, tokenizer), loaded once
        self._baseline_samples = None

    # -- helpers ---------------------------------------------------------------------------------

    def _written(self, path: Path):
        """A stage's result the pipeline wrote earlier (a resumed run), read through the input gateway: a regular
        file inside out_dir, within the run-file limit; a FIFO, a device or a link out of out_dir is refused."""
        return read_json(path, "run", "pipeline file", within=self.out)

    def _load(self, path: str):
        return load_model(path, self.trust)

    def sft(self):
        if self._sft is None:
            self._sft = self._load(self.sft_path)
        return self._sft

    def round_dir(self, k: int) -> Path:
        return self.out / f"round_{k}"

    def policy_path(self, k: int) -> str:
        """The policy after round k (round 0: the SFT model)."""
        return self.sft_path if k == 0 else str(self.round_dir(k) / "dpo" / "final")

    def round_prompts(self, k: int) -> list:
        n = self.cfg.prompts_per_round
        if n is None or n >= len(self.prompts):
            return list(self.prompts)
        return random.Random(self.cfg.seed * 1_000_003 + k).sample(self.prompts, n)

    def _eval(self, k: int, policy, tokenizer) -> dict:
        e = dataclasses.replace(
            self.cfg.eval, max_new_tokens=self.cfg.eval.max_new_tokens or self.cfg.sampling.max_new_tokens
        )
        reference, _ = self.sft()
        if self._baseline_samples is None:  # the SFT model's samples: the baseline of every round, drawn once
            self._baseline_samples = draw(
                reference,
                tokenizer,
                self.eval_prompts,
                e.num_samples,
                e.temperature,
                e.top_p,
                e.max_new_tokens,
                e.seed + 1,
                self.cfg.sampling.batch_size,
            )
        return evaluate(
            policy,
            tokenizer,
            self.eval_prompts,
            e,
            reference=reference,
            baseline=self._baseline_samples,
            scorer=self.scorer,
            pairs=self.eval_pairs,
            batch_size=self.cfg.sampling.batch_size,
            samples_out=self.round_dir(k) / "eval_samples.jsonl",
        )

    # -- rounds ----------------------------------------------------------------------------------

    def run_round_zero(self) -> dict:
        rdir = self.round_dir(0)
        done = rdir / "round.json"
        if done.exists():
            return self._written(done)
        rdir.mkdir(parents=True, exist_ok=True)
        record: dict = {"round": 0, "policy": self.sft_path}
        if self.eval_prompts is not None:
            model, tokenizer = self.sft()
            started = time.time()
            record["eval"] = self._eval(0, model, tokenizer)
            _write_json(rdir / "eval.json", record["eval"])
            self.log(f"[pipeline] round 0 (SFT): {_eval_line(record['eval'])} ({time.time() - started:.0f}s)")
        _write_json(done, record)
        return record

    def run_round(self, k: int) -> dict:
        rdir = self.round_dir(k)
        done = rdir / "round.json"
        if done.exists():
            self.log(f"[pipeline] round {k}: finished earlier, skipped")
            return self._written(done)
        rdir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        record: dict = {"round": k, "policy_in": self.policy_path(k - 1)}
        timings: dict = {}
        with _timed(timings, "sample"):
            record["sampling"] = self.sample_round(k)
        with _timed(timings, "score"):
            record["scoring"] = score_file(rdir / "samples.jsonl", rdir / "scored.jsonl", self.scorer)
        record["pairs"] = self.pair_round(k)
        with _timed(timings, "dpo"):
            record["train"] = self.dpo_round(k)
        if self.eval_prompts is not None:
            with _timed(timings, "eval"):
                record["eval"] = self.eval_round(k)
            self.log(f"[pipeline] round {k}: {_eval_line(record['eval'])}")
        record["policy_out"] = self.policy_path(k)
        record["seconds"] = timings
        record["wall_seconds"] = round(time.time() - started, 1)
        _write_json(done, record)
        return record

    def sample_round(self, k: int) -> dict:
        """policy_{k-1} samples the round's prompts into samples.jsonl (prompts sampled before are kept)."""
        sampling = dataclasses.replace(self.cfg.sampling, seed=self.cfg.sampling.seed + 1000 * k)
        model_dir = self.policy_path(k - 1)
        if sampling.backend == "vllm" or (sampling.backend == "auto" and vllm_available()):
            backend = make_backend(sampling, model_dir, trust=self.trust)  # vLLM loads the model itself
        else:
            model, tokenizer = self.sft() if k == 1 else self._load(model_dir)
            backend = make_backend(sampling, model_dir, model=model, tokenizer=tokenizer)
        out = self.round_dir(k) / "samples.jsonl"
        report = sample_to_file(self.round_prompts(k), out, sampling, backend, model_id=model_dir)
        return {
            "prompts": report.prompts,
            "generated": report.generated,
            "already_done": report.already_done,
            "rows": report.rows,
        }

    def pair_round(self, k: int) -> dict:
        """scored.jsonl -> pairs.jsonl; a round without a single pair stops the pipeline."""
        rdir = self.round_dir(k)
        summary = pair_file(rdir / "scored.jsonl", rdir / "pairs.jsonl", self.cfg.pairing)
        self.log(f"[pipeline] round {k}: {format_summary(summary)}")
        if summary["pairs"] == 0:
            raise ConfigError(
                f"round {k}: no preference pairs (every prompt tied or below the margin); see {rdir / 'pairs.jsonl.summary.json'}"
            )
        return summary

    def dpo_round(self, k: int) -> dict:
        """`dpokit train` on the round's pairs from policy_{k-1} into round_k/dpo; its metrics (a saved model is kept)."""
        rdir = self.round_dir(k)
        metrics_path = rdir / "dpo" / "train_result.json"
        if (Path(self.policy_path(k)) / "config.json").exists() and metrics_path.exists():
            return self._written(metrics_path)
        overrides = {
            "model.name_or_path": self.policy_path(k - 1),
            "data.path": str(rdir / "pairs.jsonl"),
            "out_dir": str(rdir / "dpo"),
        }
        if self.cfg.reference == "fixed" and k > 1:
            overrides["model.ref_name_or_path"] = self.sft_path
        for key in ("trust_remote_code", "allow_pickle"):  # the switch as resolved (a deprecated top-level key too)
            if getattr(self.trust, key):
                overrides[f"model.{key}"] = True
        result = train(train_source(self.cfg), overrides)
        _write_json(metrics_path, result.metrics)
        return result.metrics

    def eval_round(self, k: int) -> dict:
        """policy_k on the held-out prompts against the SFT model, into eval.json (a written one is kept)."""
        eval_path = self.round_dir(k) / "eval.json"
        if eval_path.exists():
            return self._written(eval_path)
        policy, tokenizer = self._load(self.policy_path(k))
        metrics = self._eval(k, policy, tokenizer)
        _write_json(eval_path, metrics)
        return metrics

    def run(self) -> list[dict]:
        owner = claim_pipeline_dir(self.cfg)  # marked, checked for files dpokit did not write, locked
        try:
            (self.out / "pipeline.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self.cfg), sort_keys=False))
            records = [self.run_round_zero()]
            for k in range(1, self.cfg.rounds + 1):
                records.append(self.run_round(k))
            rows = [summary_row(r) for r in records]
            _write_json(self.out / "summary.json", rows)
            (self.out / "summary.md").write_text(format_summary_table(rows) + "\n")
            self.log(format_summary_table(rows))
            return records
        finally:
            owner.release()


PIPELINE_NAMES = frozenset({"pipeline.yaml", "summary.json", "summary.md", ".summary.json.tmp", MARKER, LOCK})


def claim_pipeline_dir(cfg: PipelineConfig):
    """The pipeline's out_dir, owned as a run directory is (training/run_dir.py): a folder of files dpokit did not
    write is refused in one line (overwrite=true goes on), and one pipeline at a time writes into it. A folder from
    before dpokit marked folders (only the pipeline's names, with its pipeline.yaml or a finished round) resumes."""
    return claim(
        cfg.out_dir,
        cfg.overwrite,
        names=PIPELINE_NAMES,
        prefixes=("round_",),
        was_ours=lambda path: (path / "pipeline.yaml").is_file() or any(path.glob("round_*/round.json")),
    )


def _eval_line(m: dict) -> str:
    parts = [
        f"mean score {m['mean_score']:.3f}" if "mean_score" in m else None,
        f"win rate {m['win_rate']:.1%}" if "win_rate" in m else None,
        f"KL {m['kl_to_reference']:.2f} nats" if "kl_to_reference" in m else None,
        f"length {m['mean_length']:.1f}",
    ]
    return ", ".join(p for p in parts if p)


def summary_row(record: dict) -> dict:
    e = record.get("eval", {})
    t = record.get("train", {})
    p = record.get("pairs", {})
    return {
        "round": record["round"],
        "pairs": p.get("pairs"),
        "train_loss": t.get("loss"),
        "train_accuracy": t.get("rewards/accuracies"),
        "mean_score": e.get("mean_score"),
        "mean_score_sem": e.get("mean_score_sem"),
        "win_rate_vs_sft": e.get("win_rate"),
        "kl_to_sft": e.get("kl_to_reference"),
        "mean_length": e.get("mean_length"),
        "preference_accuracy": e.get("preference_accuracy"),
    }


def format_summary_table(rows: list[dict]) -> str:
    def f(value, fmt):
        return "" if value is None else fmt.format(value)

    lines = [
        "| round | pairs | DPO loss | mean score | win rate vs SFT | KL to SFT (nats) | mean length | held-out pref. acc. |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        score = f(r["mean_score"], "{:.3f}") + (
            f" ± {r['mean_score_sem']:.3f}" if r.get("mean_score_sem") is not None else ""
        )
        lines.append(
            f"| {r['round']} | {f(r['pairs'], '{:d}')} | {f(r['train_loss'], '{:.3f}')} | {score} | "
            f"{f(r['win_rate_vs_sft'], '{:.1%}')} | {f(r['kl_to_sft'], '{:.2f}')} | {f(r['mean_length'], '{:.1f}')} | "
            f"{f(r['preference_accuracy'], '{:.1%}')} |"
        )
    return "\n".join(lines)


PIPELINE_HELP = """\
Run K rounds of online (iterative) DPO: sample N completions per prompt from the current policy,
score them, pair best vs worst, train DPO, evaluate on held-out prompts; the new policy samples
the next round. Every round's data, model and metrics go to out_dir/round_k/; an interrupted
run resumes (finished rounds are skipped).

  dpokit pipeline pipeline_demo                       (the review world, offline, a few minutes)
  dpokit pipeline my_pipeline.yaml rounds=3 sampling.num_samples=8 train.loss.beta=0.2

CONFIG is a YAML file or a shipped name. docs/pipeline.md lists every key.
"""


def _arguments(p) -> None:
    p.add_argument("config", metavar="CONFIG", help="pipeline YAML file or shipped name (pipeline_demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def run_cli(args) -> int:
    import transformers  # lazy: keeps `dpokit --help` fast; the rounds import it anyway

    transformers.utils.logging.disable_progress_bar()  # keep the console for the rounds' own lines
    cfg = load_pipeline_config(resolve_config_path(args.config, "pipelines"), args.overrides)
    records = Pipeline(cfg).run()
    print(f"[pipeline] done: {len(records) - 1} rounds; summary in {Path(cfg.out_dir) / 'summary.md'}")
    return 0


VERB = Verb(
    "pipeline", "online DPO: K rounds of sample, score, pair, train, evaluate", PIPELINE_HELP, run_cli, _arguments
)
