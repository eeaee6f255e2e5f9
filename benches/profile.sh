#!/usr/bin/env bash
# Profiles permgate's cache-hit path (1 key, 10-item page) under wrk load, next to the bare
# hyper reference. Run benches/compare.sh once first (it builds the binaries), or build them:
#     cargo build --release --bin permgate && cargo build --release --examples
#
#     benches/profile.sh perf        # perf record (cpu-clock sampling) + flat report by symbol
#     benches/profile.sh callgrind   # instructions per request, permgate vs bare hyper, and
#                                    # permgate's inclusive costs (stable: counts, not time)
#
# Knobs: DURATION=10s (perf) / CG_DURATION=5s (callgrind), LOG="info,permgate::access=off"
# (PERMGATE_LOG of the profiled permgate), PORT_BASE=18500, OUT=target/bench-profile.
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

ADMIN_KEY=sk-admin-profile-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
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
        log "perf record -e cpu-clock on permgate (pid $PG_PID) for $DURATION of cache hits"
        taskset -c 1 wrk -t1 -c64 -d"$DURATION" -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$PG$ONE" >"$WORK/wrk.txt" &
        WRK=$!
        sleep 1
        secs=${DURATION%s}
        perf record -q -e cpu-clock -F 1999 --call-graph dwarf,16384 -p "$PG_PID" -o "$OUT/perf.data" -- sleep $((secs - 2)) 2>/dev/null
        wait $WRK
        grep -E 'Requests/sec' "$WORK/wrk.txt"
        log "flat profile (self time by symbol) -> $OUT/perf-flat.txt"
        perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
            grep -E '^ +[0-9]' | head -60 >"$OUT/perf-flat.txt"
        perf report -i "$OUT/perf.data" --children --sort symbol --stdio -g none 2>/dev/null |
            grep -E '^ +[0-9]' | head -80 >"$OUT/perf-children.txt"
        head -40 "$OUT/perf-flat.txt"
        log "inclusive (children) profile -> $OUT/perf-children.txt"
        ;;
    callgrind)
        command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
        rm -f "$OUT"/callgrind.*
        # instructions_per_request PID HOST_URL: Ir collected over one wrk run / requests served.
        count() {
            local pid=$1 url=$2 file=$3
            callgrind_control -i on "$pid" >/dev/null
            local requests
            requests=$(taskset -c 1 wrk -t1 -c8 -d"$CG_DURATION" -H "Authorization: Bearer $TOKEN" "$url" |
                awk '/requests in/ {print $1}')
            callgrind_control -i off "$pid" >/dev/null
            callgrind_control -d "$pid" >/dev/null
            sleep 1
            local ir
            ir=$(callgrind_annotate "$file.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
            echo "$requests $ir"
        }
        start_pg valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.permgate.%p"
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
    *)
        echo "usage: $0 perf|callgrind" >&2
        exit 2
        ;;
esac
