#!/usr/bin/env bash
# Runs every cargo-fuzz target under fuzz/ for a bounded time (`make fuzz`).
#
#   FUZZ_SECONDS=60       seconds per target (libFuzzer -max_total_time)
#   FUZZ_TARGETS="a b"    targets to run (default: all of `cargo fuzz list`)
#   FUZZ_SANITIZER=none   none (default: the targets are safe Rust and panics are the oracle,
#                         so this doubles executions per second) or address
#
# Each target starts from fuzz/seeds/<target> (committed) and grows fuzz/corpus/<target>
# (ignored by git). Logs go to fuzz/logs/<target>.log. Exits non-zero if any target found a
# crash, a failed invariant, a timeout or an out-of-memory, and prints the input's path.
#
# cargo-fuzz needs nightly compiler flags; on a stable toolchain RUSTC_BOOTSTRAP=1 enables them.
set -euo pipefail

cd "$(dirname "$0")/.."
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_SANITIZER="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
if [[ -z "$targets" ]]; then
    echo "fuzz: no targets" >&2
    exit 1
fi

# Inputs longer than any the relays accept, but not much longer: shorter inputs, more runs.
max_len() {
    case "$1" in
        ntp_packet) echo 1500 ;;   # 1400-byte limit + 22 bytes of parameters + some
        dtls_record) echo 2048 ;;  # one datagram with room for a 1500-byte MTU
        handshake_limits) echo 8192 ;;  # a few dozen datagrams of operations
        *) echo 4096 ;;
    esac
}

echo "fuzz: building targets (sanitizer: $FUZZ_SANITIZER)"
cargo fuzz build --sanitizer "$FUZZ_SANITIZER"

mkdir -p fuzz/logs
failed=()
for target in $targets; do
    corpus="fuzz/corpus/$target"
    seeds="fuzz/seeds/$target"
    log="fuzz/logs/$target.log"
    mkdir -p "$corpus"
    dirs=("$corpus")
    [[ -d "$seeds" ]] && dirs+=("$seeds")
    echo "fuzz: $target for ${FUZZ_SECONDS}s (log: $log)"
    status=0
    # -timeout: one input taking 10 s is a finding (a hang), not a stalled run.
    cargo fuzz run --sanitizer "$FUZZ_SANITIZER" "$target" "${dirs[@]}" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
        -max_len="$(max_len "$target")" \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    grep -E '^#[0-9]+[[:space:]]+DONE|^Done [0-9]+ runs|^stat::' "$log" | sed "s/^/  $target: /" || true
    if [[ $status -ne 0 ]]; then
        failed+=("$target")
        echo "fuzz: $target FAILED (exit $status), see $log:" >&2
        # The panic (or libFuzzer's report of a timeout, OOM or signal) with its stack.
        grep -E -A 30 "panicked at|^==[0-9]+== ERROR|ALARM: working on the last Unit|out-of-memory" \
            "$log" | head -n 40 >&2 || true
        grep -E 'Test unit written to' "$log" | sed 's/^.*Test unit written to /  input: /' >&2 || true
        echo "  reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $FUZZ_SANITIZER $target <input>" >&2
        echo "  minimise:  RUSTC_BOOTSTRAP=1 cargo fuzz tmin --sanitizer $FUZZ_SANITIZER $target <input>" >&2
    fi
done

if [[ ${#failed[@]} -ne 0 ]]; then
    echo "fuzz: failures in: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: every target ran ${FUZZ_SECONDS}s without a failure"
