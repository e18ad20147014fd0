#!/usr/bin/env bash
# Runs troupe's benchmarks and gathers their tables into one report:
#
#   scripts/bench.sh                      # every benchmark (about 20 minutes on 2 cores)
#   scripts/bench.sh peers allreduce      # only these
#
# Writes target/bench/report.md (each benchmark's table, with the machine, the commit and the
# load average around each run) and target/bench/report.csv (every benchmark's CSV rows, each
# prefixed with the benchmark's name). Each benchmark also keeps its own
# target/bench/<name>.{md,csv}. Numbers from a busy machine are not comparable: run it alone.
#
# The PyTorch peers (gloo, DDP) run from the PyTorch version troupe links (2.11.0), installed
# with what Python needs to import it (torch's CUDA libraries, which its Python module loads
# even on CPU): about 4.6 GB, once, into the cache. TROUPE_TORCH_PY names another folder that
# holds an importable torch; TROUPE_BENCH_INSTALL_TORCH=0 skips the install (those columns then
# say why they are missing).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
source "${TROUPE_CACHE:-$HOME/.cache/troupe}/env.sh"

cache="${TROUPE_CACHE:-$HOME/.cache/troupe}"
if [ -z "${TROUPE_TORCH_PY:-}" ]; then
    py_torch="$cache/torch-2.11.0-full"
    gloo_check='import torch.distributed as d; assert d.is_gloo_available()'
    if ! PYTHONPATH="$py_torch" python3 -c "$gloo_check" >/dev/null 2>&1 && [ "${TROUPE_BENCH_INSTALL_TORCH:-1}" = 1 ]; then
        echo "bench: installing torch 2.11.0 with its dependencies into $py_torch for the PyTorch peers (once, ~4.6 GB)…" >&2
        partial="$py_torch.partial.$$"
        rm -rf "$partial"
        if python3 -m pip install --disable-pip-version-check --root-user-action=ignore --no-warn-conflicts --quiet --target "$partial" torch==2.11.0 numpy; then
            rm -rf "$py_torch"
            mv "$partial" "$py_torch"
        else
            rm -rf "$partial"
            echo "bench: could not install torch for Python; the PyTorch columns will say why they are missing" >&2
        fi
    fi
    # Only a torch that imports is handed on; otherwise the benchmarks look for one themselves.
    if PYTHONPATH="$py_torch" python3 -c "$gloo_check" >/dev/null 2>&1; then
        export TROUPE_TORCH_PY="$py_torch"
    fi
fi

all=(allreduce peers scaling step_overhead model_step recovery serving checkpoint memory)
if [ "$#" -gt 0 ]; then benches=("$@"); else benches=("${all[@]}"); fi
for b in "${benches[@]}"; do
    [ -f "benches/$b.rs" ] || { echo "bench: no benchmark named $b (have: ${all[*]})" >&2; exit 2; }
done

out=target/bench
mkdir -p "$out"
cargo build --release --benches --bins >&2

report=$out/report.md
csv=$out/report.csv
load() { cut -d' ' -f1-3 /proc/loadavg; }
{
    echo "# troupe benchmark report"
    echo
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
    echo
    echo "Each claim is a ratio measured within one run of its benchmark; absolute numbers alongside."
} >"$report"
echo "bench,row" >"$csv"

failed=()
for b in "${benches[@]}"; do
    echo "bench: $b (load average $(load))…" >&2
    before=$(load)
    started=$SECONDS
    if cargo bench --bench "$b" >&2; then status=ok; else status=failed; failed+=("$b"); fi
    {
        echo
        echo "## $b"
        echo
        if [ "$status" = ok ] && [ -f "$out/$b.md" ]; then
            cat "$out/$b.md"
        else
            echo "**The benchmark failed**; see its output above."
        fi
        echo
        echo "_\`cargo bench --bench $b\`: $((SECONDS - started)) s; load average before $before, after $(load)._"
    } >>"$report"
    if [ "$status" = ok ] && [ -f "$out/$b.csv" ]; then
        sed "s/^/$b,/" "$out/$b.csv" >>"$csv"
    fi
done

echo "bench: report in $report and $csv" >&2
cat "$report"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "bench: failed: ${failed[*]}" >&2
    exit 1
fi
