#!/usr/bin/env bash
# Profiles permgate's cache-hit path (1 key, 10-item page) under wrk load, next to the bare
# hyper reference. Run benches/compare.sh once first (it builds the binaries), or build them:
#     cargo build --release --bin permgate && cargo build --release --examples
#
#     benches/profile.sh perf        # perf record (cpu-clock sampling) + flat report by symbol
#     SCENARIO=miss benches/profile.sh perf   # the same on misses (every request a new key)
#     benches/profile.sh syscalls    # system calls and context switches per request, both servers
#     benches/profile.sh callgrind   # instructions per request, permgate vs bare hyper, and
#                                    # permgate's inclusive costs (stable: counts, not time)
#     SCENARIO=miss benches/profile.sh callgrind   # the same per miss (upstream on the other core)
#     benches/profile.sh legs        # misses with a 20 ms upstream on permgate's core (compare.sh's
#                                    # miss20): packet captures split each request's time into the
#                                    # way in, upstream and the way back (benches/legs.py)
#     benches/profile.sh fleet       # misses with [redis] (compare.sh's fleetmiss0): per miss, the
#                                    # Redis commands and their cost, CPU time, and instructions of
#                                    # permgate (with and without [redis]) and of redis-server
#
# Knobs: SCENARIO=hit|miss (perf, callgrind), DURATION=10s (perf) / CG_DURATION=5s (callgrind,
# and each run of fleet), FLEET_CALLGRIND=0 (fleet: the timed runs only),
# LEGS_CONNECTIONS="1 8 64" LEGS_DURATION=4s (legs), LOG="info,permgate::access=off" (PERMGATE_LOG
# of the profiled permgate), PORT_BASE=18500, OUT=target/bench-profile.
set -eu

MODE=${1:-perf}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DURATION=${DURATION:-10s}
CG_DURATION=${CG_DURATION:-5s}
LOG=${LOG:-info,permgate::access=off}
PORT_BASE=${PORT_BASE:-18500}
OUT=${OUT:-$ROOT/target/bench-profile}
PERMGATE=$TARGET_DIR/release/permgate
UPSTREAM_BIN=$TARGET_DIR/release/examples/bench-upstream
REFERENCE_BIN=$TARGET_DIR/release/examples/bench-reference
ONE=/v1/fine_tuning/checkpoints/ft:gpt-4o-mini-2024-07-18:acme:bench:B7R9VjQd/permissions
for bin in "$PERMGATE" "$UPSTREAM_BIN" "$REFERENCE_BIN"; do [ -x "$bin" ] || { echo "missing $bin" >&2; exit 1; }; done
# Without the load generator every count below would read 0 and still "succeed".
command -v wrk >/dev/null || { echo "missing wrk (apt-get install wrk, or run benches/compare.sh once)" >&2; exit 1; }
mkdir -p "$OUT"

STARTED=()
WORK=$(mktemp -d /tmp/permgate-profile.XXXXXX)
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${STARTED[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { printf '[profile %s] %s\n' "$(date +%T)" "$*" >&2; }
wait_port() {
    for _ in $(seq 400); do
        (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    exit 1
}

# Letters and digits of both cases, as a real key's (a hex one could share a piece with the
# config's hex token digests, which permgate refuses).
ADMIN_KEY=sk-admin-$(head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' | head -c 40)
TOKEN=profile-client-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
UP=$PORT_BASE PG=$((PORT_BASE + 1)) REF=$((PORT_BASE + 2))
cat >"$WORK/pg.toml" <<EOF
[server]
listen = "127.0.0.1:$PG"
worker_threads = 1
drain_timeout_ms = 1000

[upstream]
base_url = "http://127.0.0.1:$UP/v1"

[cache]
ttl_seconds = 3600

[[clients]]
name = "profile"
token_sha256 = "$(printf '%s' "$TOKEN" | "$PERMGATE" hash-token)"
checkpoints = ["*"]
EOF

taskset -c 1 "$UPSTREAM_BIN" --listen "127.0.0.1:$UP" --admin-key "$ADMIN_KEY" 2>/dev/null &
STARTED+=($!)
wait_port "$UP"
# start_pg [WRAPPER...]: permgate on CPU 0, optionally under a wrapper (valgrind).
start_pg() {
    env OPENAI_ADMIN_KEY="$ADMIN_KEY" PERMGATE_LOG="$LOG" PERMGATE_LOG_FORMAT=json \
        taskset -c 0 "$@" "$PERMGATE" serve --config "$WORK/pg.toml" 2>"$WORK/pg.log" &
    PG_PID=$!
    STARTED+=($PG_PID)
    wait_port "$PG"
    curl -sf -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PG$ONE" -o "$WORK/body10.json"
}
load() { # URL DURATION CONNECTIONS
    taskset -c 1 wrk -t1 -c"$3" -d"$2" -H "Authorization: Bearer $TOKEN" "$1" | awk '/Requests\/sec|requests in/'
}

case $MODE in
    perf)
        command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
        start_pg
        load "http://127.0.0.1:$PG$ONE" 2s 64 >/dev/null
        script=() url="http://127.0.0.1:$PG$ONE"
        if [ "${SCENARIO:-hit}" = miss ]; then
            script=(-s "$ROOT/benches/wrk/unique.lua") url="http://127.0.0.1:$PG"
        fi
        log "perf record -e cpu-clock on permgate (pid $PG_PID) for $DURATION of cache ${SCENARIO:-hit}s"
        BENCH_RUN_ID=profile-$RANDOM taskset -c 1 wrk -t1 -c64 -d"$DURATION" -H "Authorization: Bearer $TOKEN" \
            "${script[@]}" "$url" >"$WORK/wrk.txt" &
        WRK=$!
        sleep 1
        secs=${DURATION%s}
        perf record -q -e cpu-clock -F 1999 --call-graph dwarf,16384 -p "$PG_PID" -o "$OUT/perf-${SCENARIO:-hit}.data" -- sleep $((secs - 2)) 2>/dev/null
        wait $WRK
        grep -E 'Requests/sec|RESULT' "$WORK/wrk.txt"
        log "flat profile (self time by symbol) -> $OUT/perf-flat-${SCENARIO:-hit}.txt"
        perf report -i "$OUT/perf-${SCENARIO:-hit}.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
            grep -E '^ +[0-9]' | head -60 >"$OUT/perf-flat-${SCENARIO:-hit}.txt"
        perf report -i "$OUT/perf-${SCENARIO:-hit}.data" --children --sort symbol --stdio -g none 2>/dev/null |
            grep -E '^ +[0-9]' | head -80 >"$OUT/perf-children-${SCENARIO:-hit}.txt"
        head -40 "$OUT/perf-flat-${SCENARIO:-hit}.txt"
        log "inclusive (children) profile -> $OUT/perf-children-${SCENARIO:-hit}.txt"
        ;;
    callgrind)
        command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
        rm -f "$OUT"/callgrind.*
        COUNT_SCRIPT=()
        # instructions_per_request PID HOST_URL: Ir collected over one wrk run / requests served.
        count() {
            local pid=$1 url=$2 file=$3
            callgrind_control -i on "$pid" >/dev/null
            local requests
            requests=$(BENCH_RUN_ID=cg-$RANDOM taskset -c 1 wrk -t1 -c8 -d"$CG_DURATION" \
                -H "Authorization: Bearer $TOKEN" "${COUNT_SCRIPT[@]}" "$url" |
                awk '/requests in/ {print $1}')
            callgrind_control -i off "$pid" >/dev/null
            callgrind_control -d "$pid" >/dev/null
            sleep 1
            local ir
            ir=$(callgrind_annotate "$file.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
            echo "$requests $ir"
        }
        start_pg valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.permgate.%p"
        if [ "${SCENARIO:-hit}" = miss ]; then
            # Every request a new key; the upstream (no delay) is on the other core.
            COUNT_SCRIPT=(-s "$ROOT/benches/wrk/unique.lua")
            read -r pg_req pg_ir < <(count "$PG_PID" "http://127.0.0.1:$PG" "$OUT/callgrind.permgate.$PG_PID")
            awk -v a="$pg_ir" -v n="$pg_req" 'BEGIN { printf "permgate: %d misses, %.0f instructions per miss\n", n, a / n }' |
                tee "$OUT/callgrind-summary-miss.txt"
            callgrind_annotate --inclusive=yes "$OUT/callgrind.permgate.$PG_PID.1" 2>/dev/null | head -120 >"$OUT/callgrind-permgate-inclusive-miss.txt"
            callgrind_annotate "$OUT/callgrind.permgate.$PG_PID.1" 2>/dev/null | head -70 >"$OUT/callgrind-permgate-self-miss.txt"
            log "annotations in $OUT/callgrind-*-miss.txt"
            exit 0
        fi
        read -r pg_req pg_ir < <(count "$PG_PID" "http://127.0.0.1:$PG$ONE" "$OUT/callgrind.permgate.$PG_PID")
        taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.reference.%p" \
            "$REFERENCE_BIN" --listen "127.0.0.1:$REF" --body "$WORK/body10.json" 2>/dev/null &
        REF_PID=$!
        STARTED+=($REF_PID)
        wait_port "$REF"
        read -r ref_req ref_ir < <(count "$REF_PID" "http://127.0.0.1:$REF/" "$OUT/callgrind.reference.$REF_PID")
        awk -v a="$pg_ir" -v n="$pg_req" -v b="$ref_ir" -v m="$ref_req" 'BEGIN {
            printf "permgate:      %d requests, %.0f instructions per request\n", n, a / n
            printf "bare hyper:    %d requests, %.0f instructions per request\n", m, b / m
            printf "reference / permgate instructions: %.3f\n", (b / m) / (a / n) }' | tee "$OUT/callgrind-summary.txt"
        callgrind_annotate --inclusive=yes "$OUT/callgrind.permgate.$PG_PID.1" 2>/dev/null | head -100 >"$OUT/callgrind-permgate-inclusive.txt"
        callgrind_annotate "$OUT/callgrind.permgate.$PG_PID.1" 2>/dev/null | head -70 >"$OUT/callgrind-permgate-self.txt"
        callgrind_annotate "$OUT/callgrind.reference.$REF_PID.1" 2>/dev/null | head -50 >"$OUT/callgrind-reference-self.txt"
        log "annotations in $OUT/callgrind-*.txt"
        ;;
    syscalls)
        # System calls per request (perf tracepoints), permgate vs bare hyper, 64 connections.
        command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 1; }
        start_pg
        taskset -c 0 "$REFERENCE_BIN" --listen "127.0.0.1:$REF" --body "$WORK/body10.json" 2>/dev/null &
        STARTED+=($!)
        REF_PID=$!
        wait_port "$REF"
        events=syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,context-switches
        for target in "permgate $PG_PID http://127.0.0.1:$PG$ONE" "bare-hyper $REF_PID http://127.0.0.1:$REF/"; do
            set -- $target
            load "$3" 2s 64 >/dev/null
            perf stat -x, -e "$events" -p "$2" -o "$WORK/stat.txt" -- \
                taskset -c 1 wrk -t1 -c64 -d5s -H "Authorization: Bearer $TOKEN" "$3" >"$WORK/wrk.txt"
            n=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
            awk -F, -v who="$1" -v n="$n" '$3 ~ /:|switches/ && $1 ~ /^[0-9]/ { printf "%-10s %-36s %8.3f per request\n", who, $3, $1 / n }' "$WORK/stat.txt"
        done | tee "$OUT/syscalls.txt"
        ;;
    legs)
        # compare.sh's miss20, taken apart: a 20 ms upstream on permgate's core, every request a
        # new key, LEGS_CONNECTIONS connections; one captured run through permgate and one
        # straight to the upstream per connection count.
        [ "$(id -u)" -eq 0 ] || { echo "legs captures packets: run as root" >&2; exit 1; }
        if ! command -v tcpdump >/dev/null; then
            command -v apt-get >/dev/null || { echo "tcpdump is not installed" >&2; exit 1; }
            log "installing tcpdump (apt-get)"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump >/dev/null
        fi
        UP20=$((PORT_BASE + 3)) PG20=$((PORT_BASE + 4))
        sed -e "s|^listen = .*|listen = \"127.0.0.1:$PG20\"|" -e "s|127.0.0.1:$UP/v1|127.0.0.1:$UP20/v1|" \
            "$WORK/pg.toml" >"$WORK/pg20.toml"
        taskset -c 0 "$UPSTREAM_BIN" --listen "127.0.0.1:$UP20" --admin-key "$ADMIN_KEY" --delay-ms 20 2>/dev/null &
        STARTED+=($!)
        wait_port "$UP20"
        env OPENAI_ADMIN_KEY="$ADMIN_KEY" PERMGATE_LOG="$LOG" PERMGATE_LOG_FORMAT=json \
            taskset -c 0 "$PERMGATE" serve --config "$WORK/pg20.toml" 2>"$WORK/pg.log" &
        STARTED+=($!)
        wait_port "$PG20"
        # captured NAME PORT AUTH CONNECTIONS: one wrk run of new keys, captured on loopback.
        captured() {
            BENCH_RUN_ID=warm-$RANDOM taskset -c 1 wrk -t1 -c"$4" -d2s -H "Authorization: Bearer $3" \
                -s "$ROOT/benches/wrk/unique.lua" "http://127.0.0.1:$2" >/dev/null
            taskset -c 1 tcpdump -i lo -s 400 -U -w "$WORK/$1.pcap" "tcp port $UP20 or tcp port $PG20" \
                2>"$WORK/tcpdump.log" &
            DUMP=$!
            sleep 1
            kill -0 "$DUMP" 2>/dev/null || { cat "$WORK/tcpdump.log" >&2; exit 1; }
            BENCH_RUN_ID=legs-$RANDOM taskset -c 1 wrk -t1 -c"$4" -d"${LEGS_DURATION:-4s}" \
                -H "Authorization: Bearer $3" -s "$ROOT/benches/wrk/unique.lua" "http://127.0.0.1:$2" >/dev/null
            sleep 0.5
            kill "$DUMP"
            wait "$DUMP" 2>/dev/null || true
            DUMP=""
        }
        # The capture is stopped however the script ends (it runs as root).
        DUMP=""
        trap '[ -z "$DUMP" ] || kill "$DUMP" 2>/dev/null || true; cleanup' EXIT
        : >"$OUT/legs.txt"
        for c in ${LEGS_CONNECTIONS:-1 8 64}; do
            captured proxied "$PG20" "$TOKEN" "$c"
            captured direct "$UP20" "$ADMIN_KEY" "$c"
            echo "== $c connections, 20 ms upstream on permgate's core" >"$WORK/legs.txt"
            python3 "$ROOT/benches/legs.py" "$WORK/proxied.pcap" "$WORK/direct.pcap" "$PG20" "$UP20" \
                >>"$WORK/legs.txt"
            tee -a "$OUT/legs.txt" <"$WORK/legs.txt"
        done
        ;;
    fleet)
        # compare.sh's fleetmiss0 taken apart: every request a new key, redis-server, the upstream
        # and permgate on CPU 0, wrk on CPU 1. Each line is per miss: req/s and CPU time of
        # permgate (+ redis-server) with and without [redis], the Redis commands a miss causes and
        # their cost (INFO commandstats), then instructions (callgrind) of permgate with and
        # without [redis] and of redis-server. timeout_ms is raised so that a redis-server under
        # valgrind answers in time.
        for tool in redis-server redis-cli valgrind; do
            command -v $tool >/dev/null || { echo "missing $tool (apt-get install redis-server valgrind)" >&2; exit 1; }
        done
        RD=$((PORT_BASE + 5)) UPF=$((PORT_BASE + 6)) PGF=$((PORT_BASE + 7))
        taskset -c 0 "$UPSTREAM_BIN" --listen "127.0.0.1:$UPF" --admin-key "$ADMIN_KEY" 2>/dev/null &
        STARTED+=($!)
        wait_port "$UPF"
        sed -e "s|^listen = .*|listen = \"127.0.0.1:$PGF\"|" -e "s|127.0.0.1:$UP/v1|127.0.0.1:$UPF/v1|" \
            "$WORK/pg.toml" >"$WORK/plain.toml"
        cp "$WORK/plain.toml" "$WORK/fleet.toml"
        printf '\n[redis]\nurl = "redis://127.0.0.1:%s"\nkey_prefix = "permgate:profile:"\ntimeout_ms = 1000\nlease_ms = 3000\n' \
            "$RD" >>"$WORK/fleet.toml"
        free_port() { ! (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null || { echo "127.0.0.1:$1 is in use" >&2; exit 1; }; }
        # start_redis [WRAPPER...] / stop_pid PID
        start_redis() {
            free_port "$RD"
            taskset -c 0 "$@" redis-server --port "$RD" --bind 127.0.0.1 --save "" --appendonly no \
                --dir "$WORK" >"$WORK/redis.log" 2>&1 &
            REDIS_PID=$!
            STARTED+=($REDIS_PID)
            wait_port "$RD"
        }
        stop_pid() {
            kill -TERM "$1" 2>/dev/null || true
            wait "$1" 2>/dev/null || true
        }
        # fleet_pg CONFIG [WRAPPER...]: permgate on CPU 0 (PG_PID), warmed with 2 s of misses.
        fleet_pg() {
            local config=$1
            shift
            free_port "$PGF"
            env OPENAI_ADMIN_KEY="$ADMIN_KEY" PERMGATE_LOG="$LOG" PERMGATE_LOG_FORMAT=json \
                taskset -c 0 "$@" "$PERMGATE" serve --config "$WORK/$config.toml" 2>"$WORK/$config.log" &
            PG_PID=$!
            STARTED+=($PG_PID)
            wait_port "$PGF"
            BENCH_RUN_ID=warm-$RANDOM taskset -c 1 wrk -t1 -c8 -d2s -H "Authorization: Bearer $TOKEN" \
                -s "$ROOT/benches/wrk/unique.lua" "http://127.0.0.1:$PGF" >/dev/null
        }
        ticks_of() { awk '{print $14 + $15}' "/proc/$1/stat"; }
        # timed CONFIG: req/s and CPU per miss (permgate, plus redis-server for the fleet).
        timed() {
            fleet_pg "$1"
            local pids=("$PG_PID") t0=0 t1=0 pid requests
            [ "$1" = fleet ] && pids+=("$REDIS_PID")
            redis-cli -p "$RD" config resetstat >/dev/null
            for pid in "${pids[@]}"; do t0=$((t0 + $(ticks_of "$pid"))); done
            BENCH_RUN_ID=timed-$RANDOM taskset -c 1 wrk -t1 -c64 -d"$CG_DURATION" -H "Authorization: Bearer $TOKEN" \
                -s "$ROOT/benches/wrk/unique.lua" "http://127.0.0.1:$PGF" >"$WORK/wrk.txt"
            for pid in "${pids[@]}"; do t1=$((t1 + $(ticks_of "$pid"))); done
            requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
            awk -v n="$requests" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v who="$1" '/Requests\/sec/ {
                printf "%-6s %9.0f req/s (64 connections), %6.1f us CPU per miss (permgate%s)\n", who, $2, t * 1e6 / hz / n,
                    who == "fleet" ? " + redis-server" : "" }' "$WORK/wrk.txt"
            if [ "$1" = fleet ]; then
                redis-cli -p "$RD" info commandstats | tr -d '\r' | awk -F'[:=,]' -v n="$requests" '/^cmdstat_/ {
                    sub("cmdstat_", "", $1); calls += $3; usec += $5
                    printf "  %-14s %6.2f calls per miss, %6.2f us per call\n", $1, $3 / n, $7 }
                    END { printf "  all commands   %6.2f per miss, %6.2f us per miss (EVALSHA includes its commands)\n", calls / n, usec / n }'
            fi
            stop_pid "$PG_PID"
        }
        # counted CONFIG PID: instructions per miss of PID (under callgrind) over one wrk run.
        counted() {
            callgrind_control -i on "$2" >/dev/null 2>&1
            BENCH_RUN_ID=cg-$RANDOM taskset -c 1 wrk -t1 -c8 -d"$CG_DURATION" -H "Authorization: Bearer $TOKEN" \
                -s "$ROOT/benches/wrk/unique.lua" "http://127.0.0.1:$PGF" >"$WORK/wrk.txt"
            callgrind_control -i off "$2" >/dev/null 2>&1
            callgrind_control -d "$2" >/dev/null 2>&1
            sleep 1
            local file requests ir
            file=$OUT/callgrind.fleet-$1.$2.1
            requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
            ir=$(callgrind_annotate "$file" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
            awk -v a="$ir" -v n="$requests" -v who="$1" 'BEGIN { printf "%-14s %6d misses, %8.0f instructions per miss\n", who, n, a / n }'
            callgrind_annotate --inclusive=yes "$file" 2>/dev/null | head -120 >"$OUT/callgrind-$1-inclusive.txt"
            callgrind_annotate "$file" 2>/dev/null | head -70 >"$OUT/callgrind-$1-self.txt"
        }
        rm -f "$OUT"/callgrind.fleet-*
        # Every process is started from this shell (not a pipeline's subshell), so that the exit
        # trap stops it; the figures go to files, shown as each part ends.
        start_redis
        log "req/s and CPU time, $CG_DURATION each (time: noisy on a shared machine)"
        timed plain >"$OUT/fleet-timed.txt"
        timed fleet >>"$OUT/fleet-timed.txt"
        cat "$OUT/fleet-timed.txt"
        [ "${FLEET_CALLGRIND:-1}" = 0 ] && exit 0
        log "callgrind: instructions per miss (counts: stable)"
        : >"$OUT/fleet-callgrind.txt"
        stop_pid "$REDIS_PID"
        start_redis valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.fleet-redis.%p"
        fleet_pg fleet
        counted redis "$REDIS_PID" >>"$OUT/fleet-callgrind.txt"
        stop_pid "$PG_PID"
        stop_pid "$REDIS_PID"
        start_redis
        for config in plain fleet; do
            fleet_pg $config valgrind --tool=callgrind --instr-atstart=no \
                --callgrind-out-file="$OUT/callgrind.fleet-permgate-$config.%p"
            counted permgate-$config "$PG_PID" >>"$OUT/fleet-callgrind.txt"
            stop_pid "$PG_PID"
        done
        cat "$OUT/fleet-callgrind.txt"
        log "annotations in $OUT/callgrind-{permgate-plain,permgate-fleet,redis}-*.txt"
        ;;
    *)
        echo "usage: $0 perf|callgrind|syscalls|legs|fleet" >&2
        exit 2
        ;;
esac
