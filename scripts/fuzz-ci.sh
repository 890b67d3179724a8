#!/usr/bin/env bash
# A short fuzzing run for CI: each target for FUZZ_SECONDS (default 60) from the committed seeds.
# A crash (panic, sanitizer report, timeout, out-of-memory) fails the script; libFuzzer leaves
# the input that caused it under crates/mecha-core/fuzz/artifacts/. Long runs: fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/../crates/mecha-core/fuzz"
seconds="${FUZZ_SECONDS:-60}"
# cargo-fuzz drives libFuzzer through nightly-only flags; the stable toolchain accepts them
# with RUSTC_BOOTSTRAP=1.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
for target in safetensors_header parse_mecha; do
  corpus="$(mktemp -d)"
  # -timeout: an input that takes over 10 s is a hang; -rss_limit_mb: one that needs 2 GiB is a
  # memory blow-up. Both count as crashes.
  log="$(mktemp)"
  if ! cargo fuzz run --release "$target" "$corpus" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz target $target failed (a build error or a crash, above); a crashing input is kept in crates/mecha-core/fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|Done [0-9]+ runs)' "$log" || true
  rm -rf "$corpus" "$log"
  echo "fuzz target $target: ${seconds} s, no crash"
done
