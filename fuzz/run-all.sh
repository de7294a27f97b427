#!/usr/bin/env bash
# Builds every petrel-proto fuzz target and runs each for SECONDS (default 30), one after the
# other (no -jobs: CI machines are small). Exits non-zero if any target crashed or failed to
# build; crash inputs are left in fuzz/artifacts/<target>/ for `cargo +nightly fuzz run
# <target> <file>` to reproduce. Needs the nightly toolchain; installs cargo-fuzz if missing.
set -uo pipefail

seconds="${1:-30}"
case "$seconds" in
  ''|*[!0-9]*) echo "usage: $0 SECONDS" >&2; exit 2 ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "run-all.sh: the nightly toolchain is required (cargo-fuzz needs -Zsanitizer)" >&2
  exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "run-all.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked || exit 1
fi

targets=(control_frame enrol stream_header datagram)

if ! cargo +nightly fuzz build; then
  echo "run-all.sh: build failed" >&2
  exit 1
fi

failed=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "=== fuzz $t for ${seconds}s"
  # The first corpus dir receives new inputs; seeds/ holds committed valid encodings.
  if ! cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
    failed+=("$t")
  fi
done

if ((${#failed[@]})); then
  echo "run-all.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "run-all.sh: all ${#targets[@]} targets ran ${seconds}s without a crash"
