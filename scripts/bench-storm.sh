#!/usr/bin/env bash
# Reconnect storm (docs/BENCHMARKS.md "Reconnect storm"): STORM_N associations to one server
# relay (a real `ntp-dtls server` process), the server killed and restarted on the same port,
# and every simulated device reconnecting as the client relay's tunnel does (examples/dtls_load.rs
# --storm-restart: at once after the death, then the tunnel's jittered backoff). A real client
# relay (`ntp-dtls client`), polled every 0.2 s by dtls_load, is the legitimate client whose
# first reply after the restart is timed. Loopback only; every phase is bounded in time.
#
#   scripts/bench-storm.sh                      # 19 900 associations (see below)
#   STORM_N=2000 scripts/bench-storm.sh
#
# Prints dtls_load's `phase=storm` line (storm_t50_s, storm_t99_s, storm_t100_s from the moment
# the restarted server was ready; handshakes/s; server CPU; half-open and RSS peaks; the
# legitimate client's first reply), the per-second timeline, the restarted server's refusal
# counters, and the machine's load.
set -euo pipefail

cd "$(dirname "$0")/.."
# One UDP socket per simulated device: this VM's RLIMIT_NOFILE hard limit is 20 000 (and an
# unprivileged container cannot raise it), so the default leaves room for the generator's own files.
n=${STORM_N:-19900}
storm_seconds=${STORM_SECONDS:-60}
workers=${STORM_WORKERS:-1}
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
[[ ${STORM_BUILD:-1} == 0 ]] || cargo build --release --quiet --bin ntp-dtls --example dtls_load
bin=$PWD/target/release/ntp-dtls
load=$PWD/target/release/examples/dtls_load

work=$(mktemp -d)
cleanup() {
    local f pid
    for f in "$work"/server.pid "$work"/client.pid; do
        pid=$(cat "$f" 2>/dev/null || true)
        [[ -n $pid ]] && kill -TERM -- "-$pid" 2>/dev/null || true
    done
    sleep 0.5
    for f in "$work"/server.pid "$work"/client.pid; do
        pid=$(cat "$f" 2>/dev/null || true)
        [[ -n $pid ]] && kill -KILL -- "-$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# wait_line LOG NEEDLE SECONDS: the first line of LOG containing NEEDLE, colour codes removed.
wait_line() {
    local i line
    for ((i = 0; i < $3 * 10; i++)); do
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | grep -m1 -- "$2" || true)
        [[ -n $line ]] && {
            echo "$line"
            return 0
        }
        sleep 0.1
    done
    echo "bench-storm: no '$2' in $1 within $3 s:" >&2
    cat "$1" >&2
    return 1
}

"$bin" certs --out "$work/pki" --server-name localhost >/dev/null
# Every simulated device shares 127.0.0.1: lift the per-source handshake rate (5/s by default,
# meant for one address); the half-open (4 096) and association (100 000) limits stay as shipped.
printf '[limits]\nhandshake_rate = 1000000\nhandshake_burst = 1000000\n' >"$work/server.toml"
# STORM_HALF_OPEN: another max_half_open, to see what the shipped limit costs in a storm.
[[ -n ${STORM_HALF_OPEN:-} ]] && printf 'max_half_open = %s\n' "$STORM_HALF_OPEN" >>"$work/server.toml"

# start_server LISTEN METRICS LOG: a server relay in its own process group; PID in server.pid.
cat >"$work/start-server.sh" <<EOF
#!/usr/bin/env bash
setsid "$bin" server --config "$work/server.toml" --listen "\$1" --metrics "\$2" \\
    --upstream builtin --cert "$work/pki/server.pem" --key "$work/pki/server.key.pem" \\
    --workers $workers >"\$3" 2>&1 </dev/null &
echo \$! >"$work/server.pid"
EOF
chmod +x "$work/start-server.sh"
"$work/start-server.sh" 127.0.0.1:0 127.0.0.1:0 "$work/server-0.log"
ready=$(wait_line "$work/server-0.log" " ready " 30)
listen=$(sed -n 's/.* listen=\([^ ]*\).*/\1/p' <<<"$ready")
metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' <<<"$ready")

# The restart dtls_load runs: kill the server, start it again on the same ports, wait for ready.
cat >"$work/restart.sh" <<EOF
#!/usr/bin/env bash
set -e
pid=\$(cat "$work/server.pid")
kill -KILL -- "-\$pid"
while kill -0 "\$pid" 2>/dev/null; do sleep 0.01; done
"$work/start-server.sh" "$listen" "$metrics" "$work/server-1.log"
for i in \$(seq 3000); do
    grep -q " ready " "$work/server-1.log" 2>/dev/null && exit 0
    sleep 0.01
done
echo "restart: the server relay did not come back" >&2
exit 1
EOF
chmod +x "$work/restart.sh"

# The legitimate device: a real client relay through the same server relay.
setsid env ${STORM_CLIENT_RUST_LOG:+RUST_LOG=$STORM_CLIENT_RUST_LOG} "$bin" client --listen 127.0.0.1:0 --server "$listen" --ca "$work/pki/ca.pem" \
    --server-name localhost >"$work/client.log" 2>&1 </dev/null &
echo $! >"$work/client.pid"
client_ready=$(wait_line "$work/client.log" " ready " 30)
legit=$(sed -n 's/.* listen=\([^ ,]*\).*/\1/p' <<<"$client_ready")

echo "bench-storm: $n associations to $listen (metrics $metrics), legitimate client relay on $legit;" \
    "$(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
timeout -k 5 $((storm_seconds + 600)) "$load" "$listen" --ca "$work/pki/ca.pem" \
    --server-name localhost --associations "$n" --inflight 64 --handshake-timeout 10 \
    --duration 0 --idle 0 --server-pid "$(cat "$work/server.pid")" \
    --storm-restart "$work/restart.sh" --storm-pid-file "$work/server.pid" \
    --storm-seconds "$storm_seconds" --metrics "$metrics" --legit "$legit" \
    --max-seconds $((storm_seconds + 540)) --label "storm,n=$n,workers=$workers${STORM_HALF_OPEN:+,max_half_open=$STORM_HALF_OPEN}" |
    grep -E '^(phase=storm|storm_timeline|result)' || true
echo "bench-storm: load after: $(cut -d' ' -f1-3 /proc/loadavg)"

# What the restarted server refused, and why (ntp_dtls_dropped_total by reason, non-zero).
exec 3<>"/dev/tcp/${metrics%:*}/${metrics##*:}"
printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
echo "bench-storm: restarted server's non-zero drop counters:" \
    "$(grep -E '^ntp_dtls_dropped_total' <&3 | awk '$2 != 0 { printf "%s ", $0 }')"
exec 3<&-
echo "bench-storm: the legitimate client relay's tunnel events after the restart:"
sed 's/\x1b\[[0-9;]*m//g' "$work/client.log" | grep -E "closed|established|dead|refused|backing" | tail -5 || true
# STORM_CLIENT_LOG=FILE keeps the legitimate client relay's whole log (with STORM_CLIENT_RUST_LOG=debug, its
# health checks and keepalives) for a closer look.
[[ -z ${STORM_CLIENT_LOG:-} ]] || cp "$work/client.log" "$STORM_CLIENT_LOG"
