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

# What builds and runs need; sourced by the other scripts.
cat > "$cache/env.sh" <<ENV
export LIBTORCH="$dest/torch"
export LD_LIBRARY_PATH="$dest/torch/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export TROUPE_CACHE="$cache"
ENV
