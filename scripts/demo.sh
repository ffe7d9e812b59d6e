#!/usr/bin/env bash
# `make demo`: the whole chain on one machine, on loopback, then everything stopped again.
#
#   NTP client --UDP--> ntp-dtls client --DTLS 1.2--> ntp-dtls server --UDP--> chronyd
#
# Builds the release binary, makes a lab PKI in a temporary directory, starts a time source
# (chronyd with -x on a high port if installed, else the relay's builtin source), both relays on
# unprivileged ports, and queries through the chain with `ntp-dtls query`. As root it also gives
# the client relay a second listener on 127.0.0.123:123 and asks ntpdate and sntp (which only
# speak to port 123) through it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n== %s\n' "$*"; }

say "building (cargo build --release)"
cargo build --release --quiet
# Wherever cargo puts it: CARGO_TARGET_DIR, build.target-dir in a cargo config, or ./target.
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin=$target_dir/release/ntp-dtls
[[ -x $bin ]] || { echo "demo: no $bin after cargo build --release" >&2; exit 1; }

work=$(mktemp -d /tmp/ntp-dtls-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# A free UDP port on 127.0.0.1, chosen by the kernel.
free_port() {
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (at most 15 s) for a daemon's log to show a line containing $2.
wait_for() {
    local log=$1 needle=$2
    for _ in $(seq 150); do
        grep -q -- "$needle" "$log" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out waiting for '$needle' in $log:" >&2
    cat "$log" >&2
    exit 1
}

say "lab PKI (ntp-dtls certs) in $work/pki"
"$bin" certs --out "$work/pki" --server-name localhost --server-name 127.0.0.1 | sed 's/^/   /'

chronyd=$(command -v chronyd || echo /usr/sbin/chronyd)
time_port=$(free_port)
if [[ -x $chronyd ]]; then
    say "time source: chronyd -x (never touches the clock) on 127.0.0.1:$time_port"
    cat >"$work/chrony.conf" <<EOF
port $time_port
bindaddress 127.0.0.1
allow all
local stratum 2
cmdport 0
pidfile $work/chronyd.pid
EOF
    "$chronyd" -x -d -u root -f "$work/chrony.conf" >"$work/chronyd.log" 2>&1 &
    pids+=($!)
    wait_for "$work/chronyd.log" "chronyd version"
    upstream=127.0.0.1:$time_port
    # chronyd answers once it has read its config; the relay drops nothing meanwhile, the
    # queries below simply wait for replies.
else
    say "time source: chronyd not installed (make deps installs it); using the builtin source"
    upstream=builtin
fi

server_port=$(free_port)
say "server relay: DTLS on 127.0.0.1:$server_port -> $upstream"
"$bin" server --listen "127.0.0.1:$server_port" --upstream "$upstream" \
    --cert "$work/pki/server.pem" --key "$work/pki/server.key.pem" >"$work/server.log" 2>&1 &
pids+=($!)
wait_for "$work/server.log" " ready "

client_port=$(free_port)
cat >"$work/client.toml" <<EOF
ca = "$work/pki/ca.pem"

[[tunnel]]
listen = "127.0.0.1:$client_port"
server = "127.0.0.1:$server_port"
server_name = "localhost"
EOF
as_root=false
if [[ $(id -u) == 0 ]]; then
    as_root=true
    cat >>"$work/client.toml" <<EOF

# ntpdate and sntp only query port 123.
[[tunnel]]
listen = "127.0.0.123:123"
server = "127.0.0.1:$server_port"
server_name = "127.0.0.1"
EOF
fi
say "client relay: $(grep -c '\[\[tunnel\]\]' "$work/client.toml") tunnel(s), config:"
sed 's/^/   /' "$work/client.toml"
"$bin" client --config "$work/client.toml" >"$work/client.log" 2>&1 &
pids+=($!)
wait_for "$work/client.log" " ready "

say "ntp-dtls query 127.0.0.1:$client_port (through client relay, DTLS, server relay, time source)"
"$bin" query "127.0.0.1:$client_port" --count 5 --interval 0.2 | sed 's/^/   /'

say "ntp-dtls query --dtls straight to the server relay (no client relay)"
"$bin" query --dtls --ca "$work/pki/ca.pem" --server-name localhost "127.0.0.1:$server_port" \
    --count 3 --interval 0.2 2>&1 | sed 's/^/   /'

if $as_root; then
    if command -v ntpdate >/dev/null || [[ -x /usr/sbin/ntpdate ]]; then
        say "ntpdate -q 127.0.0.123 (ntpsec, through the chain)"
        ntpdate -q 127.0.0.123 2>&1 | sed 's/^/   /' || true
    fi
    if command -v sntp >/dev/null; then
        say "sntp 127.0.0.123 (query only, through the chain)"
        sntp 127.0.0.123 2>&1 | sed 's/^/   /' || true
    fi
else
    say "not root: skipping ntpdate and sntp (they need the relay on port 123)"
fi

say "audit log of the server relay"
sed 's/^/   /' "$work/server.log"
say "audit log of the client relay"
sed 's/^/   /' "$work/client.log"
say "stopping everything"
