#!/usr/bin/env bash
# `sdit bench sd15 --device cuda` on a GPU machine that has torch, transformers and the rest of the common stack but
# no network: the packages it lacks travel as wheels in .whl/.
#
#   scripts/gpu-check.sh wheels   where pip reaches PyPI: download those wheels (CPython 3.12, manylinux x86_64)
#   scripts/gpu-check.sh          on the GPU machine: install them under /tmp/site, then run the bench in three
#                                 parts, most wanted first, each writing its own JSON to $OUT (default runs/gpu-check)
#                                 and its log to $OUT/log, all within GPU_CHECK_SECONDS (default 400)
#
#   1. speed       the random SD 1.5 built (or read from /tmp/sdit-cache), then whole 25-step sampling runs of the
#                  teacher with guidance and of S/2 to XL/2, 8 images, fastest of 3 alternating rounds
#   2. throughput  labels/s and training steps/s at real batch sizes, TFLOP/s against the data sheet
#   3. stages      encode, teacher-label, train (S/2), sample and eval at reduced sizes
set -uo pipefail
cd "$(dirname "$0")/.."

# The wheels: each package the GPU machine's image lacks, at the version this project is tested with.
WHEELS="diffusers==0.42.1 zarr==3.1.6 numcodecs==0.16.6 google-crc32c==1.9.0 donfig==0.8.1.post1
importlib_metadata==10.2.0 typer==0.29.2 click==8.5.1
pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 typing_extensions==4.16.0"

if [ "${1:-}" = wheels ]; then
    for wheel in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .whl "$wheel" || exit 1
    done
    du -sh .whl
    exit 0
fi

OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
LOG=$OUT/log
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-400}))
CACHE=/tmp/sdit-cache
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "[gpu-check $(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee -a "$LOG" || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
say "installed; checking the imports"
python3 - <<'EOF' 2>&1 | tee -a "$LOG" || exit 1
import importlib.metadata as md

import torch

import cli  # noqa: F401
import pipeline.bench.sd15_stages  # noqa: F401

print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
print({name: md.version(name) for name in ("diffusers", "transformers", "huggingface_hub", "zarr", "numcodecs",
                                           "safetensors", "numpy", "typer")})
EOF

# part NAME SECONDS_LEFT_FOR_LATER ARGS...: one `sdit bench sd15` run, stopped at DEADLINE minus what later parts keep
part() {
    local name=$1 keep=$2
    shift 2
    local left=$((DEADLINE - keep - $(date +%s)))
    if [ "$left" -lt 30 ]; then
        say "$name: skipped, ${left} s left"
        return
    fi
    say "$name: up to ${left} s"
    timeout "$left" python3 -m sdit bench sd15 --device cuda --cache "$CACHE" --out "/tmp/gpu-check-$name" \
        --json "$OUT/bench-sd15-gpu-$name.json" "$@" 2>&1 | tee -a "$LOG"
    say "$name: exit ${PIPESTATUS[0]}"
    cp /tmp/gpu-check-"$name"/*.stderr "$OUT/" 2>/dev/null
}

part speed 120 --stage speed
part throughput 60 --stage throughput
part stages 0 --stage encode --stage label --stage train --stage sample --stage eval --records 64 --draws 2 \
    --student SDiT-S/2 --train-steps 10
say "done"
