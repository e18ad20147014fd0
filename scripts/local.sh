#!/usr/bin/env bash
# The README's first command: set up (once), build, and run `troupe local` on the embedded
# default. Extra arguments go to `troupe local` (see `troupe local --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
source "${TROUPE_CACHE:-$HOME/.cache/troupe}/env.sh"
cargo build --release --quiet --bin troupe ${TROUPE_FEATURES:+--features "$TROUPE_FEATURES"}
exec target/release/troupe local "$@"
