#!/usr/bin/env bash
# `make fuzz`: runs each fuzz target of fuzz/ under AFL++ (afl.rs, stable toolchain) for
# FUZZ_SECONDS and prints, per target: run time, executions, execs/s, corpus size, edge
# coverage, crashes, hangs. `scripts/fuzz.sh --smoke` is the short run `make test` does:
# fresh state, FUZZ_SECONDS default 10, and a missing cargo-afl skips it instead of
# installing it.
#
#   1. installs cargo-afl (and builds its AFL++) when missing, except with --smoke;
#   2. builds the targets instrumented: `cargo afl build --release` in fuzz/, into
#      $CARGO_TARGET_DIR/afl (default target/afl), apart from pgsilo's own builds;
#   3. runs afl-fuzz per target, FUZZ_JOBS at a time (default 1; at most the cores), from
#      the seeds in fuzz/corpus/<target>/. `make fuzz` keeps its state in
#      target/fuzz/<target>/ and resumes it next time, so runs add up; --smoke starts
#      afresh in target/fuzz-smoke/.
#
# Exit status: 0 when no target found a crash or a hang (--smoke: a crash), 1 when one
# did (the inputs are in <state>/<target>/default/crashes|hangs/; replay one with
# `target/afl/release/<target> < FILE`), 2 when the fuzzers could not be run.
# Environment: FUZZ_SECONDS (per target; default 300, --smoke 10), FUZZ_TARGETS (names,
# space-separated; default all), FUZZ_JOBS, CARGO, CARGO_TARGET_DIR.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOKE=0
[ "${1:-}" = --smoke ] && SMOKE=1
CARGO=${CARGO:-cargo}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BUILD=$TARGET/afl
if [ $SMOKE = 1 ]; then
  STATE=$ROOT/target/fuzz-smoke
  SECONDS_EACH=${FUZZ_SECONDS:-10}
else
  STATE=$ROOT/target/fuzz
  SECONDS_EACH=${FUZZ_SECONDS:-300}
fi
ALL="framing startup scram_server scram_client password userlist config_toml config_ini admin_command sql_rewrite byte_streams"
TARGETS=${FUZZ_TARGETS:-$ALL}
JOBS=${FUZZ_JOBS:-1}
CORES=$(nproc)
[ "$JOBS" -gt "$CORES" ] && JOBS=$CORES
[ "$JOBS" -lt 1 ] && JOBS=1

say() { printf 'fuzz: %s\n' "$*"; }
die() { printf 'fuzz: %s\n' "$*" >&2; exit 2; }

# The AFL++ cargo-afl builds is tied to the afl crate's version in fuzz/Cargo.toml.
AFL_VERSION='^0.18'
if ! "$CARGO" afl --version >/dev/null 2>&1; then
  if [ $SMOKE = 1 ]; then
    say "cargo-afl is not installed: fuzz smoke run skipped (make fuzz, or .ci/run, installs it)"
    exit 0
  fi
  say "installing cargo-afl $AFL_VERSION"
  "$CARGO" install --locked cargo-afl --version "$AFL_VERSION" || die "cannot install cargo-afl"
fi
# AFL++ itself is built per toolchain; `cargo install` builds it for the current one.
afl_help=$("$CARGO" afl fuzz -h 2>&1 || true)
if [[ $afl_help != *"Required parameters"* ]]; then
  say "building AFL++ for this toolchain"
  "$CARGO" afl config --build --force || die "cannot build AFL++"
fi

say "building the targets (cargo afl build --release, into $BUILD)"
(cd "$ROOT/fuzz" && CARGO_TARGET_DIR=$BUILD "$CARGO" afl build --release --quiet) || die "build failed"

# No frequency-scaling check (shared and virtual machines), no core pinning (two targets
# share the cores with whatever else runs), and a core_pattern piped to a crash handler
# must not stop AFL: a crash is still seen, as a signal.
export AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_NO_UI=1 AFL_QUIET=1 AFL_SKIP_CRASHES=1
[ $SMOKE = 1 ] || export AFL_AUTORESUME=1

mkdir -p "$STATE"
run_one() {
  local t=$1 out=$STATE/$1
  [ -x "$BUILD/release/$t" ] || { echo "no binary for target $t" >"$STATE/$t.log"; return 1; }
  [ $SMOKE = 1 ] && rm -rf "$out"
  # -t: an input running over 1 s is a hang (the slowest target takes about 1 ms).
  "$CARGO" afl fuzz -i "$ROOT/fuzz/corpus/$t" -o "$out" -V "$SECONDS_EACH" -t 1000 \
    -- "$BUILD/release/$t" >"$STATE/$t.log" 2>&1
}

pids=()
names=()
failed_to_run=()
for t in $TARGETS; do
  [ -d "$ROOT/fuzz/corpus/$t" ] || die "unknown target $t (targets: $ALL)"
  say "running $t for ${SECONDS_EACH}s"
  run_one "$t" &
  pids+=($!)
  names+=("$t")
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed_to_run+=("${names[$i]}")
done

stat() { sed -n "s/^$1 *: *//p" "$2" 2>/dev/null | head -1; }
found=0
printf '\n%-14s %9s %12s %9s %7s %9s %7s %6s\n' target run_time execs execs/s corpus edges crashes hangs
for t in $TARGETS; do
  f=$STATE/$t/default/fuzzer_stats
  if [ ! -f "$f" ]; then
    printf '%-14s did not run: see %s\n' "$t" "$STATE/$t.log"
    continue
  fi
  run=$(stat run_time "$f"); execs=$(stat execs_done "$f")
  crashes=$(stat saved_crashes "$f"); hangs=$(stat saved_hangs "$f")
  rate=$(( run > 0 ? execs / run : 0 ))
  printf '%-14s %8ss %12s %9s %7s %9s %7s %6s\n' "$t" "$run" "$execs" "$rate" \
    "$(stat corpus_count "$f")" "$(stat bitmap_cvg "$f")" "$crashes" "$hangs"
  # A hang in a 10 s run on a busy machine is as likely the machine (a DNS lookup of a
  # listen_addr, another build): the smoke run fails on crashes only.
  if [ "${crashes:-0}" -gt 0 ] || { [ $SMOKE = 0 ] && [ "${hangs:-0}" -gt 0 ]; }; then
    found=1
  fi
  if [ "${crashes:-0}" -gt 0 ] || [ "${hangs:-0}" -gt 0 ]; then
    for kind in crashes hangs; do
      for c in "$STATE/$t/default/$kind"/id:*; do
        [ -e "$c" ] && say "$t $kind: $c"
      done
    done
  fi
done
echo
[ ${#failed_to_run[@]} -eq 0 ] || die "could not run: ${failed_to_run[*]} (logs in $STATE/)"
if [ $found = 1 ]; then
  say "crashes or hangs found; replay one with: $BUILD/release/TARGET < FILE"
  exit 1
fi
say "no crashes, no hangs"
