"""What to do about each failure mode: the advice texts the live failure detectors and the doctor give.

Most quote the "Failure Modes & Debugging" guide shipped with the project and name the dpokit
settings that apply it; docs/diagnosis.md lists which advice comes from it and which is dpokit's own.
"""

MITIGATIONS = {
    "distribution_shift": (
        "Use on-policy preference data wherever possible: generate responses from the SFT model itself, then rank "
        "them. If using off-policy data, filter for examples where both chosen and rejected responses have reasonable "
        "probability under the reference model. Online/iterative DPO (fresh responses each round) addresses this most directly."
    ),
    "length_hacking": (
        "Use length-normalised log-probabilities (divide by the number of response tokens): loss.type=simpo does this "
        "natively, and loss.ld_alpha (LD-DPO) down-weights the tokens past the shorter completion. Alternatively filter "
        "the preference data so chosen and rejected have similar lengths, or add an explicit length penalty."
    ),
    "over_optimisation": (
        "Use early stopping based on evaluation metrics, not training loss. Increase loss.beta to tighten the KL "
        "constraint. Train for only 1 epoch as a starting point. If the KL to the reference exceeds 5-10 nats the policy "
        "has likely drifted too far. Consider IPO (loss.type=ipo), which converges to a bounded solution."
    ),
    "label_noise": (
        "Use conservative DPO: loss.type=sigmoid with loss.label_smoothing=0.1 (cDPO assumes that fraction of labels is "
        "flipped). Or use IPO (loss.type=ipo), which is robust to label noise. Pre-filter pairs to which an external "
        "reward model assigns similar scores."
    ),
    "catastrophic_forgetting": (
        "Use conservative hyperparameters: loss.beta >= 0.1, optim.lr <= 5e-7 (full fine-tuning) or 5e-6 (LoRA), "
        "1 epoch maximum. Monitor capability benchmarks (MMLU, ARC, IFEval) alongside preference metrics. Use LoRA "
        "(lora.enabled=true). With full fine-tuning, mix a small fraction (5-10%) of SFT data into DPO training."
    ),
}

# Not named in the guide; this advice is dpokit's own (docs/diagnosis.md says so).
MITIGATIONS["likelihood_displacement"] = (
    "The margin grows because both completions lose probability, the chosen one less than the rejected one. "
    "Keep the chosen likelihood up with an NLL term on the chosen completion: loss.type=[sigmoid, sft] (RPO-style). "
    "The guide's catastrophic-forgetting advice also applies: " + MITIGATIONS["catastrophic_forgetting"]
)
MITIGATIONS["stuck_accuracy"] = (
    "Check the data first: `dpokit doctor DATA --model M` flags identical and contradictory pairs and pairs the "
    "reference already prefers the wrong way. If the labels are noisy: "
    + MITIGATIONS["label_noise"]
    + " If the data is clean, the learning rate may be too low to move the policy (raise optim.lr)."
)
MITIGATIONS["forgetting"] = (
    "The policy is losing the text of data.retention_path. Raise loss.beta (a stronger pull to the reference), lower "
    "optim.lr, train LoRA adapters instead of every weight (lora.enabled=true), train fewer epochs (train.epochs, "
    "train.max_steps), or mix SFT data into the DPO steps: data.sft_mix_path (e.g. the retention text's own SFT data) "
    "with loss.sft_mix_weight (docs/evaluation.md)."
)
MITIGATIONS["non_finite"] = (
    "Stop: the weights are probably already corrupted. Restart from the last good checkpoint with a lower optim.lr, "
    "gradient clipping on (optim.max_grad_norm=1.0), and train.mixed_precision=bf16 instead of fp16 (fp16 overflows); "
    "run `dpokit doctor` on the data to rule out empty or truncated completions."
)
