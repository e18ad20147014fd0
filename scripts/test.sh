#!/usr/bin/env bash
# The README's second command: set up (once), build, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Tools the suite checks with: shellcheck (every shell script must pass it). Installed from
# Debian's packages where that is possible (root and apt); elsewhere its test says it skipped.
if ! command -v shellcheck >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "test: installing shellcheck from Debian's packages (once)…" >&2
    apt-get install -y -qq --no-install-recommends shellcheck >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends shellcheck >/dev/null 2>&1; } \
        || echo "test: could not install shellcheck; its test will be skipped" >&2
fi
# The official `openai` Python package, for the test that drives the server with it. Pinned;
# installed once into the cache; where pip or PyPI is unavailable that test says it skipped.
openai_dir="${TROUPE_CACHE:-$HOME/.cache/troupe}/python-openai"
if ! PYTHONPATH="$openai_dir" python3 -c 'import openai' >/dev/null 2>&1; then
    echo "test: installing the openai Python package into $openai_dir (once)…" >&2
    if python3 -m pip install --disable-pip-version-check --root-user-action=ignore --no-warn-conflicts --quiet --target "$openai_dir.partial.$$" openai==3.57.0; then
        rm -rf "$openai_dir"
        mv "$openai_dir.partial.$$" "$openai_dir"
    else
        rm -rf "$openai_dir.partial.$$"
        echo "test: could not install openai; its test will be skipped" >&2
    fi
fi
# shellcheck disable=SC1091
source "${TROUPE_CACHE:-$HOME/.cache/troupe}/env.sh"
if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --release --workspace --no-fail-fast "$@"
else
    exec cargo test --release --workspace --no-fail-fast "$@"
fi
