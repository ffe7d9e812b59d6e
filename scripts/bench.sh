#!/usr/bin/env bash
# `make bench`: ntp-dtls against the physical limit and the alternatives, on loopback, in one go.
#
# Rows (every NTP query goes to one chronyd -x on a high loopback port):
#   direct   NTP client -> chronyd                                            (the limit)
#   udp-pair NTP client -> udp_relay -> udp_relay -> chronyd   (a plain blocking relay pair:
#            examples/udp_relay.rs, plain UDP, no DTLS, one blocking thread per direction, no
#            batching, default socket buffers; a baseline for the hops, not a lower bound)
#   ntp-dtls NTP client -> ntp-dtls client -> DTLS 1.2 -> ntp-dtls server -> chronyd
#   ntp-dtls-raw  the same with --no-timestamp-correction on both relays: the delay the relay
#            path really adds, comparable with udp-pair's (the corrected row's delay has the
#            relays' residence taken out, as a client sees it)
#   seed     NTP client -> socat udp4-recvfrom,fork -> TCP -> stunnel client -> TLS ->
#            stunnel server -> socat tcp4-listen,fork -> UDP chronyd           (the seed's article)
#   socat-dtls NTP client -> socat udp4-recvfrom,fork -> openssl-dtls-client -> DTLS ->
#            socat openssl-dtls-server,fork -> UDP chronyd                      (socat's own DTLS)
# The seed chain is configured as a lab following the article would: a self-signed RSA
# certificate made with `openssl req -x509` on the stunnel server, the stunnel client with no
# verification; socat forks a child per datagram and per TCP connection, with default backlog.
# Both socat chains get `-T 2` (children exit after 2 s idle) so a run cannot pile up processes
# without bound; it does not change a query's path.
#
# Besides the issue's columns, a paced column: sequential queries one every 20 ms, so every
# process on the path is idle when a query comes, as in service (NTP clients poll every few
# seconds to minutes); back-to-back queries keep every process hot and hide that cost. And a
# calibration line: what one process wake-up costs on this machine.
#
# Measured with examples/ntp_probe (kernel receive timestamps, one key=value line per run) and
# examples/dtls_load (the server relay alone). Rows are interleaved in rounds (rotated, every
# other round reversed) so machine drift lands on every row alike; ratios come from this run.
# Every probe run is bounded (count or duration, a stall detector, a hard time limit); a row
# whose chain stalls is restarted before its next run and its cells say so. Everything started
# here is stopped on exit.
#
# BENCH_QUICK=1: 200 sequential queries per cell and 3-second load phases, for development.
# A full run takes about 15 minutes once built (the storm, callgrind of each relay, 1 vs 2 workers and the
# 120-s real-client clock section included).
# BENCH_KEEP=1 keeps the work directory (logs, raw samples) and prints its path.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t_start=$(date +%s)

quick=${BENCH_QUICK:-0}
if [[ $quick == 1 ]]; then
    seq_total=200 seq_rounds=2 paced_total=60 load_seconds=3 load_rounds=1 dl_seconds=3
    cq_limit=5 cq_runs=3
    assoc_list=(1000 3000)
else
    seq_total=1000 seq_rounds=4 paced_total=200 load_seconds=10 load_rounds=2 dl_seconds=10
    cq_limit=5 cq_runs=5
    assoc_list=(1000 10000)
fi
levels=(1 16 256)
query_timeout=0.5 # seconds a query waits for its reply
pace=0.02         # seconds between paced queries: relays go idle in between, as in service
give_up=10        # consecutive losses that make a sequential run "stalled"
rows=(direct udp-pair ntp-dtls ntp-dtls-raw seed socat-dtls)

note() { printf -- '-- %s\n' "$*" >&2; }
die() {
    printf 'bench: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
note "dependencies (scripts/install-deps.sh: chrony, socat, stunnel4, openssl)"
bash scripts/install-deps.sh >&2
for tool in ss setsid timeout awk pgrep; do
    if ! command -v "$tool" >/dev/null; then
        note "installing iproute2 procps util-linux mawk for $tool"
        sudo=()
        [[ $(id -u) == 0 ]] || sudo=(sudo)
        "${sudo[@]}" apt-get update -qq >/dev/null
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends iproute2 procps util-linux mawk >/dev/null
        break
    fi
done
chronyd=$(command -v chronyd || echo /usr/sbin/chronyd)
stunnel=$(command -v stunnel4 || command -v stunnel || echo /usr/bin/stunnel4)
[[ -x $chronyd && -x $stunnel ]] || die "chronyd or stunnel missing after install-deps"

note "building (cargo build --release: ntp-dtls, examples ntp_probe, dtls_load and udp_relay)"
cargo build --release --quiet --bin ntp-dtls --example ntp_probe --example dtls_load \
    --example udp_relay
bin=$PWD/target/release/ntp-dtls
probe=$PWD/target/release/examples/ntp_probe
dtls_load=$PWD/target/release/examples/dtls_load
udp_relay=$PWD/target/release/examples/udp_relay

work=$(mktemp -d /tmp/ntp-dtls-bench.XXXXXX)
mkdir -p "$work/s" "$work/log"

# ---------------------------------------------------------------------------------------------
# Processes: each daemon gets its own session and process group (setsid), so stopping a chain
# also stops the children socat forked for it.
declare -A row_pgids=() row_addr=() row_stalled=() row_restarts=()
all_pgids=()
last_pid=

start_daemon() { # name command...
    local name=$1
    shift
    setsid "$@" >"$work/log/$name.log" 2>&1 </dev/null &
    last_pid=$!
    all_pgids+=("$last_pid")
}

stop_groups() { # pgid...
    local g
    for g in "$@"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    for _ in $(seq 30); do
        local alive=0
        for g in "$@"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for g in "$@"; do kill -KILL -- "-$g" 2>/dev/null || true; done
    for g in "$@"; do wait "$g" 2>/dev/null || true; done
}

cleanup() {
    trap - EXIT INT TERM
    ((${#all_pgids[@]})) && stop_groups "${all_pgids[@]}"
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        note "work directory kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A free loopback port (TCP and UDP both unused), chosen at random below the ephemeral range.
declare -A handed_out=()
free_port() {
    local port used
    used=$(ss -Htuan 2>/dev/null | awk '{print $5}' | sed 's/.*://')
    for _ in $(seq 200); do
        port=$((20000 + RANDOM % 12000))
        [[ -n ${handed_out[$port]:-} ]] && continue
        grep -qx "$port" <<<"$used" && continue
        handed_out[$port]=1
        echo "$port"
        return 0
    done
    die "no free port found"
}

# Waits (at most 15 s) for a log line containing $2; prints it.
wait_log() {
    local log=$1 needle=$2 line
    for _ in $(seq 150); do
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$log" 2>/dev/null | grep -m1 -- "$needle" || true)
        [[ -n $line ]] && {
            echo "$line"
            return 0
        }
        sleep 0.1
    done
    echo "bench: timed out waiting for '$needle' in $log:" >&2
    cat "$log" >&2
    exit 1
}

# Waits (at most 10 s) until something listens on 127.0.0.1:$2 ($1: -u UDP or -t TCP).
wait_listen() {
    local proto=$1 port=$2
    for _ in $(seq 100); do
        ss -Hln "$proto" "sport = :$port" 2>/dev/null | grep -q . && return 0
        sleep 0.1
    done
    die "nothing listens on port $port ($proto)"
}

# Value of key $2 in key=value line $1 ("-" when absent).
field() {
    local v
    v=$(sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1")
    echo "${v:--}"
}

cpu_ns() { # pid: CPU time of every thread, from schedstat
    local total=0 t v
    for t in /proc/"$1"/task/*/schedstat; do
        read -r v _ <"$t" 2>/dev/null && total=$((total + v))
    done
    echo "$total"
}

# ---------------------------------------------------------------------------------------------
note "lab PKI (ntp-dtls certs) and the article's self-signed stunnel certificate"
"$bin" certs --out "$work/pki" --server-name localhost --server-name 127.0.0.1 >/dev/null
openssl req -new -x509 -days 30 -nodes -subj "/CN=localhost" \
    -out "$work/pki/stunnel.pem" -keyout "$work/pki/stunnel.key" 2>/dev/null

ch_port=$(free_port)
cat >"$work/chrony.conf" <<EOF
port $ch_port
bindaddress 127.0.0.1
allow all
local stratum 2
cmdport 0
pidfile $work/chronyd.pid
EOF
start_daemon chronyd "$chronyd" -x -d -u root -f "$work/chrony.conf"
chronyd_pid=$last_pid
wait_log "$work/log/chronyd.log" "chronyd version" >/dev/null
ready=0
for _ in $(seq 50); do
    line=$("$probe" run "127.0.0.1:$ch_port" --count 1 --timeout 0.2 --give-up 1 --max-seconds 2)
    [[ $(field "$line" valid) == 1 ]] && ready=1 && break
    sleep 0.1
done
((ready)) || die "chronyd does not answer on 127.0.0.1:$ch_port: $(cat "$work/log/chronyd.log")"
note "chronyd -x on 127.0.0.1:$ch_port"

start_row() { # row
    local row=$1 a b c d
    case $row in
    direct)
        row_pgids[$row]=""
        row_addr[$row]=127.0.0.1:$ch_port
        ;;
    udp-pair)
        a=$(free_port) b=$(free_port)
        local q1 q2
        start_daemon udp-pair-server "$udp_relay" "127.0.0.1:$b" "127.0.0.1:$ch_port"
        q2=$last_pid
        start_daemon udp-pair-client "$udp_relay" "127.0.0.1:$a" "127.0.0.1:$b"
        q1=$last_pid
        wait_listen -u "$a"
        wait_listen -u "$b"
        row_pgids[$row]="$q1 $q2"
        row_addr[$row]=127.0.0.1:$a
        ;;
    ntp-dtls | ntp-dtls-raw)
        local raw=()
        [[ $row == ntp-dtls-raw ]] && raw=(--no-timestamp-correction)
        start_daemon "$row-server" "$bin" server --listen 127.0.0.1:0 \
            --upstream "127.0.0.1:$ch_port" --cert "$work/pki/server.pem" \
            --key "$work/pki/server.key.pem" "${raw[@]}"
        a=$last_pid
        local server_addr
        server_addr=$(wait_log "$work/log/$row-server.log" " ready " |
            sed -n 's/.* listen=\([^ ]*\).*/\1/p')
        start_daemon "$row-client" "$bin" client --listen 127.0.0.1:0 --server "$server_addr" \
            --ca "$work/pki/ca.pem" --server-name localhost "${raw[@]}"
        b=$last_pid
        row_addr[$row]=$(wait_log "$work/log/$row-client.log" " ready " |
            sed -n 's/.* listen=\([^ ]*\).*/\1/p')
        row_pgids[$row]="$b $a"
        [[ $row == ntp-dtls ]] && dtls_client_pid=$b dtls_server_pid=$a
        ;;
    seed)
        a=$(free_port) b=$(free_port) c=$(free_port) d=$(free_port)
        cat >"$work/stunnel-server.conf" <<EOF
foreground = yes
pid =
debug = 3
[ntp-server]
accept = 127.0.0.1:$c
connect = 127.0.0.1:$d
cert = $work/pki/stunnel.pem
key = $work/pki/stunnel.key
EOF
        cat >"$work/stunnel-client.conf" <<EOF
foreground = yes
pid =
debug = 3
[ntp-client]
client = yes
accept = 127.0.0.1:$b
connect = 127.0.0.1:$c
EOF
        local p1 p2 p3 p4
        start_daemon seed-socat-udp2tcp socat -T 2 "udp4-recvfrom:$a,bind=127.0.0.1,fork" \
            "tcp4:127.0.0.1:$b"
        p1=$last_pid
        start_daemon seed-stunnel-client "$stunnel" "$work/stunnel-client.conf"
        p2=$last_pid
        start_daemon seed-stunnel-server "$stunnel" "$work/stunnel-server.conf"
        p3=$last_pid
        start_daemon seed-socat-tcp2udp socat -T 2 \
            "tcp4-listen:$d,bind=127.0.0.1,reuseaddr,fork" "udp4:127.0.0.1:$ch_port"
        p4=$last_pid
        wait_listen -u "$a"
        wait_listen -t "$b"
        wait_listen -t "$c"
        wait_listen -t "$d"
        row_pgids[$row]="$p1 $p2 $p3 $p4"
        row_addr[$row]=127.0.0.1:$a
        ;;
    socat-dtls)
        a=$(free_port) b=$(free_port)
        local p1 p2
        start_daemon socat-dtls-server socat -T 2 \
            "openssl-dtls-server:$b,bind=127.0.0.1,cert=$work/pki/stunnel.pem,key=$work/pki/stunnel.key,verify=0,fork" \
            "udp4:127.0.0.1:$ch_port"
        p2=$last_pid
        start_daemon socat-dtls-client socat -T 2 "udp4-recvfrom:$a,bind=127.0.0.1,fork" \
            "openssl-dtls-client:127.0.0.1:$b,verify=0"
        p1=$last_pid
        wait_listen -u "$a"
        wait_listen -u "$b"
        row_pgids[$row]="$p1 $p2"
        row_addr[$row]=127.0.0.1:$a
        ;;
    esac
    row_stalled[$row]=0
}

stop_row() {
    local row=$1
    if [[ -n ${row_pgids[$row]} ]]; then
        # shellcheck disable=SC2086 # a list of pgids
        stop_groups ${row_pgids[$row]}
    fi
    row_pgids[$row]=""
}

# A row whose chain stalled is started afresh before its next run.
ensure_row() {
    local row=$1
    if [[ ${row_stalled[$row]} == 1 ]]; then
        stop_row "$row"
        start_row "$row"
        row_restarts[$row]=$((${row_restarts[$row]:-0} + 1))
    fi
}

# Processes in a row's groups now (socat forks a child per datagram or connection).
row_procs() {
    local row=$1 n=0 g
    for g in ${row_pgids[$row]}; do n=$((n + $(pgrep -c -g "$g" || true))); done
    echo "$n"
}
declare -A row_base_procs=()

# After a run, wait (at most 5 s) for the forked children of a row to go, so they do not land
# on the next row's measurement.
settle() {
    local row=$1
    for _ in $(seq 50); do
        (($(row_procs "$row") <= ${row_base_procs[$row]:-0})) && return 0
        sleep 0.1
    done
}

# One bounded probe run; the line is in $last_line.
last_line=
probe_run() { # row tag max_seconds args...
    local row=$1 tag=$2 max=$3
    shift 3
    last_line=$(timeout -k 2 $((max + 10)) "$probe" run "${row_addr[$row]}" --label "$tag" \
        --timeout "$query_timeout" --max-seconds "$max" "$@" 2>>"$work/log/probe.err") ||
        last_line="label=$tag status=error"
    echo "$row $last_line" >>"$work/runs.log"
    if [[ $(field "$last_line" status) != ok ]]; then
        row_stalled[$row]=1
        note "$row: $tag $(field "$last_line" status) after $(field "$last_line" valid) valid replies"
    fi
    settle "$row"
}

# Round r's order: rows rotated by r, every other round reversed.
order=()
order_for_round() {
    local r=$1 n=${#rows[@]} i
    order=()
    for ((i = 0; i < n; i++)); do order+=("${rows[$(((i + r) % n))]}"); done
    if ((r % 2 == 1)); then
        local rev=()
        for ((i = n - 1; i >= 0; i--)); do rev+=("${order[$i]}"); done
        order=("${rev[@]}")
    fi
}

# ---------------------------------------------------------------------------------------------
for row in "${rows[@]}"; do
    start_row "$row"
    row_base_procs[$row]=$(row_procs "$row")
    note "$row: listening on ${row_addr[$row]}"
done

note "warm-up: 20 queries per row (a stalled row is restarted before it is measured)"
for row in "${rows[@]}"; do
    probe_run "$row" "warmup" 30 --count 20 --give-up 3
done

per_round=$((seq_total / seq_rounds)) paced_per_round=$((paced_total / seq_rounds))
note "sequential: $seq_total back-to-back queries per row and source-port mode, and" \
    "$paced_total paced (one per ${pace} s), in $seq_rounds rounds"
for ((r = 0; r < seq_rounds; r++)); do
    order_for_round "$r"
    for mode in one fresh paced; do
        for row in "${order[@]}"; do
            ensure_row "$row"
            args=(--count "$per_round" --give-up "$give_up" --samples "$work/s/$row.$mode.$r")
            [[ $mode == fresh ]] && args+=(--fresh-port)
            [[ $mode == paced ]] && args=(--count "$paced_per_round" --interval "$pace"
                --give-up "$give_up" --samples "$work/s/$row.$mode.$r")
            probe_run "$row" "$row.$mode.$r" 120 "${args[@]}"
        done
    done
done

# What one process wake-up costs here: the same direct queries, received with the kernel's
# timestamp and with the clock read after recvmsg returns (the probe's own wake-up).
note "calibration: a process wake-up on this machine"
calib_kernel=$("$probe" run "${row_addr[direct]}" --count "$per_round" --max-seconds 30 --label calib-kernel-rx)
calib_user=$("$probe" run "${row_addr[direct]}" --count "$per_round" --user-rx-ts --max-seconds 30 --label calib-user-rx)

load_per_round=$((load_seconds / load_rounds))
note "load: ${levels[*]} concurrent clients, ${load_seconds} s per row and level, in $load_rounds rounds"
: >"$work/cpu.txt"
for c in "${levels[@]}"; do
    for ((r = 0; r < load_rounds; r++)); do
        order_for_round "$((r + c))"
        for row in "${order[@]}"; do
            ensure_row "$row"
            ch0=$(cpu_ns "$chronyd_pid") cl0=0 sv0=0
            if [[ $row == ntp-dtls ]]; then
                cl0=$(cpu_ns "$dtls_client_pid") sv0=$(cpu_ns "$dtls_server_pid")
            fi
            probe_run "$row" "$row.c$c.$r" $((load_per_round + 20)) --clients "$c" --duration "$load_per_round" \
                --give-up 0 --samples "$work/s/$row.c$c.$r"
            ch1=$(cpu_ns "$chronyd_pid") cl1=0 sv1=0
            if [[ $row == ntp-dtls ]]; then
                cl1=$(cpu_ns "$dtls_client_pid") sv1=$(cpu_ns "$dtls_server_pid")
            fi
            echo "$row $c $(field "$last_line" valid) $(field "$last_line" elapsed_s)" \
                "$((cl1 - cl0)) $((sv1 - sv0)) $((ch1 - ch0))" >>"$work/cpu.txt"
        done
    done
done

median_us() { # column file: median of a measurements.log column, in microseconds
    awk -v c="$1" 'NF >= 18 && $1 ~ /^[0-9]/ { print $c }' "$2" 2>/dev/null | sort -g |
        awk '{ a[NR] = $1 } END { if (NR) printf "%.1f", a[int((NR + 1) / 2)] * 1e6; else print "-" }'
}

# chronyd itself as the client, through each path: its own offset and delay estimates.
note "chronyd -Q through each path"
chrony_q() { # row -> one line
    local row=$1 dir=$work/cq-$1 host port i wrongs=() out meas=$work/cq-$1/all.log
    host=${row_addr[$row]%:*} port=${row_addr[$row]##*:}
    mkdir -p "$dir"
    : >"$meas"
    # chronyd -Q stops after its first clock update (3 samples at 1/16 s polling): a few runs
    # give enough samples for a median, in a second or two per path.
    for ((i = 0; i < cq_runs; i++)); do
        mkdir -p "$dir/$i/log"
        cat >"$dir/$i/client.conf" <<EOF
server $host port $port minpoll -4 maxpoll -4 maxsamples 8
port 0
cmdport 0
pidfile $dir/$i/chronyd.pid
logdir $dir/$i/log
log measurements
EOF
        out=$(timeout -k 2 $((cq_limit + 10)) "$chronyd" -Q -t "$cq_limit" -u root \
            -f "$dir/$i/client.conf" 2>&1 || true)
        wrongs+=($(sed -n 's/.*System clock wrong by \([-+0-9.e]*\) seconds.*/\1/p' <<<"$out"))
        cat "$dir/$i/log/measurements.log" >>"$meas" 2>/dev/null || true
        # A path that gave nothing in one run will not in the next: stop there.
        ((${#wrongs[@]} > 0)) || break
    done
    local n off del wrong
    # measurements.log data lines: column 12 is the offset, 13 the delay (seconds).
    n=$(awk 'NF >= 18 && $1 ~ /^[0-9]/' "$meas" | wc -l)
    off=$(median_us 12 "$meas")
    del=$(median_us 13 "$meas")
    if ((${#wrongs[@]} > 0)); then
        wrong=$(printf '%s\n' "${wrongs[@]}" | sort -g |
            awk '{ a[NR] = $1 } END { printf "%+.1f", a[int((NR + 1) / 2)] * 1e6 }')
        printf '%-11s chronyd -Q x%s: clock wrong by %s us (median of runs); %s samples: median offset %s us, median delay %s us\n' \
            "$row" "${#wrongs[@]}" "$wrong" "$n" "$off" "$del"
    else
        printf '%-11s chronyd -Q: no measurement within %s s (%s samples logged)\n' "$row" "$cq_limit" "$n"
    fi
}
cq_lines=()
for row in "${rows[@]}"; do
    ensure_row "$row"
    cq_lines+=("$(chrony_q "$row")")
done

# ---------------------------------------------------------------------------------------------
# The server relay alone, driven by dtls_load. Each run gets a fresh server (a clean baseline).
workers_list=("")
if "$bin" server --help 2>/dev/null | grep -q -- '--workers'; then workers_list=(1 2); fi
note "server relay alone: dtls_load with ${assoc_list[*]} associations (builtin time source)"
dl_lines=()
dl_run() { # upstream K workers
    local upstream=$1 k=$2 workers=$3 extra=() tag pid line name=builtin
    [[ -n $workers ]] && extra=(--workers "$workers")
    [[ $upstream == builtin ]] || name=chronyd
    tag="$name k=$k${workers:+ workers=$workers}"
    # All of dtls_load's sockets share 127.0.0.1: lift the per-source handshake rate, which
    # would otherwise admit 5 new associations a second from it, as meant for one address.
    printf '[limits]\nhandshake_rate = 1000000\nhandshake_burst = 1000000\n' >"$work/load-server.toml"
    start_daemon dl-server "$bin" server --config "$work/load-server.toml" \
        --listen 127.0.0.1:0 --upstream "$upstream" \
        --cert "$work/pki/server.pem" --key "$work/pki/server.key.pem" "${extra[@]}"
    pid=$last_pid
    local addr
    addr=$(wait_log "$work/log/dl-server.log" " ready " | sed -n 's/.* listen=\([^ ]*\).*/\1/p')
    sleep 0.5
    line=$(timeout -k 2 $((dl_seconds + 200)) "$dtls_load" "$addr" --ca "$work/pki/ca.pem" \
        --server-name localhost --associations "$k" --duration "$dl_seconds" --idle 2 \
        --server-pid "$pid" --max-seconds $((dl_seconds + 180)) --label "${tag// /,}" \
        2>>"$work/log/dtls_load.err" | grep '^result ' || true)
    [[ -n $line ]] || line="result label=${tag// /,} status=error"
    dl_lines+=("$line")
    echo "$line" >>"$work/runs.log"
    stop_groups "$pid"
}
for workers in "${workers_list[@]}"; do
    for k in "${assoc_list[@]}"; do dl_run builtin "$k" "$workers"; done
done
dl_run "127.0.0.1:$ch_port" "${assoc_list[0]}" ""

# ---------------------------------------------------------------------------------------------
# Report.
declare -A cell=()
for row in "${rows[@]}"; do
    for mode in one fresh paced; do
        files=("$work"/s/"$row".$mode.*)
        if [[ -e ${files[0]} ]]; then
            cell[$row.$mode]=$("$probe" merge --label "$row.$mode" "${files[@]}")
        else
            cell[$row.$mode]="label=$row.$mode status=error"
        fi
    done
    for c in "${levels[@]}"; do
        files=("$work"/s/"$row".c$c.*)
        if [[ -e ${files[0]} ]]; then
            cell[$row.c$c]=$("$probe" merge --label "$row.c$c" "${files[@]}")
        else
            cell[$row.c$c]="label=$row.c$c status=error"
        fi
    done
done

f() { field "${cell[$1]}" "$2"; }
# "stalled" marker for a cell whose runs stalled: the valid replies of the first stalled run.
mark() {
    local s
    s=$(f "$1" status)
    case $s in
    ok) echo "" ;;
    stalled) echo " (stalled after $(f "$1" stalled_after))" ;;
    *) echo " ($s)" ;;
    esac
}
added() { # row mode -> "+X (R x)"
    awk -v a="$(f "$1.$2" delay_p50_us)" -v d="$(f "direct.$2" delay_p50_us)" 'BEGIN {
        if (a == "-" || d == "-" || d == 0) { print "-"; exit }
        r = a / d; printf (r >= 100 ? "%+.0f (%.0fx)" : "%+.1f (%.1fx)"), a - d, r }'
}
n0() { # a counter of a cell, 0 when absent
    local v
    v=$(f "$1" "$2")
    [[ $v =~ ^[0-9]+$ ]] && echo "$v" || echo 0
}
lost_inv() { # row -> seq lost/invalid, load lost/invalid
    local l=0 i=0 s=0 m
    for m in one fresh; do
        l=$((l + $(n0 "$1.$m" lost))) i=$((i + $(n0 "$1.$m" invalid))) s=$((s + $(n0 "$1.$m" sent)))
    done
    local L=0 I=0 S=0 c
    for c in "${levels[@]}"; do
        L=$((L + $(n0 "$1.c$c" lost))) I=$((I + $(n0 "$1.c$c" invalid)))
        S=$((S + $(n0 "$1.c$c" sent)))
    done
    echo "$l/$i of $s | $L/$I of $S"
}

elapsed=$(($(date +%s) - t_start))
echo
echo "**ntp-dtls benchmark, $(date -u +%Y-%m-%d) on $(nproc) cores ($(uname -r)); mode: $([[ $quick == 1 ]] && echo quick || echo full)**"
echo
echo "Delay and offset in microseconds (NTP delay: round trip minus the server's own time)."
echo "Sequential: $seq_total queries per row and mode in $seq_rounds interleaved rounds;"
echo "load: clients that each wait for their reply (timeout ${query_timeout} s) for ${load_seconds} s per level, in $load_rounds rounds;"
echo "paced: $paced_total sequential queries from one port, one every ${pace} s, so every process on the path is idle"
echo "when a query arrives, as with a real NTP client polling every few seconds or minutes."
echo
echo "| path | p50 1 port | p99 1 port | p50 fresh port | p99 fresh port | added p50 1 port | added p50 fresh | offset p50 1 port / fresh | lost/invalid seq | lost/invalid load | replies/s @1 | @16 | @256 | paced p50 | paced offset p50 |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for row in "${rows[@]}"; do
    li=$(lost_inv "$row")
    printf '| %s | %s%s | %s | %s%s | %s | %s | %s | %s / %s | %s | %s | %s%s | %s%s | %s%s | %s%s | %s |\n' \
        "$row" \
        "$(f "$row.one" delay_p50_us)" "$(mark "$row.one")" "$(f "$row.one" delay_p99_us)" \
        "$(f "$row.fresh" delay_p50_us)" "$(mark "$row.fresh")" "$(f "$row.fresh" delay_p99_us)" \
        "$(added "$row" one)" "$(added "$row" fresh)" \
        "$(f "$row.one" offset_p50_us)" "$(f "$row.fresh" offset_p50_us)" \
        "${li% | *}" "${li#* | }" \
        "$(f "$row.c1" rate)" "$(mark "$row.c1")" "$(f "$row.c16" rate)" "$(mark "$row.c16")" \
        "$(f "$row.c256" rate)" "$(mark "$row.c256")" \
        "$(f "$row.paced" delay_p50_us)" "$(mark "$row.paced")" "$(f "$row.paced" offset_p50_us)"
done
echo
for row in "${rows[@]}"; do
    [[ -n ${row_restarts[$row]:-} ]] &&
        echo "$row: its chain stalled and was restarted ${row_restarts[$row]} time(s) during the run."
done
echo
echo "Calibration: direct queries, receive time from the kernel vs from the clock after recvmsg returns"
echo "(the difference is one process wake-up on this machine; the ntp-dtls chain puts four on the path):"
echo "delay p50 $(field "$calib_kernel" delay_p50_us) us (kernel) vs $(field "$calib_user" delay_p50_us) us (user space);" \
    "p99 $(field "$calib_kernel" delay_p99_us) vs $(field "$calib_user" delay_p99_us) us."
echo
echo "Offset through each path, cross-checked with chronyd -Q (chronyd as the NTP client, polling"
echo "every 1/16 s from a fresh port per query, kernel timestamps):"
echo
echo '```'
printf '%s\n' "${cq_lines[@]}"
echo '```'
echo
echo "CPU per reply under load, from /proc/PID/task/*/schedstat (us of CPU per valid reply):"
echo
echo "| path | clients | replies/s | client relay | server relay | chronyd |"
echo "|---|---:|---:|---:|---:|---:|"
for row in direct ntp-dtls; do
    for c in "${levels[@]}"; do
        awk -v row="$row" -v c="$c" '$1 == row && $2 == c {
                v += $3; e += $4; cl += $5; sv += $6; ch += $7 }
            END {
                if (v == 0) { printf "| %s | %s | 0 | - | - | - |\n", row, c; exit }
                if (row == "direct") { printf "| %s | %s | %.0f | - | - | %.2f |\n", row, c, v / e, ch / v / 1e3 }
                else { printf "| %s | %s | %.0f | %.2f | %.2f | %.2f |\n", row, c, v / e, cl / v / 1e3, sv / v / 1e3, ch / v / 1e3 } }' \
            "$work/cpu.txt"
    done
done
echo
echo "Server relay alone (dtls_load: one UDP socket per association, requests round-robin over all"
echo "of them, 64 outstanding; ${dl_seconds} s load phase). Handshakes per server CPU-second = handshakes/s"
echo "on one core; RSS per association = (VmRSS with K idle associations - VmRSS before) / K."
echo
echo "| upstream | associations | established | handshakes/s | handshakes per server CPU-s | replies/s | replies per server CPU-s | server CPU busy | RSS/assoc established | RSS/assoc after load |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for line in "${dl_lines[@]}"; do
    busy=$(awk -v c="$(field "$line" load_server_cpu_s)" -v e="$(field "$line" load_elapsed_s)" \
        'BEGIN { if (c == "-" || e == "-" || e == 0) print "-"; else printf "%.0f%%", 100 * c / e }')
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s B | %s B |\n' \
        "$(field "$line" label | sed 's/,k=[0-9]*//')" "$(field "$line" associations)" \
        "$(field "$line" established)" "$(field "$line" hs_per_s)" \
        "$(field "$line" hs_per_server_cpu_s)" "$(field "$line" replies_per_s)" \
        "$(field "$line" replies_per_server_cpu_s)" "$busy" \
        "$(field "$line" rss_per_assoc_established_b)" "$(field "$line" rss_per_assoc_idle_b)"
done

# ---------------------------------------------------------------------------------------------
echo
echo "Targets of issue 4, from this run:"
echo
verdict() { if [[ $1 == 1 ]]; then echo PASS; else echo MISS; fi; }
holds() { awk -v a="$1" -v b="$2" "BEGIN { if (a == \"-\" || b == \"-\") { print 0; exit } print ($3) ? 1 : 0 }"; }
for mode in one fresh; do
    a=$(f "ntp-dtls.$mode" delay_p50_us) d=$(f "direct.$mode" delay_p50_us)
    ok=$(holds "$a" "$d" "a - b <= 50")
    echo "- $(verdict "$ok") ntp-dtls adds <= 50 us to p50 delay ($mode port): $(added ntp-dtls "$mode")"
done
beyond_pair=$(awk -v a="$(f ntp-dtls.one delay_p50_us)" -v u="$(f udp-pair.one delay_p50_us)" 'BEGIN {
    if (a == "-" || u == "-") print "-"; else printf "%+.1f", a - u }')
echo "  (the plain blocking pair: two UDP relays without DTLS, udp-pair, add $(added udp-pair one) one port;" \
    "ntp-dtls adds $beyond_pair us more than they do: DTLS and its own logic)"
o=$(f ntp-dtls.one offset_p50_us) of=$(f ntp-dtls.fresh offset_p50_us)
ok=$(awk -v a="$o" -v b="$of" 'BEGIN { if (a == "-" || b == "-") print 0; else print ((a < 0 ? -a : a) <= 5 && (b < 0 ? -b : b) <= 5) ? 1 : 0 }')
echo "- $(verdict "$ok") |offset p50| <= 5 us: $o us (one port), $of us (fresh port)"
echo "  (not one of the issue's columns: paced, as a polling client sees it, ntp-dtls offset $(f ntp-dtls.paced offset_p50_us) us" \
    "and delay $(f ntp-dtls.paced delay_p50_us) us vs direct $(f direct.paced offset_p50_us) us and $(f direct.paced delay_p50_us) us)"
a1=$(f ntp-dtls.one delay_p50_us) af=$(f ntp-dtls.fresh delay_p50_us)
d1=$(f direct.one delay_p50_us) dff=$(f direct.fresh delay_p50_us)
ok=$(awk -v a1="$a1" -v af="$af" -v d1="$d1" -v df="$dff" 'BEGIN {
    if (a1 == "-" || af == "-" || d1 == "-" || df == "-") { print 0; exit }
    print ((af - df) <= 1.1 * (a1 - d1) + 5) ? 1 : 0 }')
echo "- $(verdict "$ok") a fresh source port costs no more than one port (added p50 fresh <= 1.1 x one port + 5 us): $(added ntp-dtls fresh) vs $(added ntp-dtls one)"
r16=$(f ntp-dtls.c16 rate) d16=$(f direct.c16 rate)
ok=$(holds "$r16" "$d16" "a >= 0.5 * b")
echo "- $(verdict "$ok") throughput at 16 clients >= half of direct: $r16 vs $d16 replies/s ($(awk -v a="$r16" -v b="$d16" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }') x)"
u16=$(f udp-pair.c16 rate)
echo "  (the plain blocking pair, udp-pair: $u16 replies/s, $(awk -v a="$u16" -v b="$d16" 'BEGIN { if (b > 0 && a != "-") printf "%.2f", a / b; else print "-" }') x direct)"
for other in seed socat-dtls; do
    lost=()
    for m in one fresh; do
        for k in delay_p50_us delay_p99_us; do
            [[ $(holds "$(f "ntp-dtls.$m" "$k")" "$(f "$other.$m" "$k")" "a < b") == 1 ]] ||
                [[ $(f "$other.$m" status) == stalled ]] || lost+=("$k($m)")
        done
    done
    o1=$(f ntp-dtls.one offset_p50_us) o2=$(f "$other.one" offset_p50_us)
    [[ $(awk -v a="$o1" -v b="$o2" 'BEGIN { if (a == "-") print 0; else if (b == "-") print 1; else print ((a < 0 ? -a : a) < (b < 0 ? -b : b)) ? 1 : 0 }') == 1 ]] || lost+=(offset)
    li_a=$(lost_inv ntp-dtls) li_b=$(lost_inv "$other")
    la=$(awk -F'[ /|]+' '{ print $1 + $2 + $5 + $6 }' <<<"$li_a")
    lb=$(awk -F'[ /|]+' '{ print $1 + $2 + $5 + $6 }' <<<"$li_b")
    ((la == 0 || la < lb)) || lost+=("lost/invalid")
    for c in "${levels[@]}"; do
        [[ $(holds "$(f "ntp-dtls.c$c" rate)" "$(f "$other.c$c" rate)" "a > b") == 1 ]] || lost+=("replies/s@$c")
    done
    if ((${#lost[@]} == 0)); then
        echo "- PASS beats $other on every column"
    else
        echo "- MISS beats $other on every column: not on ${lost[*]}"
    fi
done
for line in "${dl_lines[@]}"; do
    rss=$(field "$line" rss_per_assoc_idle_b) hs=$(field "$line" hs_per_server_cpu_s)
    tag=$(field "$line" label)
    ok=$(holds "$rss" 16384 "a <= b")
    echo "- $(verdict "$ok") RSS <= 16 KiB per idle association (${tag//,/ }): $rss B"
    ok=$(holds "$hs" 1500 "a >= b")
    echo "- $(verdict "$ok") >= 1500 handshakes/s per core (${tag//,/ }): $hs per server CPU-second ($(field "$line" hs_per_s)/s wall)"
done

echo
echo "Targets of issue 14 (the relay path against the plain blocking pair, udp-pair, in this run):"
echo
for mode in one fresh; do
    ar=$(f "ntp-dtls-raw.$mode" delay_p50_us) ac=$(f "ntp-dtls.$mode" delay_p50_us)
    u=$(f "udp-pair.$mode" delay_p50_us) d=$(f "direct.$mode" delay_p50_us)
    ratio=$(awk -v a="$ar" -v u="$u" -v d="$d" 'BEGIN { if (a == "-" || u == "-" || d == "-" || u - d <= 0) print "-"; else printf "%.2f", (a - d) / (u - d) }')
    ok=$(holds "$ratio" 1.25 "a <= b")
    echo "- $(verdict "$ok") added delay p50 ($mode port), uncorrected (ntp-dtls-raw) <= 1.25 x udp-pair's: $(added ntp-dtls-raw "$mode") vs $(added udp-pair "$mode"): ${ratio}x"
    echo "  (corrected, as a client sees it: $(added ntp-dtls "$mode"), $(awk -v a="$ac" -v u="$u" -v d="$d" 'BEGIN { if (a == "-" || u == "-" || d == "-" || u - d <= 0) print "-"; else printf "%.2f", (a - d) / (u - d) }')x)"
done
for c in 16 256; do
    rd=$(f "ntp-dtls.c$c" rate) rr=$(f "ntp-dtls-raw.c$c" rate) u=$(f "udp-pair.c$c" rate)
    ratio=$(awk -v a="$rd" -v u="$u" 'BEGIN { if (a == "-" || u == "-" || u <= 0) print "-"; else printf "%.2f", a / u }')
    if [[ $c == 16 ]]; then
        ok=$(holds "$ratio" 0.9 "a >= b")
        echo "- $(verdict "$ok") replies/s at 16 clients >= 0.9 x udp-pair's: $rd vs $u: ${ratio}x (uncorrected row: $rr)"
    else
        echo "  (at 256 clients: $rd vs $u: ${ratio}x; uncorrected row: $rr)"
    fi
done

echo
echo "Raw merged results (ntp_probe merge, dtls_load):"
echo
echo '```'
for row in "${rows[@]}"; do
    for k in one fresh paced c1 c16 c256; do echo "${cell[$row.$k]}"; done
done
printf '%s\n' "${dl_lines[@]}"
echo "$calib_kernel"
echo "$calib_user"
echo '```'
bash scripts/bench-attack.sh # the "under attack" section (issue 10)
echo
echo "bench: done in ${elapsed} s"
echo; echo "Reconnect storm, instructions per reply, 1 vs 2 workers (perf, issue 14):"; echo '```'; { STORM_BUILD=0 STORM_N=$([[ $quick == 1 ]] && echo 2000 || echo 19900) scripts/bench-storm.sh; command -v valgrind >/dev/null && CG_BUILD=0 CG_TOP=0 scripts/callgrind.sh && CG_BUILD=0 CG_TOP=0 CG_RELAY=client CG_REQUESTS=5000 scripts/callgrind.sh; command -v taskset >/dev/null && WORKERS_BUILD=0 WORKERS_ROUNDS=$([[ $quick == 1 ]] && echo 1 || echo 3) scripts/bench-workers.sh; } 2>&1 | grep -v '^sending command'; echo '```'
bash scripts/bench-clock.sh # issue 16: real chronyd clients, own processes (BENCH_QUICK=1: 30 s)
