#!/usr/bin/env bash
# Builds and runs the deterministic simulation (see sim/README.md). Works from any directory.
#
#   sim/run.sh [SEEDS] [EXTRA ARGS...]     SEEDS: "1..100" (both ends included) or a count N
#                                          (= 1..N); default 20. Extra args go to replikv-sim,
#                                          e.g. --check-determinism 5, --steps 5000, --bug lost-append
#   sim/run.sh nodes [SEEDS] [EXTRA ARGS...]   stage 2: real nodes on turmoil hosts (replikv-sim nodes)
#
# Exits non-zero on any invariant violation or determinism failure; every violation line
# prints the command that replays it.
set -euo pipefail
sim_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mode=()
if [ "${1:-}" = nodes ]; then
  mode=(nodes)
  shift
fi
seeds="${1:-20}"
shift || true
cd "$sim_dir"
# .cargo/config.toml adds --cfg tokio_unstable; Cargo.lock pins tokio (Builder::rng_seed is unstable API).
cargo build --release --locked --quiet
exec "$sim_dir/target/release/replikv-sim" "${mode[@]}" --seeds "$seeds" "$@"
