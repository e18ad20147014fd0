#!/usr/bin/env bash
# Shows what troupe's CUDA path does on this GPU machine, in under 8 minutes on an H200:
#
#   1. the CUDA tests (when it builds here): device selection, bf16 autocast, NCCL;
#   2. `troupe gpu-check`: CUDA against CPU, bf16 autocast, an NCCL communicator of one rank
#      and its four collectives, and their times from 64 MiB to 1 GiB; the fused AdamW step
#      against the per-parameter one on GPT-2 124M's parameters;
#   3. GPT-2 124M (configs/gpt2-124m.toml: 12 layers, 768 wide, 1024 context) trained for 50
#      steps by `troupe local --gpus 1`, reporting tokens/s and model FLOPs utilisation;
#   4. the embedded default model for 30 steps under each strategy (ddp, zero1/2/3) on the GPU.
#
# Usage:
#   scripts/gpu-check.sh [--out DIR] [--steps N]          set up, build and check, here
#   scripts/gpu-check.sh --prepare                         on a build machine (no GPU needed):
#       build target/gpu/troupe (--features cuda, stripped: ~16 MB) and prepare
#       data/shakespeare-gpt2 (~4 MB) and data/shakespeare (~4 MB), for a GPU machine without
#       a toolchain or PyPI
#   scripts/gpu-check.sh --binary target/gpu/troupe --data data/shakespeare-gpt2 [--out DIR]
#       on that GPU machine, with the working tree and those two copied over
#
# A prebuilt binary uses python3's torch (PyTorch 2.11.0 for CUDA 13) for libtorch and its
# nvidia-nccl wheel for NCCL. Figures go to --out (default gpu-check-out/): figures.json,
# summary.txt and the logs; the training run's files go to a scratch folder (--work).
# TROUPE_PEAK_TFLOPS overrides the GPU's dense bf16 peak used for MFU (scripts/gpu_mfu.py).
set -euo pipefail
cd "$(dirname "$0")/.."

binary="" data="" out="gpu-check-out" steps=50 work="" prepare=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --data) data="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --work) work="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --prepare) prepare=1; shift ;;
        *) echo "gpu-check: unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done

if [ -n "$prepare" ]; then
    scripts/setup.sh
    # shellcheck disable=SC1091
    source "${TROUPE_CACHE:-$HOME/.cache/troupe}/env.sh"
    cargo build --release --features cuda --bin troupe
    mkdir -p target/gpu
    strip -o target/gpu/troupe target/release/troupe
    [ -f data/shakespeare-gpt2/meta.json ] \
        || target/release/troupe prepare --shakespeare --out data/shakespeare-gpt2 --vocab-size 50257
    # The embedded default's data (what `troupe local` would prepare on first use).
    [ -f data/shakespeare/meta.json ] \
        || target/release/troupe prepare --shakespeare --out data/shakespeare --vocab-size 2048 --val-fraction 0.1 --seed 1337
    echo "gpu-check: ready: target/gpu/troupe ($(du -h target/gpu/troupe | cut -f1)), data/shakespeare-gpt2 and data/shakespeare ($(du -sh data | cut -f1))"
    exit 0
fi

mkdir -p "$out"
out="$(cd "$out" && pwd)"
[ -n "$work" ] || work="$(mktemp -d "${TMPDIR:-/tmp}/troupe-gpu-check.XXXXXX")"
mkdir -p "$work"
summary="$out/summary.txt"
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/nvidia-smi.txt" 2>&1 \
    || { echo "gpu-check: nvidia-smi does not work here: no GPU to check" >&2; exit 1; }
gpu_name="$(head -n1 "$out/nvidia-smi.txt" | cut -d, -f1)"
say "gpu: $(head -n1 "$out/nvidia-smi.txt")"

if [ -n "$binary" ]; then
    binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"
    torch_dir="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
    torch_version="$(python3 -c 'import torch; print(torch.__version__)')"
    case "$torch_version" in
        2.11.0*) ;;
        *) echo "gpu-check: python3's torch is $torch_version; troupe (tch 0.24) needs PyTorch 2.11.0" >&2; exit 1 ;;
    esac
    # cudarc loads NCCL as libnccl.so; the wheel ships libnccl.so.2: link it in a folder of
    # its own on the library path (the process then shares torch's copy).
    nccl="$(find "$(dirname "$torch_dir")/nvidia" -name libnccl.so.2 -print -quit 2>/dev/null || true)"
    mkdir -p "$work/nccl-link"
    [ -z "$nccl" ] || ln -sfn "$nccl" "$work/nccl-link/libnccl.so"
    export LD_LIBRARY_PATH="$torch_dir/lib:$work/nccl-link${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "prebuilt binary $binary; libtorch $torch_dir/lib; NCCL ${nccl:-not found}"
else
    scripts/setup.sh
    # shellcheck disable=SC1091
    source "${TROUPE_CACHE:-$HOME/.cache/troupe}/env.sh"
    cargo build --release --features cuda --bin troupe
    binary="$PWD/target/release/troupe"
    say "1. CUDA tests"
    if TROUPE_REQUIRE_CUDA=1 cargo test --release --features cuda -p troupe-worker -p troupe-common -- nccl device precision \
            >"$out/cuda-tests.log" 2>&1; then
        say "   passed ($(grep -c '\.\.\. ok' "$out/cuda-tests.log") tests; log in cuda-tests.log)"
    else
        say "   FAILED (log in $out/cuda-tests.log)"
    fi
fi

say "2. troupe gpu-check"
check_rc=0
timeout 240 "$binary" gpu-check --out "$out/figures.json" >"$out/gpu-check.log" 2>&1 || check_rc=$?
tee -a "$summary" <"$out/gpu-check.log"

say "3. GPT-2 124M, $steps steps on one GPU"
if [ -z "$data" ]; then
    data="data/shakespeare-gpt2"
    [ -f "$data/meta.json" ] || "$binary" prepare --shakespeare --out "$data" --vocab-size 50257 >"$out/prepare.log" 2>&1
fi
data="$(cd "$data" && pwd)"
run_config="$out/gpt2-124m.toml"
# The run's own copy: the data folder, a scratch run folder, checkpoint and evaluation at the
# end only, a short warm-up.
sed -e "s|^dir = .*|dir = \"$data\"|" -e "s|^out_dir = .*|out_dir = \"$work/runs\"|" \
    -e 's|^interval = .*|interval = 0|' -e "s|^steps = .*|steps = $steps|" -e 's|^warmup_steps = .*|warmup_steps = 10|' \
    -e 's|^sequences = .*|sequences = 16|' configs/gpt2-124m.toml >"$run_config"
train_rc=0
timeout 300 "$binary" local --gpus 1 --config "$run_config" --sample-tokens 0 >"$out/train.log" 2>&1 || train_rc=$?
tail -n 5 "$out/train.log" | tee -a "$summary"
python3 scripts/gpu_mfu.py "$work/runs/gpt2-124m/events.jsonl" "$run_config" "$gpu_name" "$out/figures.json" 2>&1 | tee -a "$summary" \
    || train_rc=1
say "4. every strategy on the GPU: the embedded default model, 30 steps each"
strategies_rc=0
for strategy in ddp zero1 zero2 zero3; do
    if timeout 120 "$binary" local --gpus 1 --strategy "$strategy" --steps 30 --out "$work/strategies-$strategy" --sample-tokens 0 \
            >"$out/strategy-$strategy.log" 2>&1; then
        loss="$(grep '"event":"step"' "$work/strategies-$strategy/shakespeare/events.jsonl" | tail -n1 | sed 's/.*"loss":\([0-9.]*\).*/\1/')"
        say "   $strategy: loss after 30 steps $loss"
    else
        strategies_rc=1
        say "   $strategy: FAILED (log in $out/strategy-$strategy.log)"
    fi
done

say "figures: $out/figures.json; summary: $summary (exit: gpu-check $check_rc, training $train_rc, strategies $strategies_rc)"
[ "$check_rc" = 0 ] && [ "$train_rc" = 0 ] && [ "$strategies_rc" = 0 ]
