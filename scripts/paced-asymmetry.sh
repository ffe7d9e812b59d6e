#!/usr/bin/env bash
# The paced offset through the relay pair, idle and kept warm (docs/BENCHMARKS.md, "Offset").
#
# One chain (chronyd -x, server relay, client relay) and three measurements of 150 queries
# from one port, one every 20 ms: with nothing else on the path, and while a second probe sends
# through the same relays every 1 ms and every 5 ms. Prints one line per condition:
#   condition=... delay_p50_us=... offset_p50_us=...
# On the development VM the idle offset is +60..+90 us and the warmed ones are within a few us.
# Every run is bounded (count, duration, --max-seconds); everything started is stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --quiet --bin ntp-dtls --example ntp_probe
bin=$PWD/target/release/ntp-dtls
probe=$PWD/target/release/examples/ntp_probe
chronyd=$(command -v chronyd || echo /usr/sbin/chronyd)
[[ -x $chronyd ]] || {
    echo "paced-asymmetry: chronyd missing (make deps)" >&2
    exit 1
}

work=$(mktemp -d /tmp/ntp-dtls-paced.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# The address a daemon logged in its ready line (at most 15 s).
ready_addr() {
    local line
    for _ in $(seq 150); do
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -m1 ' ready ' || true)
        [[ -n $line ]] && {
            sed -n 's/.* listen=\([^ ]*\).*/\1/p' <<<"$line"
            return 0
        }
        sleep 0.1
    done
    echo "paced-asymmetry: no ready line in $1" >&2
    exit 1
}

"$bin" certs --out "$work/pki" --server-name localhost >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'port %s\nbindaddress 127.0.0.1\nallow all\nlocal stratum 2\ncmdport 0\npidfile %s/chronyd.pid\n' \
    "$port" "$work" >"$work/chrony.conf"
"$chronyd" -x -d -u root -f "$work/chrony.conf" >"$work/chronyd.log" 2>&1 &
pids+=($!)
"$bin" server --listen 127.0.0.1:0 --upstream "127.0.0.1:$port" --cert "$work/pki/server.pem" \
    --key "$work/pki/server.key.pem" >"$work/server.log" 2>&1 &
pids+=($!)
server=$(ready_addr "$work/server.log")
"$bin" client --listen 127.0.0.1:0 --server "$server" --ca "$work/pki/ca.pem" \
    --server-name localhost >"$work/client.log" 2>&1 &
pids+=($!)
client=$(ready_addr "$work/client.log")
# chronyd answers once it has read its config; the warm-up queries wait for it.
"$probe" run "$client" --count 20 --give-up 0 --timeout 0.2 --max-seconds 10 >/dev/null

measure() { # condition
    local line
    line=$("$probe" run "$client" --count 150 --interval 0.02 --max-seconds 30)
    printf 'condition=%s %s\n' "$1" "$(tr ' ' '\n' <<<"$line" | grep -E '^(valid|delay_p50_us|offset_p50_us)=' | tr '\n' ' ')"
}

measure idle
for every in 0.001 0.005; do
    "$probe" run "$client" --interval "$every" --duration 5 --max-seconds 8 >/dev/null &
    warmer=$!
    measure "warmed-every-${every}s"
    wait "$warmer"
done
