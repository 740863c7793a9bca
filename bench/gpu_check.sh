#!/usr/bin/env bash
# One GPU check, at most 8 minutes on one H100/H200-class GPU, run on the machine as it is. From the repository root:
#     bash bench/gpu_wheels.sh                      # here, once: trl, datasets, dill, multiprocess, bitsandbytes -> .whl/
#     bash bench/gpu_check.sh [OUT_DIR]             # there (carry .whl): installs .whl/ into /tmp/site, then the checks
#     bash bench/gpu_check.sh --dry-run [OUT_DIR]   # anywhere, no GPU: everything but the CUDA work (docs/gpu.md)
# Each part prints PASS, FAIL or SKIP with the reason into OUT_DIR/summary.txt; the exit status is 1 on any FAIL.
#   0. wheels: .whl/*.whl installed with --no-index --no-deps into a target folder put first on PYTHONPATH (absent: SKIP,
#      the interpreter's own packages are used); imports of dpokit, trl, datasets, bitsandbytes, with versions and origins
#   1. pytest -m gpu (tests/test_gpu.py), one line per test: the fast paired step equals the plain step in bf16 for sdpa,
#      flex_attention (torch.compile) and flash-attention varlen (when flash_attn is installed); FSDP2 (train.fsdp=true,
#      one process under torchrun) and DeepSpeed ZeRO-3 (one process under accelerate launch), checkpoint at step 3 +
#      resume = the uninterrupted run's weights exactly; QLoRA (4-bit NF4) 5 steps. (Accelerate's FSDP plugin is refused:
#      dpokit shards with train.fsdp=true, torch's FSDP2.)
#   2. FSDP2 (train.fsdp=true), one process under torchrun on CUDA: the `dpokit train` command line, 5 steps (tiny model,
#      bf16), checkpoint at step 3 (dcp/ shards), a resume from it, final weights equal to the uninterrupted run's exactly
#   3. bench/dpo_vs_trl.py --gpu on the Qwen2.5-0.5B shape: pairs/s, tokens/s, MFU, peak memory, dpokit against TRL
# --dry-run: the wheels go into a temporary target (with the device's cp312 tags when this Python is not 3.12), part 1
# only collects the tests, parts 2 and 3 run their commands on CPU with tiny settings (float32; bench workload a, 1 layer).
# Environment: PYTHON (interpreter; default .venv/bin/python if present, else python3), GPU_CHECK_WHEELS (.whl),
# GPU_CHECK_SITE (the target on the GPU machine, /tmp/site),
# GPU_CHECK_BUDGET (seconds for the whole check, 470), GPU_CHECK_SKIP (parts to leave out: "pytest fsdp2 bench"),
# OUT (the lent machine's result folder) when no OUT_DIR is given.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUT_ARG" ] || { echo "gpu_check: one OUT_DIR at most, got $OUT_ARG and $arg" >&2; exit 2; }; OUT_ARG=$arg ;;
  esac
done
OUT=${OUT_ARG:-${OUT:-/tmp/dpokit-gpu-check}}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.txt"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/dpokit-gpu-work.XXXXXX")  # models, data, runs, the bench cache: not in OUT (it travels back)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
BUDGET=${GPU_CHECK_BUDGET:-470}  # 8 minutes less the start; each part's timeout is cut to what is left
status=0
say() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt"; }
fail() { status=1; say "FAIL: $*"; }
left() { echo $((BUDGET - SECONDS)); }
skipped() { case " ${GPU_CHECK_SKIP:-} " in *" $1 "*) say "SKIP: $1: left out by GPU_CHECK_SKIP"; return 0 ;; esac; return 1; }
timeout_for() { local want=$1 rest; rest=$(($(left) - 5)); [ "$rest" -lt "$want" ] && want=$rest; echo "$want"; }
mode=$([ $DRY = 1 ] && echo "dry run (no CUDA work)" || echo "on the GPU")
say "== dpokit GPU check, $mode, $(date -u +%FT%TZ); logs in $OUT"

say "== 0. wheels and imports [${SECONDS}s]"
if [ $DRY = 1 ]; then SITE=$WORK/site; else SITE=${GPU_CHECK_SITE:-/tmp/site}; fi
shopt -s nullglob
WHEELS=${GPU_CHECK_WHEELS:-.whl}
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -eq 0 ]; then
  say "SKIP: install: no wheels in $WHEELS/ (bash bench/gpu_wheels.sh makes them; on the GPU machine carry .whl); trl, datasets and bitsandbytes come from $PY's own packages, if it has them"
else
  tags=()
  if [ $DRY = 1 ] && ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    tags=(--only-binary=:all: --python-version 3.12 --implementation cp)  # the device's Python; this one is another
    for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do tags+=(--platform "$p"); done
  fi
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" ${tags[@]+"${tags[@]}"} \
      "${wheels[@]}" > "$OUT/install.txt" 2>&1; then
    say "PASS: install: ${#wheels[@]} wheels ($(du -sh "$WHEELS" | cut -f1)) into $SITE${tags[0]+ (cp312 tags)}"
  else
    fail "install: pip install --target $SITE: $(tail -n 1 "$OUT/install.txt")"
  fi
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DPOKIT_CACHE="$WORK/cache"
# Versions, origins (the target or the interpreter's own), unmet requirements of the carried wheels, the imports that must work.
"$PY" - "$SITE" <<'PY' > "$OUT/env.txt" 2>&1
import importlib, importlib.metadata as md, importlib.util, re, sys
from packaging.requirements import Requirement
site = sys.argv[1]
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("transformers", "accelerate", "peft", "safetensors", "pyarrow", "datasets", "trl", "bitsandbytes",
             "flash_attn", "deepspeed"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(f"  {name}: not installed"); continue
    try:
        version = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as error:  # a carried package that does not import here is reported, not fatal
        version = f"import failed: {type(error).__name__}: {error}"
    where = "carried" if (spec.origin or "").startswith(site) else "image/interpreter"
    print(f"  {name}: {version} ({where})")
unmet = []
for dist in md.distributions(path=[site]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            have = None
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            unmet.append(f"{dist.metadata['Name']} needs {req} (have {have or 'none'})")
print("unmet requirements of carried wheels:", "; ".join(unmet) or "none")
import dpokit, dpokit.cli  # noqa: E401  the one import that must work
print("dpokit", dpokit.__version__, "from", dpokit.__file__)
PY
env_rc=$?
grep -E "^(python|  |unmet|dpokit)" "$OUT/env.txt" | tee -a "$OUT/summary.txt"
if [ $env_rc -ne 0 ]; then fail "imports: dpokit does not import (see $OUT/env.txt)"; say "== done, status 1"; exit 1; fi
say "PASS: imports: dpokit and dpokit.cli"
if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  fail "no CUDA device visible to torch (--dry-run checks everything else)"; say "== done, status 1"; exit 1
fi

say "== 1. pytest -m gpu (tests/test_gpu.py) [${SECONDS}s]"
if skipped pytest; then :
elif [ $DRY = 1 ]; then
  "$PY" -m pytest -m gpu --collect-only -o addopts= -q -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.txt" 2>&1
  expected="test_fast_step_equals_plain_step_in_bf16[sdpa] test_fast_step_equals_plain_step_in_bf16[flex_attention]
    test_one_process_sharded_run_resumes_exactly[fsdp2] test_one_process_sharded_run_resumes_exactly[deepspeed_zero3]
    test_qlora_trains_five_steps"
  missing=$(for t in $expected; do grep -qF "::$t" "$OUT/pytest_gpu.txt" || printf '%s ' "$t"; done)
  if [ -z "$missing" ]; then say "PASS: collected $(grep -c '::' "$OUT/pytest_gpu.txt") GPU tests (dry run: not run)"
  else fail "not collected: $missing(see $OUT/pytest_gpu.txt)"; fi
else
  t=$(timeout_for 200)
  if timeout "$t" "$PY" -m pytest -m gpu -rA -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.txt" 2>&1; then
    say "PASS: $(tail -n 1 "$OUT/pytest_gpu.txt")"
  else
    fail "$(tail -n 1 "$OUT/pytest_gpu.txt") (timeout ${t}s; details in $OUT/pytest_gpu.txt)"
  fi
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$OUT/pytest_gpu.txt" | sed 's/^/  /' | tee -a "$OUT/summary.txt"
fi

say "== 2. FSDP2 (train.fsdp=true), one process, checkpoint at step 3 and resume [${SECONDS}s]"
if skipped fsdp2; then :
elif ! "$PY" -c "from dpokit.config import load_config; load_config(None, {'train.fsdp': True})" > "$WORK/key.txt" 2>&1; then
  fail "dpokit does not take train.fsdp=true: $(tail -n 1 "$WORK/key.txt")"
elif [ "$(left)" -lt 40 ]; then
  say "SKIP: the ${BUDGET}s budget is spent"
else
  "$PY" - "$WORK/fsdp2" <<'PY' >> "$OUT/fsdp2.txt" 2>&1
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from tiny_assets import synthetic_pairs, word_tokenizer, write_jsonl
from dpokit.tiny import build_tiny_llama, save_tiny
root = Path(sys.argv[1]); root.mkdir(parents=True)
tokenizer = word_tokenizer()
save_tiny(build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, seed=0), tokenizer, root / "model")
write_jsonl(root / "pairs.jsonl", synthetic_pairs(40, seed=0))
(root / "run.yaml").write_text(f"model:\n  name_or_path: {root / 'model'}\ndata:\n  path: {root / 'pairs.jsonl'}\n")
PY
  if [ $DRY = 1 ]; then dtype=float32; device="CPU, gloo"; else dtype=bfloat16; device="CUDA, NCCL"; fi
  common=(model.dtype=$dtype data.max_length=48
          data.max_prompt_length=16 loss.beta=0.1 optim.lr=1e-3 train.batch_size=4 train.max_steps=5 train.logging_steps=1
          train.save_steps=3 train.progress_bar=false speed.ref_cache=false train.fsdp=true)
  launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m dpokit.cli train "$WORK/fsdp2/run.yaml")
  t=$(timeout_for 45)
  if timeout "$t" "${launch[@]}" "${common[@]}" out_dir="$WORK/fsdp2/whole" >> "$OUT/fsdp2.txt" 2>&1 \
     && t=$(timeout_for 45) && timeout "$t" "${launch[@]}" "${common[@]}" out_dir="$WORK/fsdp2/resumed" \
        train.resume="$WORK/fsdp2/whole/checkpoints/checkpoint-3" >> "$OUT/fsdp2.txt" 2>&1; then
    if "$PY" - "$WORK/fsdp2" <<'PY' >> "$OUT/fsdp2.txt" 2>&1; then
import sys
from pathlib import Path
import torch
from safetensors.torch import load_file
root = Path(sys.argv[1])
assert (root / "whole/checkpoints/checkpoint-3/dcp").is_dir(), "checkpoint-3 has no dcp/ shards: train.fsdp did not shard"
a, b = (load_file(str(root / run / "final/model.safetensors")) for run in ("whole", "resumed"))
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
for name in a:
    torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
print(f"resumed == uninterrupted: {len(a)} tensors equal")
PY
      say "PASS: ($device) 5 steps, sharded checkpoint-3, resumed run's final weights equal the uninterrupted run's"
    else
      fail "($device) the runs finished but: $(tail -n 1 "$OUT/fsdp2.txt")"
    fi
  else
    fail "($device) dpokit train train.fsdp=true: $(tail -n 1 "$OUT/fsdp2.txt") (details in $OUT/fsdp2.txt)"
  fi
fi

say "== 3. dpokit vs TRL, bench/dpo_vs_trl.py [${SECONDS}s]"
if skipped bench; then :
elif ! "$PY" -c "import trl, datasets" > "$WORK/trl.txt" 2>&1; then
  say "SKIP: the TRL side cannot import ($(tail -n 1 "$WORK/trl.txt")); carry the wheels: bash bench/gpu_wheels.sh"
elif [ "$(left)" -lt 60 ]; then
  say "SKIP: the ${BUDGET}s budget is spent"
else
  if [ $DRY = 1 ]; then
    bench=(--workloads a --layers 1 --steps 1 --warmup 1 --batch-size 2 --variants trl,precompute,dpokit); t=$(timeout_for 120)
  else
    bench=(--gpu --workloads q05 --steps 3 --warmup 1 --variants trl,precompute,dpokit); t=$(timeout_for 150)
  fi
  if timeout "$t" "$PY" bench/dpo_vs_trl.py "${bench[@]}" --cache "$WORK/bench-cache" > "$OUT/bench.txt" 2>&1; then
    say "PASS: dpo_vs_trl.py ${bench[*]}"; grep -E "^\|" "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
  else
    fail "dpo_vs_trl.py ${bench[*]} (timeout ${t}s): see $OUT/bench.txt"; tail -n 5 "$OUT/bench.txt" | tee -a "$OUT/summary.txt"
  fi
fi
say "== done in ${SECONDS}s, status $status; summary in $OUT/summary.txt"
exit $status
