"""Parity with TRL 1.16's own loss code, on random log-probs in float64 (atol 1e-6).

TRL's losses live inside trainer methods, so each trainer is built with
`object.__new__` and given only the attributes its loss method reads; a stub model
returns prepared per-token log-probs (DPO, KTO) or logits (CPO, ORPO) instead of
running a network. TRL's `DPOTrainer._compute_loss` returns only the batch loss, so
the per-example losses are read off the `Tensor.mean` call that reduces each loss
type, and the rewards off `accelerator.gather`. Our inputs (`PairLogps`) are built
from the same per-token numbers, so LD-DPO's shared prefix, WPO's weights, the
lengths and the sft token mean are checked end to end.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we import trl.experimental on purpose

from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

from dpokit.losses import LossConfig, PairLogps, compute_loss, kto_loss, shared_prefix_logps  # noqa: E402

ATOL = 1e-6
B, PROMPT, MAX_COMPLETION = 6, 2, 7
MAX_DIFF: dict[str, float] = defaultdict(float)  # largest |ours - TRL| per case, printed with `pytest -s`


def teardown_module():
    print("\nmax |ours - TRL| per case:")
    for case, diff in sorted(MAX_DIFF.items(), key=lambda kv: -kv[1]):
        print(f"  {diff:.2e}  {case}")
    print(f"  overall max: {max(MAX_DIFF.values(), default=0.0):.2e}")


def _close(case: str, ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 0.0) -> None:
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    MAX_DIFF[case] = max(MAX_DIFF[case], (ours - theirs).abs().max().item())
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=rtol)


class _Recorder(TorchFunctionMode):
    """Records the 1-D tensor each call of `method` (e.g. Tensor.mean) reduces, in call order."""

    def __init__(self, method, size=None):
        super().__init__()
        self.method, self.size, self.seen = method, size, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is self.method and len(args) == 1 and not kwargs and args[0].dim() == 1:
            if self.size is None or args[0].shape[0] == self.size:
                self.seen.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


class _Accelerator:
    device = torch.device("cpu")

    def __init__(self):
        self.gathered = []

    def gather(self, tensor):
        self.gathered.append(tensor.detach().clone())
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor


class _TokenLM(torch.nn.Module):
    """Stands in for a model with TRL's fused LM head: returns fixed per-token log-probs."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq_probs=None):
        super().__init__()
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def forward(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs)
        return SimpleNamespace(
            log_probs=self.log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=self.log_sum_sq_probs,
        )


def _token_batch(seed: int, dtype=torch.float64) -> dict:
    """A [chosen; rejected] batch of 2B sequences: prompt, completion of 2..MAX_COMPLETION tokens, padding."""
    g = torch.Generator().manual_seed(seed)
    width = PROMPT + MAX_COMPLETION
    lengths = torch.randint(2, MAX_COMPLETION + 1, (2 * B,), generator=g)
    position = torch.arange(width)
    completion_mask = ((position >= PROMPT) & (position < PROMPT + lengths[:, None])).long()  # (2B, T)
    attention_mask = (position < PROMPT + lengths[:, None]).long()
    shift_mask = completion_mask[:, 1:].to(dtype)  # (2B, T-1): the positions that predict completion tokens
    policy = -torch.empty(2 * B, width - 1, dtype=dtype).uniform_(0.01, 2.5, generator=g) * shift_mask
    ref = (policy + torch.randn(2 * B, width - 1, dtype=dtype, generator=g)).clamp(max=-1e-3) * shift_mask
    log_sum_sq = -torch.empty(2 * B, width - 1, dtype=dtype).uniform_(0.1, 2.0, generator=g) * shift_mask
    return dict(
        inputs=dict(
            input_ids=torch.randint(5, 50, (2 * B, width), generator=g),
            attention_mask=attention_mask,
            completion_mask=completion_mask,
        ),
        policy=policy,
        ref=ref,
        log_sum_sq=log_sum_sq,
        mask=shift_mask,
    )


def _pair(batch: dict) -> PairLogps:
    policy, ref, mask = batch["policy"], batch["ref"], batch["mask"]
    lengths = mask.sum(1)
    policy_shared, ref_shared = shared_prefix_logps(policy, mask), shared_prefix_logps(ref, mask)
    wpo = ((policy - batch["log_sum_sq"]) * mask).sum(1)
    halves = lambda t: (t[:B], t[B:])  # noqa: E731
    return PairLogps(
        *halves(policy.sum(1)),
        *halves(ref.sum(1)),
        *halves(lengths),
        *halves(policy_shared),
        *halves(ref_shared),
        *halves(wpo),
    )


def _trl_dpo(batch: dict, trl_args: dict):
    """TRL's DPOTrainer._compute_loss on the batch -> (per-type per-example losses, chosen_rewards, rejected_rewards, loss)."""
    trainer = object.__new__(DPOTrainer)
    loss_types = trl_args["loss_type"]
    trainer.__dict__.update(
        beta=trl_args.get("beta", 0.1),
        loss_types=loss_types,
        loss_weights=trl_args.get("loss_weights") or [1.0] * len(loss_types),
        ld_alpha=trl_args.get("ld_alpha"),
        f_divergence_type=trl_args.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=trl_args.get("f_alpha_divergence_coef", 0.5),
        label_smoothing=trl_args.get("label_smoothing", 0.0),
        use_weighting=trl_args.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=trl_args.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None),
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        model=_TokenLM(batch["policy"], batch["log_sum_sq"]),
        ref_model=_TokenLM(batch["ref"]),
        accelerator=_Accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    with _Recorder(torch.Tensor.mean, size=B) as means:
        loss = trainer._compute_loss(trainer.model, batch["inputs"], return_outputs=False)
    chosen_rewards, rejected_rewards = trainer.accelerator.gathered[:2]
    return means.seen[: len(loss_types)], chosen_rewards, rejected_rewards, loss


def _ours(trl_args: dict) -> LossConfig:
    keys = {"loss_type": "type", "loss_weights": "weights"}
    return LossConfig(**{keys.get(k, k): v for k, v in trl_args.items()})


def _check_dpo(case: str, trl_args: dict, seed: int = 0, dtype=torch.float64, rtol: float = 0.0) -> None:
    batch = _token_batch(seed, dtype)
    per_type, chosen_rewards, rejected_rewards, loss = _trl_dpo(batch, trl_args)
    x, cfg = _pair(batch), _ours(trl_args)
    out = compute_loss(x, cfg)
    _close(case, out.chosen_rewards, chosen_rewards, rtol)
    _close(case, out.rejected_rewards, rejected_rewards, rtol)
    _close(case, out.losses.mean(), loss, rtol)
    for name, theirs in zip(cfg.type, per_type):
        ours = compute_loss(x, replace(cfg, type=name, weights=None)).losses
        if name == "sft":  # TRL broadcasts one batch token-mean to every example; we keep each example's share
            ours, theirs = ours.mean(), theirs.mean()
        _close(f"{case}/{name}", ours, theirs, rtol)


DPO_LOSSES = [
    "sigmoid",
    "hinge",
    "ipo",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "robust",
]
F_DIV_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"]

CASES = (
    [(name, {"loss_type": [name]}) for name in DPO_LOSSES]
    + [("exo_pair eps=1e-3", {"loss_type": ["exo_pair"], "label_smoothing": 1e-3})]
    + [
        (f"{n} eps=0.1", {"loss_type": [n], "label_smoothing": 0.1})
        for n in ["robust", "exo_pair", "aot", "aot_unpaired"]
    ]
    + [
        (f"{n} beta=0.5", {"loss_type": [n], "beta": 0.5})
        for n in ["sigmoid", "ipo", "sppo_hard", "apo_down", "discopop"]
    ]
    + [
        (
            f"{n} {f}",
            {"loss_type": [n], "f_divergence_type": f, "label_smoothing": 0.1 if n in ("robust", "exo_pair") else 0.0},
        )
        for n in F_DIV_LOSSES
        for f in ["forward_kl", "js_divergence"]
    ]
    + [
        (f"{n} alpha=1", {"loss_type": [n], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0})
        for n in ["sigmoid", "ipo"]
    ]
    + [
        (f"{n} ld_alpha={a}", {"loss_type": [n], "ld_alpha": a})
        for n in ["sigmoid", "ipo", "aot", "sigmoid_norm", "bco_pair"]
        for a in [0.0, 0.5]
    ]
    + [
        (f"{n} wpo", {"loss_type": [n], "use_weighting": True})
        for n in ["sigmoid", "ipo", "bco_pair", "apo_zero", "sigmoid_norm"]
    ]
    + [
        ("rpo", {"loss_type": ["sigmoid", "sft"]}),
        ("rpo weighted", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]}),
        ("mpo", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
        (
            "ipo+hinge js ld wpo",
            {
                "loss_type": ["ipo", "hinge"],
                "loss_weights": [0.5, 2.0],
                "f_divergence_type": "js_divergence",
                "ld_alpha": 0.3,
                "use_weighting": True,
            },
        ),
        ("rpo ld", {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.5}),
    ]
)


@pytest.mark.parametrize("case,trl_args", CASES, ids=[c for c, _ in CASES])
def test_dpo_losses_match_trl(case, trl_args):
    for seed in (0, 1):
        _check_dpo(case, trl_args, seed=seed)


@pytest.mark.parametrize("name", F_DIV_LOSSES)
@pytest.mark.parametrize("coef", [0.3, 0.5, 1.7])
def test_alpha_divergence_matches_trl_float32(name, coef):
    """float32, because TRL's alpha_divergence looks its clamp up in a table without float64 (KeyError).

    rtol 1e-6 (a few float32 ulps) on top of atol: IPO's squared losses reach ~40, and we compute
    f' with expm1 where TRL uses exp(.) - 1, which loses digits when log-ratios are near 0.
    """
    args = {
        "loss_type": [name],
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": coef,
        "label_smoothing": 0.1 if name in ("robust", "exo_pair") else 0.0,
    }
    _check_dpo(f"{name} alpha={coef} fp32", args, dtype=torch.float32, rtol=1e-6)


def test_trl_sigmoid_ignores_label_smoothing_ours_is_cdpo():
    """Deliberate difference: TRL 1.16's sigmoid drops label_smoothing; ours applies cDPO, and equals TRL at eps=0."""
    batch = _token_batch(3)
    _, _, _, trl_loss = _trl_dpo(batch, {"loss_type": ["sigmoid"], "label_smoothing": 0.1})
    x = _pair(batch)
    _close("sigmoid eps ignored by TRL", compute_loss(x, LossConfig(label_smoothing=0.0)).losses.mean(), trl_loss)
    cdpo = compute_loss(x, LossConfig(label_smoothing=0.1)).losses
    assert (cdpo - compute_loss(x, LossConfig()).losses).abs().min() > 1e-4


# ---------------------------------------------------------------- KTO


def test_kto_matches_trl():
    g = torch.Generator().manual_seed(7)
    n, width = 8, 6
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    policy = -torch.rand(n, width - 1, generator=g, dtype=torch.float64) * 3
    kl_policy = -torch.rand(n, width, generator=g, dtype=torch.float64) * 3  # KL sequences one token wider
    ref_logps = policy.sum(1) + torch.randn(n, generator=g, dtype=torch.float64)
    for shift in (-4.0, 4.0):  # ref above policy on the mismatched pairs: a negative KL estimate, clamped to 0
        ref_kl_logps = kl_policy.sum(1) + torch.randn(n, generator=g, dtype=torch.float64) + shift

        def model(input_ids, **kwargs):
            per_token = kl_policy if input_ids.shape[1] == width + 1 else policy
            zeros = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

        model.training = True
        batch = dict(
            label=labels,
            input_ids=torch.ones(n, width, dtype=torch.long),
            attention_mask=torch.ones(n, width, dtype=torch.long),
            completion_mask=torch.ones(n, width, dtype=torch.long),
            KL_input_ids=torch.ones(n, width + 1, dtype=torch.long),
            KL_attention_mask=torch.ones(n, width + 1, dtype=torch.long),
            KL_completion_mask=torch.ones(n, width + 1, dtype=torch.long),
            ref_logps=ref_logps,
            ref_KL_logps=ref_kl_logps,
        )
        trainer = object.__new__(KTOTrainer)
        trainer.__dict__.update(
            model=model,
            accelerator=_Accelerator(),
            calculate_KL=True,
            precompute_ref_logps=True,
            loss_type="kto",
            beta=0.3,
            desirable_weight=1.33,
            undesirable_weight=0.7,
            aux_loss_enabled=False,
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        )
        with _Recorder(torch.Tensor.nanmean) as nanmeans, _Recorder(torch.Tensor.nansum) as nansums:
            trl_loss = trainer._compute_loss(model, batch, return_outputs=False)
        losses, rewards, kl = kto_loss(policy.sum(1), ref_logps, labels, kl_policy.sum(1), ref_kl_logps, 0.3, 1.33, 0.7)
        case = f"kto shift={shift}"
        # TRL concatenates desirable then undesirable examples; ours keeps the input order.
        _close(case, torch.cat([losses[labels], losses[~labels]]), nanmeans.seen[0])
        _close(case, rewards[labels], nansums.seen[0])
        _close(case, rewards[~labels], nansums.seen[2])
        _close(case, kl, trainer._metrics["train"]["kl"][0])
        _close(case, losses.mean(), trl_loss)
    assert trainer._metrics["train"]["kl"][0] == 0.0  # the clamp was exercised


# ---------------------------------------------------------------- CPO / SimPO / ORPO (trl.experimental)


def _logit_batch(seed: int):
    """Random logits for a [chosen; rejected] batch with a 1-token prompt (so ORPO's prompt-inclusive NLL
    covers exactly the completion), and our PairLogps from the same logits."""
    g = torch.Generator().manual_seed(seed)
    vocab, width = 11, 1 + MAX_COMPLETION
    batch, rows = {}, []
    for side in ("chosen", "rejected"):
        lengths = torch.randint(2, MAX_COMPLETION + 1, (B,), generator=g)
        ids = torch.randint(1, vocab, (B, width), generator=g)
        attention = (torch.arange(width) < 1 + lengths[:, None]).long()
        ids = ids * attention  # pad id 0
        labels = ids.masked_fill((attention == 0) | (torch.arange(width) < 1), -100)
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attention, f"{side}_labels": labels})
        rows.append(labels)
    logits = torch.randn(2 * B, width, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.cat(rows)[:, 1:]
    mask = labels != -100
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    logps, lengths = token_logps.sum(1), mask.sum(1)
    x = PairLogps(logps[:B], logps[B:], chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])

    def model(input_ids, **kwargs):
        assert input_ids.shape == logits.shape[:2]
        return SimpleNamespace(logits=logits)

    return batch, x, model


def _experimental_trainer(cls, **attrs):
    trainer = object.__new__(cls)
    trainer.__dict__.update(
        is_encoder_decoder=False,
        pad_token_id=0,
        padding_value=0,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        **{"label_smoothing": 0.0, "alpha": 0.0, **attrs},
    )
    return trainer


@pytest.mark.parametrize(
    "loss_type,cpo_alpha,label_smoothing",
    [
        ("sigmoid", 1.0, 0.0),
        ("sigmoid", 0.5, 0.1),
        ("simpo", 0.0, 0.0),
        ("simpo", 0.0, 0.1),
        ("simpo", 0.7, 0.0),
    ],
)
def test_cpo_and_simpo_match_trl_experimental(loss_type, cpo_alpha, label_smoothing):
    for seed in (0, 1):
        batch, x, model = _logit_batch(seed)
        trainer = _experimental_trainer(
            CPOTrainer,
            loss_type=loss_type,
            cpo_alpha=cpo_alpha,
            beta=2.0 if loss_type == "simpo" else 0.1,
            simpo_gamma=1.2,
            label_smoothing=label_smoothing,
        )
        chosen_logps, rejected_logps, *_ = trainer.concatenated_forward(model, batch)
        trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(chosen_logps, rejected_logps)
        trl_loss, _ = trainer.get_batch_loss_metrics(model, batch)
        cfg = LossConfig(beta=trainer.beta, simpo_gamma=1.2, label_smoothing=label_smoothing)
        # TRL's "CPO-SimPO" (simpo with cpo_alpha > 0) is our [simpo, sft] weighted [1, cpo_alpha].
        name, preference_only = (
            ("cpo", replace(cfg, type="cpo", cpo_alpha=0.0))
            if loss_type == "sigmoid"
            else ("simpo", replace(cfg, type="simpo"))
        )
        full = (
            replace(cfg, type="cpo", cpo_alpha=cpo_alpha)
            if name == "cpo"
            else replace(cfg, type=["simpo", "sft"], weights=[1.0, cpo_alpha])
        )
        case = f"cpo[{loss_type}, cpo_alpha={cpo_alpha}, eps={label_smoothing}]"
        out = compute_loss(x, preference_only)
        _close(case, out.losses, trl_losses)
        _close(case, out.chosen_rewards, trl_chosen)
        _close(case, out.rejected_rewards, trl_rejected)
        _close(case, compute_loss(x, full).losses.mean(), trl_loss)


def test_orpo_matches_trl_experimental():
    for seed in (0, 1, 2):
        batch, x, model = _logit_batch(seed)
        trainer = _experimental_trainer(ORPOTrainer, beta=0.25)
        chosen_logps, rejected_logps, *_ = trainer.concatenated_forward(model, batch)
        trl_ratio_terms, trl_chosen, trl_rejected, _, _ = trainer.odds_ratio_loss(chosen_logps, rejected_logps)
        trl_loss, _ = trainer.get_batch_loss_metrics(model, batch)
        cfg = LossConfig(type="orpo", beta=0.25)
        out = compute_loss(x, cfg)
        nll = compute_loss(x, replace(cfg, type="sft")).losses
        _close(
            "orpo", out.losses - nll, -trl_ratio_terms
        )  # TRL returns +beta * log sigma(log odds); the loss subtracts it
        _close("orpo", out.chosen_rewards, trl_chosen)
        _close("orpo", out.rejected_rewards, trl_rejected)
        _close("orpo", out.losses.mean(), trl_loss)
