#!/usr/bin/env bash
# bench/same_outputs.sh COMMIT OUT: every output of one commit, for the same-outputs gate (bench/compare_runs.py A B).
# Runs at COMMIT (a git worktree, one thread, a fresh DPOKIT_CACHE): the demo, DPO with a live reference and with
# the reference cache, KTO and SFT (12 steps on demo pairs with planted bad rows) and `dpokit pipeline pipeline_demo`.
# Every commit runs in the same folder ($WORK, then moved to OUT), so paths and the fingerprints that hash them agree.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
C=$(git -C "$REPO" rev-parse --short "$1")
OUT=$(realpath -m "$2")
BASE=${TMPDIR:-/tmp}
WT="$BASE/dpokit-wt-$C"
WORK="$BASE/dpokit-same-outputs-run"  # the same path for every commit
rm -rf "$WORK" "$OUT"
mkdir -p "$WORK/data"
[ -d "$WT" ] || git -C "$REPO" worktree add -q --detach "$WT" "$C"
trap 'git -C "$REPO" worktree remove --force "$WT" 2>/dev/null || true' EXIT
export PYTHONPATH="$WT/src" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DPOKIT_CACHE="$WORK/cache" TQDM_DISABLE=1
PY="$REPO/.venv/bin/python"
cd "$WORK"
D() { "$PY" -c "import sys; from dpokit.cli import main; sys.exit(main())" "$@"; }
run() {  # run NAME ARGS...: console to NAME.out, exit status to rc.txt; a failing run is an output like any other
  local name=$1; shift
  local rc=0
  D "$@" > "$name.out" 2>&1 || rc=$?
  echo "$name rc $rc" >> rc.txt
}
run demo demo --out-dir "$WORK/demo_run"
PAIRS=$(find "$WORK/cache" -name "*.jsonl" | grep -i pair | grep -v eval | LC_ALL=C sort | head -1)
echo "pairs ${PAIRS#$WORK/}" >> rc.txt
# a pairs file with bad rows (skip report), made fresh from the demo's pairs for this run
"$PY" - "$PAIRS" "$WORK/data/pairs_bad.jsonl" "$WORK/data/sft.jsonl" <<'PYX'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][:400]
with open(sys.argv[2], "w") as f:
    for i, r in enumerate(rows):
        f.write(json.dumps(r) + "\n")
        if i == 5: f.write(json.dumps({"prompt": r["prompt"], "chosen": "", "rejected": r["rejected"]}) + "\n")
        if i == 9: f.write(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n")
with open(sys.argv[3], "w") as f:
    for i, r in enumerate(rows):
        f.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n")
        if i == 7: f.write(json.dumps({"prompt": r["prompt"], "completion": ""}) + "\n")
PYX
COMMON=("data.path=$WORK/data/pairs_bad.jsonl" data.eval_path=null data.eval_fraction=0.1 train.max_steps=12
        train.batch_size=8 train.eval_steps=6 train.logging_steps=2 train.save_steps=6)
run dpo_live train demo "${COMMON[@]}" "out_dir=$WORK/dpo_live"
run dpo_cache train demo "${COMMON[@]}" speed.ref_cache=true "out_dir=$WORK/dpo_cache"
run kto train demo "${COMMON[@]}" loss.type=kto "out_dir=$WORK/kto"
run sft sft demo "data.path=$WORK/data/sft.jsonl" data.eval_path=null train.max_steps=12 train.batch_size=8 \
    train.eval_steps=6 train.logging_steps=2 "out_dir=$WORK/sft"
run pipeline pipeline pipeline_demo "out_dir=$WORK/pipeline"
cd "$BASE"
mv "$WORK" "$OUT"
echo "same_outputs: $C -> $OUT"
