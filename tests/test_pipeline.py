"""`dpokit pipeline`: rounds of sample -> score -> pair -> DPO on the review world, resumable by round."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from dpokit.config import ConfigError, PipelineConfig, load_config, load_pipeline_config
from dpokit.online.pipeline import Pipeline, resolve_prompts

HAS_REF_KEY = "ref_name_or_path" in {f.name for f in dataclasses.fields(load_config().model)}


def base_config(policy="some/model", **extra):
    return {"policy": policy, "prompts": "demo:openings-train", "scorer": "dpokit.demo.world:sentiment", **extra}


# --- config --------------------------------------------------------------------------------------


def test_config_sections_overrides_and_errors():
    cfg = load_pipeline_config(
        base_config(sampling={"num_samples": 8, "temperature": 1}),
        ["rounds=3", "pairing.min_margin=0.5", "train.loss.beta=0.2", "reference=refresh"],
    )
    assert cfg.rounds == 3 and cfg.sampling.num_samples == 8 and cfg.sampling.temperature == 1.0
    assert cfg.pairing.min_margin == 0.5 and cfg.train == {"loss": {"beta": 0.2}} and cfg.reference == "refresh"
    with pytest.raises(ConfigError, match="did you mean 'rounds'"):
        load_pipeline_config(base_config(round=2))
    with pytest.raises(
        ConfigError, match="did you mean 'sampling.num_samples'"
    ):  # the full dotted key, as dpokit train names it
        load_pipeline_config(base_config(sampling={"num_sample": 2}))
    with pytest.raises(ConfigError, match="fixed or refresh"):
        load_pipeline_config(base_config(reference="sometimes"))
    with pytest.raises(ConfigError, match="pairing"):
        load_pipeline_config(base_config(pairing={"strategy": "random"}))
    with pytest.raises(ConfigError, match="'scorer' is required"):
        load_pipeline_config({"policy": "m", "prompts": ["a"]})


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.num_sample=2", "unknown config key 'sampling.num_sample'; did you mean 'sampling.num_samples'?"),
        ("evl.num_samples=2", "unknown config key 'evl.num_samples'; did you mean 'eval.num_samples'?"),
        ("rounds=two", "config key 'rounds' must be int, got 'two'"),
        ("sampling.top_p=0", "config key 'sampling.top_p' must be in (0, 1]"),
        ("pairing.strategy=best_wrst", "did you mean 'best_worst'?"),
        ("train.loss.bta=0.2", "unknown config key 'train.loss.bta'; did you mean 'train.loss.beta'?"),
        ("train.train.batch_size=1.5", "config key 'train.train.batch_size' must be int"),
    ],
)
def test_cli_config_errors_name_the_key_and_suggest_the_closest(override, message, capsys):
    from dpokit.cli import main

    assert main(["pipeline", "pipeline_demo", override]) == 2  # before anything is built or loaded
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_section_is_checked_as_a_train_config_and_takes_overrides_by_name():
    with pytest.raises(ConfigError, match=r"in 'train' \(a dpokit train config\): .*loss.beta must be > 0"):
        load_pipeline_config(base_config(train={"loss": {"beta": -1}}))
    cfg = load_pipeline_config(
        base_config(train="demo"), ["train.loss.beta=0.3"]
    )  # a shipped name: read, then overridden
    assert cfg.train["loss"]["beta"] == 0.3 and load_config(cfg.train).loss.beta == 0.3


def test_shipped_demo_config_loads():
    from dpokit.config import resolve_config_path

    cfg = load_pipeline_config(resolve_config_path("pipeline_demo", "pipelines"))
    assert cfg.policy == "demo:sentiment-sft" and cfg.rounds >= 2 and cfg.eval_prompts == "demo:openings-eval"
    load_config(cfg.train)  # its train section is a valid dpokit config


def test_demo_prompt_sets_come_from_the_one_demo_resolver(monkeypatch):
    from dpokit.demo import assets, world

    def no_build(*args, **kwargs):
        raise AssertionError("a prompt set builds no demo asset")

    monkeypatch.setattr(assets, "demo_paths", no_build)
    for split in ("train", "eval", "all"):  # the same prompts in the same order as world.all_openings
        assert resolve_prompts(f"demo:openings-{split}") == world.all_openings(split)
    train, held_out = resolve_prompts("demo:openings-train"), resolve_prompts("demo:openings-eval")
    assert len(train) > 1000 and len(held_out) > 100 and not set(train) & set(held_out)
    pipeline = Pipeline(load_pipeline_config(base_config(eval_prompts="demo:openings-eval")))
    assert pipeline.prompts == train and pipeline.eval_prompts == held_out
    # an unknown name: the resolver's one error, naming the key and every known name
    with pytest.raises(ConfigError) as unknown:
        resolve_prompts("demo:openings-test", key="eval_prompts")
    with pytest.raises(ConfigError) as same:
        assets.resolve_demo_names({"eval_prompts": "demo:openings-test"}, ConfigError, prompt_sets=True)
    assert str(unknown.value) == str(same.value)
    assert str(unknown.value).startswith(
        "unknown demo asset 'demo:openings-test' in eval_prompts; known: demo:sentiment-sft, "
    )
    assert str(unknown.value).endswith("demo:openings-train, demo:openings-eval, demo:openings-all")
    # a key that takes a file takes no prompt set
    with pytest.raises(
        ValueError, match="unknown demo asset 'demo:openings-train' in data.path; known: demo:sentiment-sft"
    ):
        assets.resolve_demo_names({"data.path": "demo:openings-train"})


# --- a 2-round run on a small SFT model ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_sft():
    from dpokit.demo.sft import SFTConfig, build_sft_model

    config = SFTConfig(hidden_size=64, steps=200, n_sequences=2000, lr=5e-3)
    return str(build_sft_model(seed=0, config=config))  # cached in $DPOKIT_CACHE like the demo: built once per machine


def run_config(sft, out_dir, reference="refresh"):
    return base_config(
        policy=sft,
        rounds=2,
        reference=reference,
        prompts_per_round=128,
        eval_prompts="demo:openings-eval",
        out_dir=str(out_dir),
        sampling={"num_samples": 4, "max_new_tokens": 20, "batch_size": 512},
        eval={"num_samples": 4, "max_prompts": 64, "max_new_tokens": 20},
        train={
            "data": {"max_length": 40, "max_prompt_length": 16},
            "loss": {"beta": 0.1},
            "optim": {"lr": 1e-3, "scheduler": "constant"},
            "train": {"batch_size": 16, "max_steps": 16, "logging_steps": 8, "progress_bar": False},
        },
    )


@pytest.fixture(scope="module")
def finished_run(small_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    records = Pipeline(load_pipeline_config(run_config(small_sft, out))).run()
    return out, records


@pytest.mark.slow
def test_two_rounds_raise_the_held_out_reward(finished_run):
    out, records = finished_run
    assert [r["round"] for r in records] == [0, 1, 2]
    scores = [r["eval"]["mean_score"] for r in records]
    assert scores[2] > scores[0], scores
    assert records[2]["eval"]["win_rate"] > 0.5
    for k in (1, 2):
        rdir = out / f"round_{k}"
        for name in (
            "samples.jsonl",
            "scored.jsonl",
            "pairs.jsonl",
            "pairs.jsonl.summary.json",
            "eval.json",
            "round.json",
            "dpo/final/config.json",
            "dpo/metrics.jsonl",
            "dpo/config.yaml",
        ):
            assert (rdir / name).exists(), name
        assert records[k]["pairs"]["pairs"] > 50 and records[k]["sampling"]["rows"] == 128 * 4
    # each round's policy samples the next; with reference: refresh it is also the reference
    round2 = load_config(str(out / "round_2" / "dpo" / "config.yaml"))
    assert round2.model.name_or_path == str(out / "round_1" / "dpo" / "final")
    summary = json.loads((out / "summary.json").read_text())
    assert [row["round"] for row in summary] == [0, 1, 2] and "| round |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_a_finished_round_is_skipped_on_restart(finished_run, monkeypatch):
    import dpokit.online.pipeline

    out, records = finished_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished round was trained again")

    monkeypatch.setattr(dpokit.online.pipeline, "train", no_training)
    again = Pipeline(load_pipeline_config(run_config(records[0]["policy"], out))).run()
    assert [r["eval"]["mean_score"] for r in again] == [r["eval"]["mean_score"] for r in records]
    # an interrupted round 2 (its eval and marker lost): samples, scores and the model are kept
    (out / "round_2" / "round.json").unlink()
    (out / "round_2" / "eval.json").unlink()
    resumed = Pipeline(load_pipeline_config(run_config(records[0]["policy"], out))).run()
    assert resumed[2]["sampling"]["generated"] == 0 and resumed[2]["sampling"]["already_done"] == 128
    assert resumed[2]["scoring"]["scored"] == 0
    assert resumed[2]["eval"]["mean_score"] == records[2]["eval"]["mean_score"]  # same seed, same model


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_REF_KEY, reason="needs the trainer/config change that adds model.ref_name_or_path (docs/pipeline.md)"
)
def test_fixed_reference_keeps_the_sft_model(finished_run, small_sft, tmp_path):
    out, _ = finished_run
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    for k in (0, 1):  # round 1 is the same in both modes (its reference is the SFT model either way)
        shutil.copytree(out / f"round_{k}", fixed / f"round_{k}")
    records = Pipeline(load_pipeline_config(run_config(small_sft, fixed, reference="fixed"))).run()
    round2 = load_config(str(fixed / "round_2" / "dpo" / "config.yaml"))
    assert round2.model.ref_name_or_path == small_sft
    assert round2.model.name_or_path == str(fixed / "round_1" / "dpo" / "final")
    assert records[2]["eval"]["mean_score"] > records[0]["eval"]["mean_score"]


def test_the_pipeline_folder_is_owned_like_a_run_directory(tmp_path, capsys):
    """A folder of user files is refused in one line and left as it was; a pipeline folder written before folders
    were marked resumes; one pipeline at a time (issue 20: the run directory has one owner)."""
    from dpokit.config import ConfigError
    from dpokit.online.pipeline import claim_pipeline_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match=r"holds files dpokit did not write \(notes.txt\)"):
        claim_pipeline_dir(PipelineConfig(out_dir=str(mine)))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    claim_pipeline_dir(PipelineConfig(out_dir=str(mine), overwrite=True)).release()

    earlier = tmp_path / "earlier"  # a pipeline folder from before the marker: resumes
    (earlier / "round_1" / "dpo").mkdir(parents=True)
    (earlier / "pipeline.yaml").write_text("rounds: 2\n")
    owner = claim_pipeline_dir(PipelineConfig(out_dir=str(earlier)))
    with pytest.raises(ConfigError, match="in use by another dpokit run"):
        claim_pipeline_dir(PipelineConfig(out_dir=str(earlier)))
    owner.release()
