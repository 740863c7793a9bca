"""Hand-worked values for every loss.

Shared batch (B = 2), log-probs summed over tokens, float64:
    policy_chosen  = [-4.5, -6.0]   ref_chosen   = [-5.0, -5.0]   -> r_w = [ 0.5, -1.0]
    policy_rejected = [-5.5, -4.0]  ref_rejected = [-5.0, -5.0]   -> r_l = [-0.5,  1.0]
    chosen_lengths = [2, 4], rejected_lengths = [5, 2]
so with beta = 0.1 the DPO margin r_w - r_l is [1.0, -2.0] and h = beta * margin = [0.1, -0.2].
sp(z) = log(1 + e^z) = -log sigma(-z);  sp(-0.1) = 0.6443967, sp(0.2) = 0.7981389, sp(z) - sp(-z) = z.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.testing import assert_close

from dpokit.losses import (
    LOSSES,
    REFERENCE_FREE,
    LossConfig,
    PairLogps,
    compute_loss,
    get_loss,
    kto_loss,
    needs_reference,
    shared_prefix_logps,
)

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def pair(**overrides) -> PairLogps:
    fields = dict(
        policy_chosen=T(-4.5, -6.0),
        policy_rejected=T(-5.5, -4.0),
        ref_chosen=T(-5.0, -5.0),
        ref_rejected=T(-5.0, -5.0),
        chosen_lengths=torch.tensor([2, 4]),
        rejected_lengths=torch.tensor([5, 2]),
    )
    return PairLogps(**{**fields, **overrides})


def loss(type, x=None, **cfg) -> torch.Tensor:
    return compute_loss(pair() if x is None else x, LossConfig(type=type, **cfg)).losses


# ---------------------------------------------------------------- DPO family


def test_dpo():
    """loss = -log sigma(h) = sp(-h), h = [0.1, -0.2] -> [sp(-0.1), sp(0.2)] = [0.6443967, 0.7981389].
    rewards = beta * r: chosen [0.05, -0.1], rejected [-0.05, 0.1]."""
    out = compute_loss(pair(), LossConfig(type="sigmoid", beta=0.1))
    assert_close(out.losses, T(0.6443966601, 0.7981388694))
    assert_close(out.chosen_rewards, T(0.05, -0.1))
    assert_close(out.rejected_rewards, T(-0.05, 0.1))


def test_cdpo_label_smoothing():
    """eps = 0.1: loss = 0.9 sp(-h) + 0.1 sp(h) = sp(-h) + eps * h (since sp(h) - sp(-h) = h)
    -> [0.6443967 + 0.01, 0.7981389 - 0.02] = [0.6543967, 0.7781389]."""
    assert_close(loss("sigmoid", label_smoothing=0.1), T(0.6543966601, 0.7781388694))


def test_robust():
    """eps = 0.1: loss = (0.9 sp(-h) - 0.1 sp(h)) / 0.8
    ex0: (0.9 * 0.6443967 - 0.1 * 0.7443967) / 0.8 = (0.5799570 - 0.0744397) / 0.8 = 0.6318967
    ex1: (0.9 * 0.7981389 - 0.1 * 0.5981389) / 0.8 = (0.7183250 - 0.0598139) / 0.8 = 0.8231389"""
    assert_close(loss("robust", label_smoothing=0.1), T(0.6318966601, 0.8231388694))


def test_ipo_length_normalised_and_summed():
    """1/(2 beta) = 5.
    normalised (default): r_w/|y_w| - r_l/|y_l| = [0.25 + 0.1, -0.25 - 0.5] = [0.35, -0.75]
      -> (0.35 - 5)^2 = 21.6225, (-0.75 - 5)^2 = 33.0625
    summed (Azar et al.'s code): margin [1, -2] -> (1 - 5)^2 = 16, (-2 - 5)^2 = 49."""
    assert_close(loss("ipo"), T(21.6225, 33.0625))
    assert_close(loss("ipo", ipo_normalize=False), T(16.0, 49.0))


def test_hinge():
    """max(0, 1 - h) = [0.9, 1.2]."""
    assert_close(loss("hinge"), T(0.9, 1.2))


def test_exo_pair():
    """eps = 0.1: sigma(h) (log sigma(h) - log 0.9) + sigma(-h) (log sigma(-h) - log 0.1)
    ex0: sigma(0.1) = 0.5249792, log sigma(0.1) = -0.6443967, log sigma(-0.1) = -0.7443967
         0.5249792 (-0.6443967 + 0.1053605) + 0.4750208 (-0.7443967 + 2.3025851) = -0.2829828 + 0.7401720 = 0.4571892
    ex1: sigma(-0.2) = 0.4501660: 0.4501660 (-0.7981389 + 0.1053605) + 0.5498340 (-0.5981389 + 2.3025851) = 0.6252972"""
    assert_close(loss("exo_pair", label_smoothing=0.1), T(0.4571891783, 0.6252972181))


def test_nca_pair():
    """beta r_w = [0.05, -0.1], beta r_l = [-0.05, 0.1];
    loss = sp(-beta r_w) + 0.5 sp(beta r_w) + 0.5 sp(beta r_l)
    ex0: sp(-0.05) + 0.5 sp(0.05) + 0.5 sp(-0.05) = 0.6684596 + 0.3592298 + 0.3342298 = 1.3619193
    ex1: sp(0.1) + 0.5 sp(-0.1) + 0.5 sp(0.1) = 0.7443967 + 0.3221983 + 0.3721983 = 1.4387933"""
    assert_close(loss("nca_pair"), T(1.3619192960, 1.4387933201))


def test_bco_pair():
    """loss = sp(-beta r_w) + sp(beta r_l): ex0 sp(-0.05) + sp(-0.05) = 2 * 0.6684596 = 1.3369193;
    ex1 sp(0.1) + sp(0.1) = 2 * 0.7443967 = 1.4887933."""
    assert_close(loss("bco_pair"), T(1.3369192960, 1.4887933201))


def test_sppo_hard():
    """1/(2 beta) = 5: (r_w - 5)^2 + (r_l + 5)^2 = [4.5^2 + 4.5^2, 6^2 + 6^2] = [40.5, 72]."""
    assert_close(loss("sppo_hard"), T(40.5, 72.0))


def test_aot_sorts_the_batch():
    """policy log pi(y_w) - log pi(y_l) = [1, -2], sorted [-2, 1]; reference [0, 0].
    d = [-2, 1] -> [sp(0.2), sp(-0.1)] = [0.7981389, 0.6443967]: DPO's losses in sorted order."""
    assert_close(loss("aot"), T(0.7981388694, 0.6443966601))


def test_aot_unpaired():
    """sort(r_w) = [-1, 0.5], sort(r_l) = [-0.5, 1]; d = [-0.5, -0.5] -> sp(0.05) = 0.7184596 twice."""
    assert_close(loss("aot_unpaired"), T(0.7184596480, 0.7184596480))


def test_apo_zero_and_down():
    """apo_zero = 1 - sigma(beta r_w) + sigma(beta r_l):
      ex0: 1 - sigma(0.05) + sigma(-0.05) = 1 - 0.5124974 + 0.4875026 = 0.9750052
      ex1: 1 - sigma(-0.1) + sigma(0.1) = 1 - 0.4750208 + 0.5249792 = 1.0499584
    apo_down = sigma(beta r_w) + 1 - sigma(h):
      ex0: 0.5124974 + 1 - 0.5249792 = 0.9875182;  ex1: 0.4750208 + 1 - 0.4501660 = 1.0248548"""
    assert_close(loss("apo_zero"), T(0.9750052070, 1.0499583750))
    assert_close(loss("apo_down"), T(0.9875182090, 1.0248548098))


def test_discopop():
    """tau = 0.05: m = sigma(h / tau) = sigma([2, -4]) = [0.8807971, 0.0179862];
    loss = (1 - m) sp(-h) + m e^{-h}
    ex0: 0.1192029 * 0.6443967 + 0.8807971 * 0.9048374 = 0.0768140 + 0.7969781 = 0.8737921
    ex1: 0.9820138 * 0.7981389 + 0.0179862 * 1.2214028 = 0.7837834 + 0.0219684 = 0.8057518"""
    assert_close(loss("discopop"), T(0.8737921187, 0.8057517826))


def test_sigmoid_norm():
    """beta (r_w/|y_w| - r_l/|y_l|) = 0.1 [0.35, -0.75] = [0.035, -0.075] -> [sp(-0.035), sp(0.075)] = [0.6758003, 0.7313501].
    Rewards stay the summed beta * r."""
    out = compute_loss(pair(), LossConfig(type="sigmoid_norm"))
    assert_close(out.losses, T(0.6758002977, 0.7313501408))
    assert_close(out.chosen_rewards, T(0.05, -0.1))


# ---------------------------------------------------------------- knobs: f-divergences, LD-DPO, WPO


def test_f_divergences():
    """Scores s = f'(pi/ref) replace r in the sigmoid margin; r_w = [0.5, -1], r_l = [-0.5, 1].
    forward_kl, s = 1 - e^{-r}: s_w = [0.3934693, -1.7182818], s_l = [-0.6487213, 0.6321206]
      margin [1.0421906, -2.3504024] -> [sp(-0.1042191), sp(0.2350402)] = [0.6423947, 0.8175570]
    js, s = log 2 + log sigma(r): here r_l = -r_w, so s_w - s_l = log sigma(r_w) - log sigma(-r_w) = r_w
      = [0.5, -1.0] -> [sp(-0.05), sp(0.1)] = [0.6684596, 0.7443967]
    alpha_divergence (alpha 0.5), s = (e^{-0.5 r} - 1) / -0.5: s_w = [0.4423984, -1.2974425], s_l = [-0.5680508, 0.7869387]
      margin [1.0104493, -2.0843812] -> [0.6439004, 0.8027872]
    alpha = 1 is reverse KL (plain DPO)."""
    assert_close(loss("sigmoid", f_divergence_type="forward_kl"), T(0.6423947376, 0.8175569522))
    assert_close(loss("sigmoid", f_divergence_type="js"), T(0.6684596480, 0.7443966601))
    assert_close(loss("sigmoid", f_divergence_type="alpha_divergence"), T(0.6439004343, 0.8027872452))
    assert_close(loss("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), loss("sigmoid"))
    # rewards stay beta * log-ratio (as TRL reports), whatever the divergence
    out = compute_loss(pair(), LossConfig(f_divergence_type="forward_kl"))
    assert_close(out.chosen_rewards, T(0.05, -0.1))


def test_ld_dpo():
    """Shared length min(|y_w|, |y_l|) = [2, 2]. ld_alpha = 0.5: log pi_ld = shared + 0.5 * (total - shared).
    ex0: chosen has 2 tokens (all shared). rejected: policy shared -2.0 of -5.5 -> -2.0 + 0.5(-3.5) = -3.75;
         ref shared -2.5 of -5.0 -> -3.75. r_l = 0, r_w = 0.5 -> h = 0.05 -> sp(-0.05) = 0.6684596
    ex1: chosen: policy shared -3.0 of -6.0 -> -4.5; ref shared -2.0 of -5.0 -> -3.5; r_w = -1.
         rejected has 2 tokens: r_l = 1 -> h = -0.2 -> sp(0.2) = 0.7981389
    ld_alpha = 1 is plain DPO."""
    x = pair(
        policy_chosen_shared=T(-4.5, -3.0),
        policy_rejected_shared=T(-2.0, -4.0),
        ref_chosen_shared=T(-5.0, -2.0),
        ref_rejected_shared=T(-2.5, -5.0),
    )
    out = compute_loss(x, LossConfig(ld_alpha=0.5))
    assert_close(out.losses, T(0.6684596480, 0.7981388694))
    assert_close(out.chosen_rewards, T(0.05, -0.1))  # beta * r_w with LD weighting: [0.5, -1.0] * 0.1
    assert_close(out.rejected_rewards, T(0.0, 0.1))
    assert_close(loss("sigmoid", x, ld_alpha=1.0), loss("sigmoid"))
    with pytest.raises(ValueError, match="policy_chosen_shared"):
        loss("sigmoid", ld_alpha=0.5)


def test_shared_prefix_logps():
    """Pair 0: chosen 2 tokens [-1, -2], rejected 3 tokens [-0.5, -0.25, -4] -> shared 2: [-3, -0.75].
    Pair 1: chosen 3 tokens [-1, -1, -1], rejected 1 token [-2] -> shared 1: [-1, -2]. Masked slots ignored."""
    token_logps = T(
        [0.0, -1.0, -2.0, 9.0],
        [0.0, -1.0, -1.0, -1.0],  # chosen rows (slot 0 is a prompt position)
        [0.0, -0.5, -0.25, -4.0],
        [0.0, -2.0, 9.0, 9.0],  # rejected rows
    )
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 0, 0]])
    assert_close(shared_prefix_logps(token_logps, mask), T(-3.0, -1.0, -0.75, -2.0))


def test_wpo_weighting():
    """policy_*_wpo = sum_t [log pi(y_t) - log sum_v pi(v)^2]: chosen [-1, -2], rejected [-5, -1].
    weight = exp(-1/2 + -5/5) = e^{-1.5} = 0.2231302 and exp(-2/4 + -1/2) = e^{-1} = 0.3678794
    sigmoid: [0.6443967 * 0.2231302, 0.7981389 * 0.3678794] = [0.1437843, 0.2936189]; no gradient through the weight."""
    x = pair(
        policy_chosen=T(-4.5, -6.0).requires_grad_(),
        policy_chosen_wpo=T(-1.0, -2.0).requires_grad_(),
        policy_rejected_wpo=T(-5.0, -1.0),
    )
    out = compute_loss(x, LossConfig(use_weighting=True))
    assert_close(out.losses.detach(), T(0.1437843300, 0.2936188812))
    out.losses.sum().backward()
    assert x.policy_chosen_wpo.grad is None and x.policy_chosen.grad is not None


# ---------------------------------------------------------------- reference-free


def test_simpo():
    """beta = 2, gamma = 0.5. avg = logp / len: chosen [-2.25, -1.5], rejected [-1.1, -2.0].
    h = 2 * (avg_w - avg_l) - 0.5 = 2 * [-1.15, 0.5] - 0.5 = [-2.8, 0.5] -> [sp(2.8), sp(-0.5)] = [2.8590328, 0.4740770].
    rewards = beta * avg: chosen [-4.5, -3.0], rejected [-2.2, -4.0]."""
    out = compute_loss(pair(ref_chosen=None, ref_rejected=None), LossConfig(type="simpo", beta=2.0, simpo_gamma=0.5))
    assert_close(out.losses, T(2.8590328263, 0.4740769842))
    assert_close(out.chosen_rewards, T(-4.5, -3.0))
    assert_close(out.rejected_rewards, T(-2.2, -4.0))


def test_sft_nll_normalisation():
    """tokens (TRL): -logp_i / mean(len_w) = [4.5, 6.0] / 3 = [1.5, 2.0]; batch mean 1.75 = (4.5 + 6) / (2 + 4).
    sequence: -logp_i / len_i = [4.5 / 2, 6 / 4] = [2.25, 1.5]."""
    x = pair(ref_chosen=None, ref_rejected=None)
    assert_close(loss("sft", x), T(1.5, 2.0))
    assert_close(loss("sft", x).mean(), T(10.5 / 6)[0])
    assert_close(loss("sft", x, nll_normalize="sequence"), T(2.25, 1.5))


def test_cpo():
    """beta 0.1, cpo_alpha 1: sp(-beta (logp_w - logp_l)) + NLL; logp_w - logp_l = [1, -2]
    -> [sp(-0.1), sp(0.2)] + [1.5, 2.0] = [2.1443967, 2.7981389]. rewards = beta * logp: [-0.45, -0.6]."""
    out = compute_loss(pair(ref_chosen=None, ref_rejected=None), LossConfig(type="cpo"))
    assert_close(out.losses, T(2.1443966601, 2.7981388694))
    assert_close(out.chosen_rewards, T(-0.45, -0.6))
    assert_close(loss("cpo", cpo_alpha=0.0), T(0.6443966601, 0.7981388694))


def test_orpo():
    """avg_w = [-2.25, -1.5], avg_l = [-1.1, -2.0]; log(1 - e^a) = [-0.1113777, -0.2524825] (chosen), [-0.4047720, -0.1454135].
    log odds ratio = (avg_w - avg_l) - (log(1-e^avg_w) - log(1-e^avg_l))
      ex0: -1.15 - (-0.1113777 + 0.4047720) = -1.4433943;  ex1: 0.5 - (-0.2524825 + 0.1454135) = 0.6070690
    loss = NLL - beta log sigma(lor) = [1.5 + 0.1 * 1.6553757, 2.0 + 0.1 * 0.4349888] = [1.6655376, 2.0434989]."""
    out = compute_loss(pair(ref_chosen=None, ref_rejected=None), LossConfig(type="orpo"))
    assert_close(out.losses, T(1.6655375682, 2.0434988807))
    assert_close(out.chosen_rewards, T(-0.225, -0.15))


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_losses_need_no_reference(name):
    out = compute_loss(pair(ref_chosen=None, ref_rejected=None), LossConfig(type=name))
    assert out.losses.shape == (2,) and torch.isfinite(out.losses).all()
    assert not needs_reference(LossConfig(type=name))


@pytest.mark.parametrize("name", sorted(set(LOSSES) - REFERENCE_FREE))
def test_reference_based_losses_ask_for_the_reference(name):
    assert needs_reference(LossConfig(type=name))
    with pytest.raises(ValueError, match="ref_chosen"):
        compute_loss(pair(ref_chosen=None, ref_rejected=None), LossConfig(type=name, label_smoothing=0.1))


# ---------------------------------------------------------------- KTO


def test_kto():
    """beta 0.1; r = [-4.5 + 5, -6 + 5] = [0.5, -1]; labels [desirable, undesirable].
    mismatched pairs: policy [-3, -4] - ref [-3.5, -3.7] = [0.5, -0.3], mean 0.1 = z0.
    desirable (weight 2):  2 (1 - sigma(0.1 (0.5 - 0.1))) = 2 (1 - sigma(0.04)) = 0.9800027
    undesirable (weight 1): 1 - sigma(0.1 (0.1 + 1)) = 1 - sigma(0.11) = 0.4725277
    Mismatched mean below 0 ([-0.5, -0.3] -> -0.4) clamps z0 to 0: [2 (1 - sigma(0.05)), 1 - sigma(0.1)] = [0.9750052, 0.4750208]."""
    args = dict(policy_logps=T(-4.5, -6.0), ref_logps=T(-5.0, -5.0), labels=torch.tensor([True, False]))
    losses, rewards, kl = kto_loss(
        **args, kl_policy_logps=T(-3.0, -4.0), kl_ref_logps=T(-3.5, -3.7), beta=0.1, desirable_weight=2.0
    )
    assert_close(losses, T(0.9800026662, 0.4725276957))
    assert_close(rewards, T(0.05, -0.1))
    assert_close(kl, T(0.1)[0])
    losses, _, kl = kto_loss(
        **args, kl_policy_logps=T(-3.0, -4.0), kl_ref_logps=T(-2.5, -3.7), beta=0.1, desirable_weight=2.0
    )
    assert_close(losses, T(0.9750052070, 0.4750208125))
    assert kl.item() == 0.0


def test_kto_baseline_is_detached():
    kl_policy = T(-3.0, -4.0).requires_grad_()
    policy = T(-4.5, -6.0).requires_grad_()
    losses, _, _ = kto_loss(policy, T(-5.0, -5.0), torch.tensor([True, False]), kl_policy, T(-3.5, -3.7), beta=0.1)
    losses.sum().backward()
    assert kl_policy.grad is None and policy.grad[0] < 0 < policy.grad[1]


# ---------------------------------------------------------------- table, combination, validation, gradients


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_loss("dpo")
    for name in LOSSES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="sigmoid_norm"):
        compute_loss(pair(), LossConfig(type=["sigmoid", "simpo2"]))


def test_multi_loss_weights_combine():
    """[sigmoid, sft] weights [1, 0.5]: [0.6443967 + 0.5 * 1.5, 0.7981389 + 0.5 * 2.0] = [1.3943967, 1.7981389];
    rewards come from the first loss (sigmoid). Default weights are all 1.0."""
    out = compute_loss(pair(), LossConfig(type=["sigmoid", "sft"], weights=[1.0, 0.5]))
    assert_close(out.losses, T(1.3943966601, 1.7981388694))
    assert_close(out.chosen_rewards, T(0.05, -0.1))
    assert_close(loss(["sigmoid", "sft"]), loss("sigmoid") + loss("sft"))
    first = compute_loss(pair(), LossConfig(type=["simpo", "sigmoid"]))
    assert_close(first.chosen_rewards, T(-0.225, -0.15))  # simpo's beta * avg


@pytest.mark.parametrize(
    "cfg,match",
    [
        (LossConfig(type=["sigmoid", "sft"], weights=[1.0]), "loss.weights"),
        (LossConfig(type="bco_pair", f_divergence_type="js"), "f_divergence_type"),
        (LossConfig(f_divergence_type="kl"), "f_divergence_type"),
        (LossConfig(type="exo_pair"), "exo_pair"),
        (LossConfig(type="robust", label_smoothing=0.5), "label_smoothing"),
        (LossConfig(type="aot", use_weighting=True), "use_weighting"),
        (LossConfig(ld_alpha=1.5), "ld_alpha"),
        (LossConfig(type="sft", nll_normalize="mean"), "nll_normalize"),
        (LossConfig(type=[]), "empty"),
    ],
)
def test_invalid_settings_are_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        compute_loss(pair(), cfg)


def test_sigmoid_gradient_direction():
    """d loss / d log pi(y_w) = -beta sigma(-h) < 0 (raise the chosen); d / d log pi(y_l) = +beta sigma(-h) > 0.
    ex0: -0.1 * sigma(-0.1) = -0.1 * 0.4750208 = -0.0475021."""
    chosen, rejected = T(-4.5, -6.0).requires_grad_(), T(-5.5, -4.0).requires_grad_()
    loss("sigmoid", pair(policy_chosen=chosen, policy_rejected=rejected)).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert_close(chosen.grad[0], T(-0.0475020813)[0])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_finite_and_differentiable(name):
    chosen = T(-4.5, -6.0).requires_grad_()
    out = compute_loss(pair(policy_chosen=chosen), LossConfig(type=name, label_smoothing=0.1))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(chosen.grad).all()
    assert not out.chosen_rewards.requires_grad


def test_float32_and_batch_shape_preserved():
    x = PairLogps(
        *(t.float() for t in (T(-4.5, -6.0), T(-5.5, -4.0), T(-5.0, -5.0), T(-5.0, -5.0))),
        chosen_lengths=torch.tensor([2, 4]),
        rejected_lengths=torch.tensor([5, 2]),
    )
    for name in LOSSES:
        out = compute_loss(x, replace(LossConfig(type=name), label_smoothing=0.1))
        assert out.losses.dtype == torch.float32 and out.losses.shape == (2,)
