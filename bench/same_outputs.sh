#!/usr/bin/env bash
# bench/same_outputs.sh COMMIT OUT: the outputs of one commit, to compare with another (bench/compare_runs.py A B).
# Runs at COMMIT (a git worktree, one thread, a fresh DPOKIT_CACHE): the demo, DPO with a live reference and with
# the reference cache, KTO and SFT (12 steps on demo pairs with planted bad rows) and `dpokit pipeline pipeline_demo`.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd); C=$(git -C "$REPO" rev-parse --short "$1") || exit 2; OUT=$2; WT=${TMPDIR:-/tmp}/dpokit-wt-$C; DATA=${TMPDIR:-/tmp}/dpokit-same-outputs
mkdir -p $DATA
[ -d $WT ] || git -C $REPO worktree add -q --detach $WT $C
rm -rf $OUT; mkdir -p $OUT
export PYTHONPATH=$WT/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 DPOKIT_CACHE=$OUT/cache TQDM_DISABLE=1
PY=$REPO/.venv/bin/python
cd $OUT
D() { $PY -c "import sys; from dpokit.cli import main; sys.exit(main())" "$@"; }
D demo --out-dir $OUT/demo_run > demo.out 2>demo.err; echo "demo rc $?" >> rc.txt
PAIRS=$(find $OUT/cache -name "*.jsonl" | grep -i pair | grep -v eval | head -1); echo "pairs $PAIRS" >> rc.txt
# a pairs file with bad rows (skip report), the same bytes at every commit
$PY - "$PAIRS" $DATA/pairs_bad.jsonl $DATA/sft.jsonl <<'PYX'
import json, sys, os
if not os.path.exists(sys.argv[2]):
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
COMMON="data.path=$DATA/pairs_bad.jsonl data.eval_path=null data.eval_fraction=0.1 train.max_steps=12 train.batch_size=8 train.eval_steps=6 train.logging_steps=2 train.save_steps=6"
D train demo $COMMON out_dir=$OUT/dpo_live > dpo_live.out 2>&1; echo "dpo_live rc $?" >> rc.txt
D train demo $COMMON speed.ref_cache=true out_dir=$OUT/dpo_cache > dpo_cache.out 2>&1; echo "dpo_cache rc $?" >> rc.txt
D train demo $COMMON loss.type=kto out_dir=$OUT/kto > kto.out 2>&1; echo "kto rc $?" >> rc.txt
D sft demo data.path=$DATA/sft.jsonl data.eval_path=null train.max_steps=12 train.batch_size=8 train.eval_steps=6 train.logging_steps=2 out_dir=$OUT/sft > sft.out 2>&1; echo "sft rc $?" >> rc.txt
D pipeline pipeline_demo out_dir=$OUT/pipeline > pipeline.out 2>&1; echo "pipeline rc $?" >> rc.txt
git -C "$REPO" worktree remove --force "$WT"  # the worktree was only for this run
