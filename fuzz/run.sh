#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for FUZZ_SECONDS (default 10) on a scratch copy
# of its corpus in the repo (fuzz/corpus/<target>/; new inputs stay in the scratch copy, under
# fuzz/target/). Exits non-zero at the first target that crashes, leaks memory past the limit
# or hangs, and prints the reproducer's path and the command that replays it.
#
# Works on the stable toolchain: no sanitizer (the crate forbids unsafe code; ASan needs
# nightly flags), debug assertions on so that overflow is a crash. docs/fuzzing.md says more.
#
# Usage: fuzz/run.sh [target...]      FUZZ_SECONDS=300 fuzz/run.sh push
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-10}
# libFuzzer's limits: a slow input (s), the process's RSS, one allocation (MB; enforced only
# under a sanitizer's malloc hooks, the RSS limit otherwise).
timeout=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}
malloc_mb=${FUZZ_MALLOC_MB:-1024}
build=(--sanitizer none --debug-assertions)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: cargo-fuzz is not installed (cargo install --locked cargo-fuzz --version 0.13.2)" >&2
  exit 1
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
if [ ${#targets[@]} -eq 0 ]; then
  echo "fuzz/run.sh: no fuzz targets (cargo fuzz list printed none)" >&2
  exit 1
fi

start=$SECONDS
cargo fuzz build "${build[@]}"
echo "fuzz: built ${#targets[@]} targets in $((SECONDS - start)) s"

# Where cargo put them: fuzz/target, or CARGO_TARGET_DIR when the caller shares one.
bin_dir=${CARGO_TARGET_DIR:-target}/$(rustc -vV | sed -n 's/^host: //p')/release
for t in "${targets[@]}"; do
  scratch=target/corpus-run/$t
  artifacts=artifacts/$t
  rm -rf "$scratch"
  mkdir -p "$scratch" "$artifacts" "corpus/$t"
  before=$(ls "$artifacts")
  t0=$SECONDS
  if ! "$bin_dir/$t" -max_total_time="$seconds" -timeout="$timeout" -rss_limit_mb="$rss_mb" \
      -malloc_limit_mb="$malloc_mb" -print_final_stats=1 -artifact_prefix="$artifacts/" \
      "$scratch" "corpus/$t" >"target/$t.log" 2>&1; then
    tail -n 40 "target/$t.log"
    new=$(comm -13 <(echo "$before") <(ls "$artifacts") | head -n 1)
    echo "fuzz: $t FAILED; reproducer: fuzz/$artifacts/$new" >&2
    echo "fuzz: replay with: cd fuzz && cargo fuzz run ${build[*]} $t $artifacts/$new" >&2
    exit 1
  fi
  stats=$(grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "target/$t.log" | sed 's/^stat:://; s/: */=/' | tr '\n' ' ')
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "target/$t.log" | tail -n 1)
  echo "fuzz: $t ok in $((SECONDS - t0)) s: $stats$cov"
done
echo "fuzz: all ${#targets[@]} targets passed in $((SECONDS - start)) s"
