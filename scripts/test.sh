#!/usr/bin/env bash
# The README's second command: set up (once), build, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Programs the suite runs for real, from Debian's packages where that is possible (root and
# apt): shellcheck (every shell script must pass it), prometheus (scrapes a running job with the
# shipped config), openssh-server (the ssh launcher's hosts), Slurm and munge (a real one-node
# cluster runs the sbatch script). Elsewhere their tests say they
# skipped (in CI, where they must be present, they fail).
debian_packages=()
command -v shellcheck >/dev/null 2>&1 || debian_packages+=(shellcheck)
command -v prometheus >/dev/null 2>&1 || debian_packages+=(prometheus)
[ -x /usr/sbin/sshd ] || debian_packages+=(openssh-server openssh-client)
# Slurm (a one-node cluster of this machine runs scripts/slurm/troupe.sbatch for real).
command -v slurmctld >/dev/null 2>&1 || debian_packages+=(slurmctld slurmd slurm-client munge)
if [ "${#debian_packages[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "test: installing ${debian_packages[*]} from Debian's packages (once)…" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Their services (sshd on :22, prometheus on :9090) are not started: the tests start their
    # own, on loopback. policy-rc.d is how Debian's maintainer scripts are told so.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${debian_packages[@]}" >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "${debian_packages[@]}" >/dev/null 2>&1; } \
        || echo "test: could not install ${debian_packages[*]}; their tests will be skipped" >&2
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi
# Pinned Python packages the suite drives for real, each installed once into a folder of the
# cache (put on PYTHONPATH by its test): `pip_once FOLDER "IMPORTS" SPEC WHAT [NOTE]` installs SPEC
# unless `import IMPORTS` already works there. Where pip or PyPI is unavailable, the test that
# needs it says it skipped (and fails under CI=true).
pip_once() {
    local dir="${TROUPE_CACHE:-$HOME/.cache/troupe}/$1" imports="$2" spec="$3" what="$4" note="${5:-}"
    if PYTHONPATH="$dir" python3 -c "import $imports" >/dev/null 2>&1; then
        return 0
    fi
    echo "test: installing $what into $dir (once${note:+, $note})…" >&2
    if python3 -m pip install --disable-pip-version-check --root-user-action=ignore --no-warn-conflicts --quiet --target "$dir.partial.$$" "$spec"; then
        rm -rf "$dir"
        mv "$dir.partial.$$" "$dir"
    else
        rm -rf "$dir.partial.$$"
        echo "test: could not install $what; its test will be skipped" >&2
    fi
}
# The official `openai` client, for the test that drives the server with it.
pip_once python-openai openai openai==3.57.0 "the openai Python package"
# lm-evaluation-harness with its API extra: it scores `troupe serve` on the repository's tasks
# (evals/lm_eval).
pip_once python-lm-eval "lm_eval, tenacity, datasets" 'lm-eval[api]==0.4.13' "lm-evaluation-harness" "~750 MB with its dependencies"
# kubernetes-validate (it bundles the Kubernetes API's JSON schemas: no network at test time),
# for the test that validates deploy/k8s.
pip_once python-k8s-validate kubernetes_validate kubernetes-validate==1.37.0 "the kubernetes-validate Python package"
# moto's S3-compatible server and boto3, for the tests of object storage (tests/object_store.rs).
pip_once python-moto "boto3, moto.server" 'moto[server]==5.1.0' "moto's S3 server and boto3"
# shellcheck disable=SC1091
source "${TROUPE_CACHE:-$HOME/.cache/troupe}/env.sh"
# transformers and safetensors, for the test that loads `troupe export`'s folder with them
# (tests/export.rs). Pinned; installed once into the cache like the packages above. Their torch is the
# package setup.sh installed for LIBTORCH (the test puts both folders on PYTHONPATH), with only
# its small pure-Python dependencies added here. That wheel is PyPI's CUDA build, which does
# not import without NVIDIA's libraries (~3 GB, of which a CPU-only check uses nothing): where
# they are missing, stand-ins are built — one small library per missing one, defining each
# symbol torch links against as a function that aborts if ever called — into nvidia/cu13/lib
# of this folder, where torch itself looks for them.
hf_dir="${TROUPE_CACHE:-$HOME/.cache/troupe}/python-hf-export"
torch_py="$(dirname "$LIBTORCH")"
hf_check='import numpy, safetensors.numpy, torch, transformers'
if ! PYTHONPATH="$torch_py:$hf_dir" python3 -c "$hf_check" >/dev/null 2>&1; then
    echo "test: installing transformers and safetensors into $hf_dir (once)…" >&2
    hf_partial="$hf_dir.partial.$$"
    rm -rf "$hf_partial"
    if python3 -m pip install --disable-pip-version-check --root-user-action=ignore --no-warn-conflicts --quiet --target "$hf_partial" \
            transformers==4.57.6 safetensors==0.8.0 \
            'typing-extensions>=4.10.0' 'sympy>=1.13.3' 'networkx>=2.5.1' jinja2 'fsspec>=0.8.5' filelock \
        && { PYTHONPATH="$torch_py:$hf_partial" python3 -c 'import torch' >/dev/null 2>&1 \
             || python3 tests/python/cuda_stand_ins.py "$torch_py/torch" "$hf_partial/nvidia/cu13/lib"; } \
        && PYTHONPATH="$torch_py:$hf_partial" python3 -c "$hf_check" >/dev/null 2>&1; then
        rm -rf "$hf_dir"
        mv "$hf_partial" "$hf_dir"
    else
        rm -rf "$hf_partial"
        echo "test: could not install transformers and safetensors; the Hugging Face half of tests/export.rs will be skipped" >&2
    fi
fi
# Style gates: one formatting (rustfmt.toml) and no clippy warnings, in every target and in
# the NCCL code behind the `cuda` feature. rustfmt and clippy come with rustup's default
# profile; a minimal toolchain gets them here.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    echo "test: adding rustfmt and clippy to the Rust toolchain (once)…" >&2
    rustup component add rustfmt clippy
fi
echo "test: cargo fmt --check…" >&2
cargo fmt --all -- --check
echo "test: cargo clippy -D warnings (all targets, and the cuda feature)…" >&2
cargo clippy --release --quiet --workspace --all-targets -- -D warnings
cargo clippy --release --quiet -p troupe-worker --features cuda --all-targets -- -D warnings
# On a GPU machine (setup.sh set TROUPE_FEATURES=cuda) the whole suite is built with NCCL.
# Elsewhere the `cuda` feature must still build (it loads CUDA only at run time), and the NCCL
# module's tests that need no GPU must pass: its argument checks and error texts.
features=()
if [ -n "${TROUPE_FEATURES:-}" ]; then
    features=(--features "$TROUPE_FEATURES")
else
    echo "test: building the cuda feature (no GPU needed) and running its CPU tests…" >&2
    cargo test --release --quiet -p troupe-worker --features cuda --lib nccl
fi
if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --release --workspace ${features[@]+"${features[@]}"} --no-fail-fast "$@"
else
    exec cargo test --release --workspace ${features[@]+"${features[@]}"} --no-fail-fast "$@"
fi
