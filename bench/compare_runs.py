"""bench/compare_runs.py A B: compare two bench/same_outputs.sh output folders file by file (the folders' own paths normalised).
Binary files byte for byte; JSON/YAML files value by value, reporting keys added/removed apart from changed values."""
import json, sys
from pathlib import Path
import yaml
A, B = Path(sys.argv[1]), Path(sys.argv[2])
TIMING = {"wall_seconds", "train_runtime", "train_samples_per_second", "train_steps_per_second", "seconds", "elapsed"}
def text(p, root):
    return p.read_text().replace(str(root), "<OUT>")
def load(p, root):
    t = text(p, root)
    if p.suffix == ".jsonl": return [json.loads(l) for l in t.splitlines() if l.strip()]
    if p.suffix == ".json": return json.loads(t)
    return yaml.safe_load(t)
def walk(a, b, path, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k in TIMING: continue
            if k not in a: out["added"].add(f"{path}{k}")
            elif k not in b: out["removed"].add(f"{path}{k}")
            else: walk(a[k], b[k], f"{path}{k}.", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)): walk(x, y, f"{path}[{i}].", out)
    elif a != b:
        out["changed"].append(f"{path.rstrip('.')}: {str(a)[:60]!r} -> {str(b)[:60]!r}")
total = dict(binary_same=0, binary_diff=0, structured_same=0, structured_diff=0)
added_all = set()
for run in ["demo_run", "dpo_live", "dpo_cache", "kto", "sft", "pipeline"]:
    if not (A / run).exists() or not (B / run).exists():
        print(f"{run}: missing on one side"); continue
    fa = {p.relative_to(A) for p in (A / run).rglob("*") if p.is_file()}
    fb = {p.relative_to(B) for p in (B / run).rglob("*") if p.is_file()}
    if fa ^ fb: print(f"{run}: files on one side only: {sorted(map(str, fa ^ fb))}")
    for rel in sorted(fa & fb):
        if rel.name == "report.html": continue  # rendered with the time and the dpokit version
        pa, pb = A / rel, B / rel
        if rel.suffix in (".json", ".jsonl", ".yaml"):
            out = {"added": set(), "removed": set(), "changed": []}
            walk(load(pa, A), load(pb, B), "", out)
            if out["changed"] or out["removed"]:
                total["structured_diff"] += 1; print(f"CHANGED {rel}: {out['changed'][:5]} removed={sorted(out['removed'])[:5]}")
            else:
                total["structured_same"] += 1
            added_all |= {k.split(".")[-1] if "." in k else k for k in out["added"]}
        else:
            same = (text(pa, A) == text(pb, B)) if rel.suffix in (".md", ".txt", ".jinja") else pa.read_bytes() == pb.read_bytes()
            total["binary_same" if same else "binary_diff"] += 1
            if not same: print(f"DIFFERS {rel}")
    print(f"{run}: {len(fa & fb)} files compared")
table = lambda p: [l for l in p.read_text().splitlines() if "%" in l or "nats" in l or "length" in l or "[positive]" in l or "[negative]" in l or "round" in l.lower()]
print("demo stdout (table and samples) identical:", table(A / "demo.out") == table(B / "demo.out"))
if (A / "pipeline.out").exists() and (B / "pipeline.out").exists():
    print("pipeline stdout round table identical:", [l for l in text(A / "pipeline.out", A).splitlines() if l.startswith("|")] == [l for l in text(B / "pipeline.out", B).splitlines() if l.startswith("|")])
print(total, "keys only in B (any depth, last name):", sorted(added_all))
