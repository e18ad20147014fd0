#!/usr/bin/env bash
# Installs what troupe needs to build and run, idempotently: libtorch 2.11.0 (the version
# tch 0.24 expects) from PyPI's torch wheel. Prints nothing but progress; safe to run often.
#
#   TROUPE_CACHE  where to install (default ~/.cache/troupe)
#
# On a machine where nvidia-smi works, torch is installed with its CUDA dependencies;
# elsewhere only the CPU parts (about 1.2 GB).
set -euo pipefail

cache="${TROUPE_CACHE:-$HOME/.cache/troupe}"
mkdir -p "$cache"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    flavour=cuda
else
    flavour=cpu
fi
dest="$cache/torch-2.11.0-$flavour"

if [ ! -f "$dest/torch/lib/libtorch_cpu.so" ]; then
    echo "setup: installing libtorch 2.11.0 ($flavour) into $dest (once)…" >&2
    partial="$dest.partial.$$"
    rm -rf "$partial"
    if [ "$flavour" = cuda ]; then
        python3 -m pip install --disable-pip-version-check --root-user-action=ignore --quiet --target "$partial" torch==2.11.0
    else
        python3 -m pip install --disable-pip-version-check --root-user-action=ignore --quiet --no-deps --target "$partial" \
            torch==2.11.0 'nvidia-cuda-runtime==13.0.96.*' 'nvidia-cuda-cupti==13.0.85.*'
    fi
    rm -rf "$dest"
    mv "$partial" "$dest"
fi

# On a GPU machine troupe is built with NCCL (the `cuda` feature). cudarc loads NCCL by the
# name libnccl.so, which PyTorch's nvidia-nccl wheel does not ship (it has libnccl.so.2): a
# link of that name, in a folder of its own on the library path, points at it.
features=""
library_path="$dest/torch/lib"
if [ "$flavour" = cuda ]; then
    nccl="$(find "$dest/nvidia" -name 'libnccl.so.2' -print -quit 2>/dev/null || true)"
    if [ -n "$nccl" ]; then
        mkdir -p "$cache/nccl-link"
        ln -sfn "$nccl" "$cache/nccl-link/libnccl.so"
        library_path="$library_path:$cache/nccl-link"
        features="cuda"
    else
        echo "setup: torch's NCCL library (nvidia/nccl/lib/libnccl.so.2) is missing; GPU workers will average over the QUIC ring" >&2
    fi
fi

# What builds and runs need; sourced by the other scripts. TROUPE_FEATURES: cargo features
# for this machine (cuda where a GPU and NCCL are present).
cat > "$cache/env.sh" <<ENV
export LIBTORCH="$dest/torch"
export LD_LIBRARY_PATH="$library_path\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export TROUPE_CACHE="$cache"
export TROUPE_FEATURES="$features"
ENV
