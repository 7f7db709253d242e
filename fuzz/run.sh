#!/usr/bin/env bash
# Runs every cargo-fuzz target (or the ones named) for SECONDS each, one after the other.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      default: 300 seconds, every target
#
# Works from any directory. Uses nightly if installed, else stable with RUSTC_BOOTSTRAP=1;
# installs cargo-fuzz
# when it is missing. Each target starts from the committed seeds (fuzz/seeds/<target>) and
# from what earlier runs found (fuzz/corpus/<target>, git-ignored; new inputs go there).
# Exits non-zero if any target crashed or broke a property, after printing where the
# failing input was saved and the command that replays it.
set -euo pipefail

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$fuzz_dir")"
seconds="${1:-300}"
shift || true
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]  (got seconds: $seconds)" >&2
  exit 2
fi

# cargo-fuzz passes flags only nightly accepts. Use nightly when it is installed; otherwise
# the stable toolchain with RUSTC_BOOTSTRAP=1, which accepts them too (machines that can
# fetch no toolchain have only stable).
if cargo +nightly --version >/dev/null 2>&1; then
  cargo_fuzz=(cargo +nightly fuzz)
else
  echo "== no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  cargo_fuzz=(cargo fuzz)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cd "$root"
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${cargo_fuzz[@]}" list --fuzz-dir "$fuzz_dir")
fi
if [ ${#targets[@]} -eq 0 ]; then
  echo "fuzz/run.sh: error: no fuzz targets found" >&2
  exit 1
fi

echo "== building ${targets[*]}"
for target in "${targets[@]}"; do
  "${cargo_fuzz[@]}" build --fuzz-dir "$fuzz_dir" "$target"
done

failed=()
for target in "${targets[@]}"; do
  corpus="$fuzz_dir/corpus/$target"
  seeds="$fuzz_dir/seeds/$target"
  artifacts="$fuzz_dir/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  dirs=("$corpus")
  [ -d "$seeds" ] && dirs+=("$seeds")
  extra=()
  [ -f "$fuzz_dir/dicts/$target.dict" ] && extra+=("-dict=$fuzz_dir/dicts/$target.dict")
  marker="$(mktemp)"
  echo "== fuzzing $target for ${seconds}s"
  status=0
  # -timeout: an input that takes over 10 s is reported as a hang (a finding too).
  "${cargo_fuzz[@]}" run --fuzz-dir "$fuzz_dir" "$target" "${dirs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${extra[@]}" \
    || status=$?
  found="$(find "$artifacts" -type f -newer "$marker" 2>/dev/null || true)"
  rm -f "$marker"
  if [ "$status" -ne 0 ] || [ -n "$found" ]; then
    failed+=("$target")
    echo "!! $target FAILED (exit status $status)" >&2
    if [ -n "$found" ]; then
      while IFS= read -r artifact; do
        echo "!!   failing input: ${artifact#"$root"/}" >&2
        echo "!!   reproduce:     cargo +nightly fuzz run --fuzz-dir fuzz $target ${artifact#"$root"/}" >&2
        echo "!!   minimize:      cargo +nightly fuzz tmin --fuzz-dir fuzz $target ${artifact#"$root"/}" >&2
      done <<<"$found"
      echo "!!   (run those from the repository root)" >&2
    fi
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "== fuzzing found problems in: ${failed[*]}" >&2
  exit 1
fi
echo "== fuzzing: no crashes in ${targets[*]} (${seconds}s each)"
