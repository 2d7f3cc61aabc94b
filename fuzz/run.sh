#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each; `run.sh 600 "envelope token"`
# runs only those two). Not part of CI.
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain RUSTC_BOOTSTRAP=1 lets
# cargo-fuzz use the sanitizer flags it needs.
# Crashes land in fuzz/artifacts/<target>/; copy them to fuzz/regressions/<target>/ so the
# `fuzz_regressions` unit test replays them forever.
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-60}"
export RUSTC_BOOTSTRAP=1
failed=()
TARGETS="${2:-phoenix_frames envelope token ws_frames longpoll resume presence_diff history_notice}"
for target in $TARGETS; do
  mkdir -p "fuzz/corpus/$target" "fuzz/regressions/$target"
  cp -n fuzz/regressions/"$target"/* "fuzz/corpus/$target/" 2>/dev/null || true
  echo "== $target (${SECONDS_PER_TARGET}s)"
  cargo fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- -max_total_time="$SECONDS_PER_TARGET" -max_len=4096 \
    || failed+=("$target")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes in: ${failed[*]} (see fuzz/artifacts/)"
  exit 1
fi
echo "no crashes"
