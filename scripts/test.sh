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
# shellcheck disable=SC1091
source "${TROUPE_CACHE:-$HOME/.cache/troupe}/env.sh"
if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --release --workspace --no-fail-fast "$@"
else
    exec cargo test --release --workspace --no-fail-fast "$@"
fi
