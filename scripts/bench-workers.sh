#!/usr/bin/env bash
# One SO_REUSEPORT worker against two (docs/BENCHMARKS.md "Relay path", issue 14), with the
# load generator on a core the server relay does not use: `ntp-dtls server --workers N` pinned
# to CPU 0 by taskset, examples/dtls_load pinned to CPU 1, builtin time source, WORKERS_ASSOC
# associations (default 200) for WORKERS_SECONDS each (default 8), WORKERS_ROUNDS rounds
# (default 3) alternating 1, 2, 2, 1, ... so drift lands on both alike. Loopback only; every run
# is bounded in time.
#
# On a 2-vCPU machine both workers share CPU 0: this can show that a second worker costs
# nothing, never that it scales (that needs a generator on cores of its own beside 2+ for
# the workers).
#
#   scripts/bench-workers.sh
#   WORKERS_ROUNDS=5 WORKERS_SECONDS=10 scripts/bench-workers.sh
set -euo pipefail

cd "$(dirname "$0")/.."
assoc=${WORKERS_ASSOC:-200}
seconds=${WORKERS_SECONDS:-8}
rounds=${WORKERS_ROUNDS:-3}
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
[[ ${WORKERS_BUILD:-1} == 0 ]] || cargo build --release --quiet --bin ntp-dtls --example dtls_load
bin=$PWD/target/release/ntp-dtls
load=$PWD/target/release/examples/dtls_load
if (($(nproc) < 2)); then
    echo "bench-workers: needs 2 CPUs (one for the server relay, one for the generator)" >&2
    exit 1
fi

work=$(mktemp -d)
server_pid=
cleanup() {
    [[ -n $server_pid ]] && kill -TERM -- "-$server_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

"$bin" certs --out "$work/pki" --server-name localhost >/dev/null
# Every generated association shares 127.0.0.1: lift the per-source handshake rate.
printf '[limits]\nhandshake_rate = 1000000\nhandshake_burst = 1000000\n' >"$work/server.toml"

# run WORKERS: prints "workers=N replies_per_s=.. replies_per_server_cpu_s=..".
run() {
    local workers=$1 i addr line
    : >"$work/server.log"
    setsid taskset -c 0 "$bin" server --config "$work/server.toml" --listen 127.0.0.1:0 \
        --upstream builtin --cert "$work/pki/server.pem" --key "$work/pki/server.key.pem" \
        --workers "$workers" >"$work/server.log" 2>&1 </dev/null &
    server_pid=$!
    addr=
    for ((i = 0; i < 300; i++)); do
        addr=$(sed 's/\x1b\[[0-9;]*m//g' "$work/server.log" | sed -n 's/.* ready .*listen=\([^ ]*\).*/\1/p' | head -1)
        [[ -n $addr ]] && break
        sleep 0.1
    done
    [[ -n $addr ]] || {
        echo "bench-workers: the server relay did not get ready:" >&2
        cat "$work/server.log" >&2
        return 1
    }
    line=$(timeout -k 2 $((seconds + 120)) taskset -c 1 "$load" "$addr" --ca "$work/pki/ca.pem" \
        --server-name localhost --associations "$assoc" --duration "$seconds" --idle 0 \
        --server-pid "$server_pid" --max-seconds $((seconds + 100)) --label "workers=$workers" \
        2>/dev/null | grep '^result ' || true)
    kill -TERM -- "-$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
    printf 'workers=%s %s %s\n' "$workers" \
        "$(grep -o 'replies_per_s=[^ ]*' <<<"$line" || echo replies_per_s=error)" \
        "$(grep -o 'replies_per_server_cpu_s=[^ ]*' <<<"$line" || echo replies_per_server_cpu_s=error)"
}

echo "bench-workers: $(date -u +%FT%TZ), $(nproc) CPUs, $(uname -r), server relay on CPU 0, dtls_load on CPU 1," \
    "$assoc associations, $seconds s a run, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
order=()
for ((r = 0; r < rounds; r++)); do
    if ((r % 2 == 0)); then order+=(1 2); else order+=(2 1); fi
done
for w in "${order[@]}"; do run "$w"; done | tee "$work/lines"
for w in 1 2; do
    awk -v w="workers=$w" '$1 == w {
        split($2, a, "="); split($3, b, "="); n++; s += a[2]; c += b[2]
        printf "%s%s", (n > 1 ? ", " : w ": replies/s "), a[2]
    } END { if (n) printf "; mean %.0f replies/s, %.0f replies per server CPU-second\n", s / n, c / n }' "$work/lines"
done
echo "bench-workers: load after: $(cut -d' ' -f1-3 /proc/loadavg)"
