#!/usr/bin/env bash
# The README's second command: set up (once), build, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
source "${TROUPE_CACHE:-$HOME/.cache/troupe}/env.sh"
if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --release --workspace --no-fail-fast "$@"
else
    exec cargo test --release --workspace --no-fail-fast "$@"
fi
