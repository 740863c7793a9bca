"""The verbs `dpokit` runs itself (train, sft, precompute, plan, demo, config, doctor, report): their help, arguments
and handlers, and `verbs()`, the one table every verb is registered in (the online modules each export a `VERB`).

A handler returns the exit status; cli.py parses the command line and turns user errors into status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from dpokit.config import resolve_config_path
from dpokit.config.flags import Verb

TRAIN_HELP = """\
Train a policy with DPO (or another loss of the family) on preference pairs.

CONFIG is a YAML file, or the name of a shipped config (e.g. `demo`).
Any setting can be overridden as key=value, e.g.

  dpokit train my.yaml loss.beta=0.05 train.max_steps=200 out_dir=runs/x
  dpokit train my.yaml model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct lora.enabled=true optim.lr=5e-6

Common keys: model.name_or_path, model.dtype, lora.enabled, data.path,
data.eval_path, data.max_length, data.max_prompt_length, loss.type, loss.beta,
loss.label_smoothing, optim.lr, optim.scheduler, train.batch_size,
train.grad_accum, train.max_steps, train.epochs, train.gradient_checkpointing,
out_dir. speed.* switches the fast paths (all on by default, same numbers as
the plain step; docs/performance.md); the reference's log-probs are cached on
disk, so the reference is not in memory (speed.ref_cache=false keeps it live
and logs kl/chosen). `dpokit config` prints every key with its default.

The run directory (out_dir) gets config.yaml (the resolved config),
data_summary.json, metrics.jsonl (one JSON object per logged step, TRL's
metric names), checkpoints/ (every train.save_steps; a rerun with the same
out_dir resumes, train.resume), final/ (the model in HF format, with its
tokenizer) and report.html (curves, diagnoses, data summary and config;
`dpokit report`). Exit status: 0 when a model was saved, 1 when the run
stopped on non-finite losses, 2 on a configuration or data error.
"""

DEMO_HELP = """\
Show DPO aligning a model, offline, in a few minutes on a laptop CPU.

Builds (once, then cached in $DPOKIT_CACHE or ~/.cache/dpokit) a tiny SFT model
of a made-up review language whose sentiment depends on which words appear,
and preference pairs preferring positive continuations; runs DPO with the
shipped `demo` config; prints a before/after table: share of positive
generations at temperature 1, held-out preference accuracy, KL to the
reference, mean length, and sample generations.
"""


DOCTOR_HELP = """\
Check preference data (and optionally a model) for what makes DPO runs go wrong,
before spending compute: rows that would be dropped, identical, duplicated or
contradictory pairs, length bias, truncation at data.max_length, chat-template
pitfalls (prompt not a token prefix, doubled BOS/EOS, no end-of-turn token), and,
with a model, how likely the reference finds the data and which side it prefers.

  dpokit doctor data.jsonl
  dpokit doctor data.jsonl --model Qwen/Qwen2.5-0.5B-Instruct
  dpokit doctor data.jsonl data.max_length=2048 --config my.yaml --json

key=value overrides go right after DATA (before the --options).

The tokenizer and reference come from --model, else the config's
model.name_or_path; without either, only the text checks run. The config's
data.* settings (layout, columns, max_length, max_prompt_length, eval_fraction)
are applied as in training. Exit status: 1 if a check fails, else 0 (warnings
do not fail). docs/diagnosis.md explains every check.
"""


REPORT_HELP = """\
Write one self-contained HTML page about a run: its verdict (healthy, warnings,
stopped), the failure detectors' diagnoses with what to do, curves of loss,
rewards, margins, accuracy, log-probs, KL, completion length, learning rate and
gradient norm (train and eval), the data summary and the resolved config.

  dpokit report runs/demo
  dpokit report runs/demo --out demo-report.html

The page has no scripts and loads nothing from the network: open it anywhere,
attach it to an issue. It works on a run that is still going or was cut short;
what is missing is listed in its notes. docs/report.md explains every chart.
"""


def _finished(result, keys: list[str]) -> int:
    """Print a run's final metrics; exit status 1 when it stopped on non-finite values (no final model), else 0."""
    shown = "  ".join(f"{k}={result.metrics[k]:.4f}" for k in keys if isinstance(result.metrics.get(k), float))
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch every process returns here; one reports
        print(f"[dpokit] final: {shown}")
        print(f"[dpokit] run directory: {result.run_dir}")
    if result.stop_reason == "non_finite":
        print(
            "dpokit: error: the run stopped on non-finite losses or gradients; no final model was saved (see above)",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_train(args) -> int:
    from dpokit.training.loop import train

    result = train(resolve_config_path(args.config), args.overrides)
    # train() has written report.html (dpokit.report.write_report)
    return _finished(
        result,
        [
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "kl/chosen",
            "eval_loss",
            "eval_rewards/accuracies",
            "eval_kl/chosen",
        ],
    )


PRECOMPUTE_HELP = """\
Compute the reference model's log-probs of every training and eval pair once and store them
on disk (speed.ref_cache), as a job of its own. `dpokit train` with the same CONFIG then finds
them: it builds no reference model and runs no reference forward.

  dpokit precompute my.yaml
  dpokit precompute my.yaml speed.ref_cache_dir=/data/ref_cache   # and the same key when training

The cache is keyed by the reference weights, tokenizer, data and tokenisation settings; any change
makes a new one (docs/performance.md). `dpokit train` builds it itself on a miss, so this verb is
only needed to do that work apart (another machine, a queue slot) or to check that it is up to date.
Paired losses with a reference only (not KTO, not reference-free losses).
"""


def _cmd_precompute(args) -> int:
    from dpokit.ref_cache.build import precompute_reference

    precompute_reference(resolve_config_path(args.config), args.overrides)
    return 0


def _cmd_plan(args) -> int:
    from dpokit.config import load_config
    from dpokit.plan import format_plan, parse_size, plan_memory, read_model_shape, suggestions

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    shape = read_model_shape(cfg.model.name_or_path, cfg.model.revision)
    plan = plan_memory(cfg, shape, args.gpus, parse_size(args.gpu_memory) if args.gpu_memory else None)
    print(format_plan(cfg, plan, suggestions(cfg, shape, plan)))
    return 0 if plan.fits is not False else 1


def _cmd_report(args) -> int:
    from dpokit.report import build_report

    if not Path(args.run_dir).is_dir():
        print(f"dpokit: error: run directory not found: {args.run_dir}", file=sys.stderr)
        return 2
    print(f"[dpokit] report: {build_report(args.run_dir, out=args.out)}")
    return 0


SFT_HELP = """\
Supervised fine-tuning with a completion-only loss (the prompt is masked): the same config,
data loading, run directory and outputs as `dpokit train`, with train.task=sft.

  dpokit sft my.yaml data.path=sft.jsonl model.name_or_path=Qwen/Qwen2.5-0.5B optim.lr=2e-5

Rows: prompt + completion (text or conversational), messages (the last assistant turn is the
completion), or preference pairs (their chosen side). Logged: loss (mean NLL per completion
token), mean_token_accuracy, num_tokens (running total of input tokens). loss.* keys are ignored.
"""


def _cmd_sft(args) -> int:
    from dpokit.training.loop import train

    result = train(resolve_config_path(args.config), list(args.overrides) + ["train.task=sft"])
    return _finished(result, ["loss", "mean_token_accuracy", "eval_loss", "eval_mean_token_accuracy"])


def _cmd_demo(args) -> int:
    from dpokit.online.demo import run_demo

    run_demo(out_dir=args.out_dir, overrides=args.overrides)
    return 0


def _cmd_config(args) -> int:
    import yaml

    from dpokit.config import ConfigError, load_config

    if args.from_file:
        from dpokit.config.loading import read_config_mapping
        from dpokit.config.translate import translate

        if args.config or args.overrides:
            raise ConfigError(
                "--from FILE takes no CONFIG or key=value: translate first, then `dpokit config OUT key=value`"
            )
        translation = translate(read_config_mapping(args.from_file), args.from_file)
        print(translation.to_yaml(), end="")
        try:  # printed either way, so what does not load yet can be edited
            load_config(translation.nested())
        except ConfigError as e:
            raise ConfigError(f"the translation of {args.from_file} above does not load yet: {e}") from None
        return 0
    cfg = load_config(resolve_config_path(args.config) if args.config else None, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_doctor(args) -> int:
    from dpokit.doctor import format_report, run_doctor

    config = resolve_config_path(args.config) if args.config else None
    report = run_doctor(
        args.data, model=args.model, config_path=config, overrides=args.overrides, sample_size=args.sample
    )
    print(report.to_json() if args.json else format_report(report))
    return 1 if report.verdict == "fail" else 0


PLAN_HELP = """\
Predict the peak memory per GPU of `dpokit train CONFIG` from the model's config.json (no weights
loaded), say whether it fits, and what to change if not (docs/performance.md). Exit status 1 when
it does not fit.
"""


def _config_positionals(config_help: str, overrides_help: str = "config overrides"):
    """CONFIG key=value...: the arguments of the verbs that read a training config."""

    def add(p) -> None:
        p.add_argument("config", metavar="CONFIG", help=config_help)
        p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)

    return add


def _plan_arguments(p) -> None:
    _config_positionals("YAML file or shipped config name", "config overrides, as for train")(p)
    p.add_argument(
        "--gpus", type=int, default=1, metavar="N", help="GPUs; N > 1 assumes FSDP/ZeRO-3 sharding (default: 1)"
    )
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory per GPU, e.g. 80GB or 24GiB")


def _demo_arguments(p) -> None:
    p.add_argument("--out-dir", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo config, e.g. loss.beta=0.2")


def _config_arguments(p) -> None:
    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML file or shipped config name")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="translate an Axolotl DPO YAML or TRL DPOConfig arguments (YAML/JSON) into a dpokit YAML on stdout",
    )


def _doctor_arguments(p) -> None:
    p.add_argument(
        "data", metavar="DATA", help="preference file, saved dataset folder or hub id (anything data.path accepts)"
    )
    p.add_argument(
        "--model",
        help="model folder or hub id for the token and reference checks (default: the config's model.name_or_path)",
    )
    p.add_argument("--config", help="YAML file or shipped config name whose data.* settings apply")
    p.add_argument(
        "--sample",
        type=int,
        default=256,
        metavar="N",
        help="pairs scored by the reference model (default: 256; 0: do not load it)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.max_length=2048")


def _report_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (out_dir of `dpokit train`)")
    p.add_argument("--out", metavar="FILE", help="where to write the page (default: RUN_DIR/report.html)")


def verbs() -> tuple[Verb, ...]:
    """Every verb, in `dpokit --help`'s order: the one table a verb is registered in."""
    from dpokit.online import evaluation, pairing, pipeline, sampling, scoring  # lazy: only when the parser is built

    return (
        Verb(
            "train",
            "train on preference pairs",
            TRAIN_HELP,
            _cmd_train,
            _config_positionals("YAML file or shipped config name (demo)"),
        ),
        Verb(
            "sft",
            "supervised fine-tuning (completion-only loss)",
            SFT_HELP,
            _cmd_sft,
            _config_positionals("YAML file or shipped config name"),
        ),
        Verb(
            "precompute",
            "cache the reference log-probs of a training config",
            PRECOMPUTE_HELP,
            _cmd_precompute,
            _config_positionals(
                "YAML file or shipped config name (the one you will train with)", "config overrides, as for train"
            ),
        ),
        Verb(
            "plan", "predict peak GPU memory of a training config, part by part", PLAN_HELP, _cmd_plan, _plan_arguments
        ),
        sampling.VERB,
        scoring.VERB,
        pairing.VERB,
        pipeline.VERB,
        evaluation.VERB,
        Verb("demo", "offline end-to-end demo with a before/after table", DEMO_HELP, _cmd_demo, _demo_arguments),
        Verb(
            "config",
            "print the resolved config (every key with its value)",
            "Print the resolved config: defaults, then CONFIG, then key=value overrides.",
            _cmd_config,
            _config_arguments,
        ),
        Verb(
            "doctor", "check preference data (and a model) before training", DOCTOR_HELP, _cmd_doctor, _doctor_arguments
        ),
        Verb(
            "report",
            "write a run's HTML report (curves, diagnoses, data, config)",
            REPORT_HELP,
            _cmd_report,
            _report_arguments,
        ),
    )
