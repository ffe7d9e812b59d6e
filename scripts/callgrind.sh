#!/usr/bin/env bash
# User-space instructions per reply on the server relay's path (docs/BENCHMARKS.md "Relay path").
#
# Runs a release build of `ntp-dtls server` (builtin time source, one worker) under
# `valgrind --tool=callgrind`, opens CG_ASSOC associations with examples/dtls_load.rs, zeroes
# callgrind's counters once they are established, sends exactly CG_REQUESTS requests (each waits
# for its reply, CG_WINDOW outstanding), dumps the counters, and prints the instructions (Ir) per
# reply and the functions with the largest inclusive and exclusive costs. Instrumentation is on
# only during the load phase (callgrind_control -i on/off), so the handshakes are not
# in the count. Instruction counts do not depend on the machine's load, so this is the number to
# compare across commits when other work shares the CPU.
#
#   scripts/callgrind.sh                    # 20 000 requests over 4 associations
#   CG_REQUESTS=5000 CG_TOP=40 scripts/callgrind.sh
#   CG_RELAY=client scripts/callgrind.sh    # the client relay instead: CG_REQUESTS queries from
#                                           # CG_WINDOW examples/ntp_probe clients through it, to a
#                                           # server relay (builtin source) outside valgrind
#
# Output: one `callgrind` key=value line (ir_total, replies, ir_per_reply), then the tables.
# The raw profile stays in $CG_OUT (default target/callgrind/) for callgrind_annotate.
set -euo pipefail

cd "$(dirname "$0")/.."
requests=${CG_REQUESTS:-20000}
assoc=${CG_ASSOC:-4}
window=${CG_WINDOW:-4}
top=${CG_TOP:-25}
out=${CG_OUT:-target/callgrind}
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

for tool in valgrind callgrind_control callgrind_annotate; do
    command -v "$tool" >/dev/null || {
        echo "callgrind.sh: $tool not found (apt-get install valgrind)" >&2
        exit 1
    }
done

relay=${CG_RELAY:-server}
[[ $relay == server || $relay == client ]] || {
    echo "callgrind.sh: CG_RELAY must be server or client" >&2
    exit 2
}
[[ ${CG_BUILD:-1} == 0 ]] ||
    cargo build --release --quiet --bin ntp-dtls --example dtls_load --example ntp_probe
target_dir=${CARGO_TARGET_DIR:-target}
bin=$target_dir/release/ntp-dtls
load=$target_dir/release/examples/dtls_load
probe=$target_dir/release/examples/ntp_probe

mkdir -p "$out"
work=$(mktemp -d)
server_pid=
client_pid=
cleanup() {
    [[ -n $client_pid ]] && kill -TERM "$client_pid" 2>/dev/null && wait "$client_pid" 2>/dev/null
    [[ -n $server_pid ]] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# The address a relay's "ready" line names (listen=...), from its log; empty until it is there.
ready_addr() { sed 's/\x1b\[[0-9;]*m//g' "$1" | sed -n 's/.* ready .*listen=\([^ ]*\).*/\1/p' | head -1 || true; }

"$bin" certs --out "$work/pki" --server-name localhost >/dev/null
rm -f "$out"/callgrind.out
# The relay under valgrind does not busy-poll: the instructions of a loop reading an empty
# socket while it waits are idle time turned into CPU, not the cost of a reply, and valgrind's
# slowness would stretch them.
no_busy_poll=()
"$bin" server --help | grep -q -- --busy-poll-us && no_busy_poll=(--busy-poll-us 0)
if [[ $relay == client ]]; then
    : >"$work/server.log"
    : >"$work/client.log"
    "$bin" server --listen 127.0.0.1:0 --upstream builtin --cert "$work/pki/server.pem" \
        --key "$work/pki/server.key.pem" >"$work/server.log" 2>&1 &
    server_pid=$!
    addr=
    for _ in $(seq 100); do addr=$(ready_addr "$work/server.log"); [[ -n $addr ]] && break; sleep 0.1; done
    [[ -n $addr ]] || { echo "callgrind.sh: the server relay did not start:" >&2; cat "$work/server.log" >&2; exit 1; }
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/callgrind.out" \
        "$bin" client --listen 127.0.0.1:0 --server "$addr" --ca "$work/pki/ca.pem" \
        --server-name localhost "${no_busy_poll[@]}" >"$work/client.log" 2>&1 &
    client_pid=$!
    listen=
    for _ in $(seq 600); do # up to 60 s: valgrind starts slowly
        grep -q "association established" "$work/client.log" && listen=$(ready_addr "$work/client.log")
        [[ -n $listen ]] && break
        kill -0 "$client_pid" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n $listen ]] || { echo "callgrind.sh: the client relay did not connect:" >&2; cat "$work/client.log" >&2; exit 1; }
    callgrind_control -i on "$client_pid" >/dev/null
    result=$(timeout -k 5 600 "$probe" run "$listen" --clients "$window" --count "$requests" \
        --timeout 2 --max-seconds 590 | grep -o 'status=.*')
    callgrind_control -i off "$client_pid" >/dev/null
    kill -TERM "$client_pid"
    wait "$client_pid" 2>/dev/null || true
    client_pid=
fi
if [[ $relay == server ]]; then
    # One source address for every association: lift the per-source handshake rate.
    printf '[limits]\nhandshake_rate = 1000000\nhandshake_burst = 1000000\n' >"$work/server.toml"
    : >"$work/server.log"
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/callgrind.out" \
        "$bin" server --config "$work/server.toml" --listen 127.0.0.1:0 --upstream builtin \
        --cert "$work/pki/server.pem" --key "$work/pki/server.key.pem" --workers 1 \
        "${no_busy_poll[@]}" >"$work/server.log" 2>&1 &
    server_pid=$!

    addr=
    for _ in $(seq 600); do # up to 60 s: valgrind starts slowly
        addr=$(sed 's/\x1b\[[0-9;]*m//g' "$work/server.log" | sed -n 's/.* ready .*listen=\([^ ]*\).*/\1/p' | head -1 || true)
        [[ -n $addr ]] && break
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ -z $addr ]]; then
        echo "callgrind.sh: the server did not become ready:" >&2
        cat "$work/server.log" >&2
        exit 1
fi

result=$(timeout -k 5 600 "$load" "$addr" --ca "$work/pki/ca.pem" --server-name localhost \
    --associations "$assoc" --inflight "$assoc" --handshake-timeout 60 --window "$window" \
    --timeout 5 --requests "$requests" --duration 600 --idle 0 --max-seconds 590 \
    --before-load "callgrind_control -i on $server_pid >/dev/null" \
    --after-load "callgrind_control -i off $server_pid >/dev/null" | grep '^result ')

kill -TERM "$server_pid"
wait "$server_pid" 2>/dev/null || true
server_pid=
fi

valid=$(sed -n 's/.* valid=\([0-9]*\).*/\1/p' <<<"$result")
profile=$out/callgrind.out
[[ -n $profile && -n $valid && $valid -gt 0 ]] || {
    echo "callgrind.sh: no profile or no replies: $result" >&2
    exit 1
}
total=$(callgrind_annotate "$profile" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }')
echo "callgrind relay=$relay requests=$requests associations=$assoc window=$window replies=$valid ir_total=$total ir_per_reply=$((total / valid)) profile=$profile"
if [[ $relay == server ]]; then echo "dtls_load: $result"; else echo "ntp_probe: $result"; fi
# Instrumentation is on only during the load phase, so frames entered before it (main, the
# tokio worker loop) are not on callgrind's stack; lines at 99% and above (inclusive) are the
# outermost frames that were, and are left out, as any self cost above 30% would be.
table() { # --inclusive=yes|no
    callgrind_annotate --auto=no --threshold=100 "$@" "$profile" 2>/dev/null |
        sed -n '/file:function/,$p' |
        awk -v n="$valid" -v t="$total" -v top="$top" -v incl="$([[ $1 == --inclusive=yes ]] && echo 1 || echo 0)" '
            $1 ~ /^[0-9,]+$/ {
                ir = $1; gsub(",", "", ir); ir += 0
                if (ir >= (incl ? 0.99 : 0.30) * t) next
                $1 = ""; if ($2 ~ /^\(/) { $2 = ""; if ($3 ~ /^[0-9.]+%\)$/) $3 = "" }
                sub(/^ +/, ""); sub(/ \[[^]]*\]$/, "")
                sub(/^\/rustc\/[0-9a-f]*\/library\//, ""); sub(/^.*\/registry\/src\/[^\/]*\//, "")
                if (k++ < top) printf "%8.0f %5.1f%%  %s\n", ir / n, 100 * ir / t, substr($0, 1, 150) }'
}
echo
echo "By component (self cost, Ir per reply):"
callgrind_annotate --auto=no --threshold=100 --inclusive=no "$profile" 2>/dev/null |
    sed -n '/file:function/,$p' |
    awk -v n="$valid" -v t="$total" '
        $1 ~ /^[0-9,]+$/ {
            ir = $1; gsub(",", "", ir); ir += 0
            if (ir >= 0.30 * t) next
            line = $0
            if (line ~ /malloc\.c|raw_vec|alloc::alloc|liballoc|realloc/) c = "allocation (malloc/free, Vec growth)"
            else if (line ~ /sip\.rs|hash_one|hash\/mod\.rs|hashbrown|core::hash|src\/hash\.rs/) c = "hashing (SipHash or keyed, hashbrown probes)"
            else if (line ~ /memmove|memcpy|memset/) c = "memcpy/memset"
            else if (line ~ /ring-/) c = "ring (AES-GCM)"
            else if (line ~ /rtc-dtls|rtc_dtls|rtc-shared/) c = "rtc-dtls record layer and endpoint"
            else if (line ~ /tokio|mio-/) c = "tokio + mio"
            else if (line ~ /proto\/src|ntp_dtls_proto/) c = "ntp-dtls-proto (endpoint, admission, NTP)"
            else if (line ~ /(^| )src\/|ntp_dtls::/) c = "ntp-dtls shell (src/)"
            else if (line ~ /bytes-/) c = "bytes"
            else c = "other (std, libc, nix, clock reads)"
            sum[c] += ir
            all += ir }
        END { for (c in sum) printf "%8.0f %5.1f%%  %s\n", sum[c] / n, 100 * sum[c] / t, c
              printf "%8.0f %5.1f%%  (sum of the above)\n", all / n, 100 * all / t }' | sort -rn
echo
echo "Top $top inclusive (Ir per reply, share of the total):"
table --inclusive=yes
echo
echo "Top $top exclusive (self cost):"
table --inclusive=no
