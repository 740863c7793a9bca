#!/usr/bin/env bash
# One GPU check, about 8 minutes on one H100/H200-class GPU. Run from the repository root:
#     bash bench/gpu_check.sh [OUT_DIR]
# What it checks (each part prints PASS, FAIL or SKIP with the reason; the exit status is 1 on any FAIL):
#   1. pytest -m gpu (tests/test_gpu.py):
#        - the fast paired step (packed rows, shared prompts, chunked LM head) equals the plain step in bf16
#          for sdpa, flex_attention (torch.compile) and flash-attention varlen (when flash_attn is installed);
#        - Accelerate FSDP and DeepSpeed ZeRO-3, one process each: 5 steps, checkpoint at step 3, resume from it
#          gives the uninterrupted run's weights exactly (DeepSpeed: skipped when not installed);
#        - QLoRA (4-bit NF4 base, bitsandbytes) trains 5 steps, loss finite and falling (skipped without it).
#   2. bench/dpo_vs_trl.py --gpu on the Qwen2.5-0.5B shape (random weights, vocab 151,936, bf16):
#      pairs/s, tokens/s, MFU against the measured bf16 matmul peak, and peak GPU memory, dpokit against TRL.
# Needs: a CUDA torch with dpokit's dependencies importable (pip install torch -e ".[test]"), no network.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/dpokit-gpu-check}}
mkdir -p "$OUT"
PY=${PYTHON:-$(command -v python3)}
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
say() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }

say "== dpokit GPU check $(date -u +%FT%TZ)"
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("transformers", "accelerate", "peft", "trl", "flash_attn", "deepspeed", "bitsandbytes"):
    spec = importlib.util.find_spec(name)
    version = getattr(__import__(name), "__version__", "?") if spec else "not installed"
    print(f"  {name}: {version}")
PY
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "FAIL: no CUDA device visible to torch"; exit 1
fi

say "== 1. pytest -m gpu"
if timeout 300 "$PY" -m pytest -m gpu -rs -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.txt" 2>&1; then
  say "PASS: $(tail -n 1 "$OUT/pytest_gpu.txt")"
else
  status=1; say "FAIL: $(tail -n 1 "$OUT/pytest_gpu.txt") (details in $OUT/pytest_gpu.txt)"
fi
grep -E "^(SKIPPED|FAILED)" "$OUT/pytest_gpu.txt" | tee -a "$OUT/summary.txt"

say "== 2. dpokit vs TRL, Qwen2.5-0.5B shape, bf16"
if timeout 240 "$PY" bench/dpo_vs_trl.py --gpu --workloads q05 --steps 3 --warmup 1 --variants trl,precompute,dpokit \
    --cache "$OUT/bench-cache" > "$OUT/bench_q05.txt" 2>&1; then
  say "PASS"; grep -E "^\|" "$OUT/bench_q05.txt" | tee -a "$OUT/summary.txt"
else
  status=1; say "FAIL: see $OUT/bench_q05.txt"; tail -n 5 "$OUT/bench_q05.txt" | tee -a "$OUT/summary.txt"
fi
say "== done, status $status; summary in $OUT/summary.txt"
exit $status
