#!/usr/bin/env bash
# Fetch, here, the wheels that bench/gpu_check.sh installs on the lent GPU machine, which cannot download anything.
#     bash bench/gpu_wheels.sh            # -> .whl/ (ignored by git), checked and sized
#
# The GPU image (Python 3.12, torch 2.11 CUDA 13, transformers 5.17, accelerate 1.15, peft, safetensors, pyarrow,
# fsspec, xxhash, pandas, huggingface-hub, pytest, hypothesis, ...) lacks what is fetched here:
#   trl           the TRL side of bench/dpo_vs_trl.py (its DPOTrainer)
#   datasets      TRL's DPOTrainer takes a datasets.Dataset (dpokit reads jsonl without it: datasets is imported lazily,
#                 only for save_to_disk folders and hub ids)
#   dill, multiprocess   datasets' requirements that the image lacks (its others, pyarrow included, are in the image)
#   bitsandbytes  QLoRA (model.quantization=nf4) in tests/test_gpu.py
# Versions are constraints.txt's pins (the versions CI tests with). Every wheel's Requires-Dist is checked against this
# set plus the image's package list; the folder must stay under 60 MB (what travels to the machine is at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
LIMIT_MB=60
PACKAGES=(trl datasets dill multiprocess bitsandbytes)
# Python packages in the GPU image ('cuda'), as /work/.library/device/KINDS.md lists them (normalised names).
IMAGE="accelerate aiohttp annotated-doc anyio attrs certifi charset-normalizer click filelock fsspec h11 hf-xet httpcore
httpx huggingface-hub idna jinja2 markupsafe mpmath networkx numpy packaging pandas peft pillow pip pluggy protobuf psutil
pyarrow pytest python-dateutil pyyaml regex requests rich safetensors sentencepiece setuptools six sympy tokenizers torch
tqdm transformers triton typing-extensions tzdata urllib3 xxhash hypothesis iniconfig pygments"

pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i -E "^${name}==" constraints.txt || true)
  [ -n "$pin" ] || { echo "gpu_wheels: $name is not pinned in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
echo "gpu_wheels: pip download ${pins[*]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${pins[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

python3 - "$DEST" "$LIMIT_MB" "$IMAGE" <<'PY'
"""One version of each package, every non-extra requirement present (carried or in the image), the size limit."""
import re, sys, zipfile
from pathlib import Path

dest, limit_mb, image = Path(sys.argv[1]), float(sys.argv[2]), set(sys.argv[3].split())
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
wheels = sorted(dest.glob("*.whl"))
carried = {}
for wheel in wheels:
    carried.setdefault(norm(wheel.name.split("-")[0]), []).append(wheel.name)
bad = False
for name, files in carried.items():
    if len(files) > 1:
        print(f"gpu_wheels: two versions of {name} ({', '.join(files)}) would stop the whole install"); bad = True
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            req = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.-]+)", line).group(1))
            if req not in carried and req not in image:
                print(f"gpu_wheels: {wheel.name} needs {req}, which is neither carried nor in the image"); bad = True
total = 0
for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
    size = wheel.stat().st_size
    total += size
    print(f"  {size / 1e6:7.2f} MB  {wheel.name}")
print(f"gpu_wheels: {len(wheels)} wheels, {total / 1e6:.1f} MB in {dest}/ (limit {limit_mb:.0f} MB)")
if total > limit_mb * 1e6:
    biggest = max(wheels, key=lambda w: w.stat().st_size)
    print(f"gpu_wheels: over the limit; the largest is {biggest.name} ({biggest.stat().st_size / 1e6:.1f} MB). "
          "Leave it out: the parts of bench/gpu_check.sh that need it say SKIP with the reason.")
    bad = True
sys.exit(1 if bad else 0)
PY
