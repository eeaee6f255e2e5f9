#!/usr/bin/env bash
# permgate vs. a bare hyper server vs. nginx proxy_cache, one server core each (issue 6).
#
#     benches/compare.sh                         # the full comparison (~12 min after the build)
#     DURATION=5s ROUNDS=3 benches/compare.sh    # quicker, noisier
#
# What it does, in order (benches/README.md explains every scenario and figure):
#   1. installs nginx, wrk, curl and taskset from the distribution if missing (apt-get; no
#      service is started: a temporary policy-rc.d denies it if none exists),
#   2. builds permgate and the helpers (bench-upstream, bench-reference, bench-load) in release
#      mode,
#   3. starts everything on 127.0.0.1 only, under a fresh temporary directory on tmpfs: fast
#      fake upstreams (0 ms and 20 ms), two bare hyper references (10- and 100-item bodies),
#      one nginx (its own prefix, conf, temp paths and proxy_cache on tmpfs; access_log off,
#      proxy_cache_lock on) and several permgates (worker_threads = 1), every server pinned to
#      CPU $SERVER_CPU, wrk (-t1 -c$CONNECTIONS, keep-alive) pinned to CPU $LOAD_CPU,
#   4. runs the throughput scenarios in interleaved rounds (every system once per scenario per
#      round, ROUNDS times), then the one-off checks (coalescing, idle expiry, memory),
#   5. prints medians, p50/p99, the median of per-round ratios and a target checklist, and
#      saves them (with the raw per-run numbers) under $OUT.
# Every process it started is killed on exit (trap), and the temporary directory removed.
#
# Knobs (environment variables):
#   DURATION=10s      length of each measured wrk run
#   ROUNDS=3          interleaved rounds (at least 3 for a median that means something)
#   WARMUP=2s         one unmeasured run per (scenario, system) before round 1; 0 to skip
#   CONNECTIONS=64    wrk connections (keep-alive)
#   WRITE_CONNECTIONS=1  wrk connections in fleetwrite
#   WRITE_PAUSE_MS=1  fleetwrite: each connection pauses this long between an answer and its
#                     next write (0: back to back)
#   IDLE_SECONDS=30   idle time before the "first second after expiry" check
#   BOUND_DURATION=20s  length of the flood of new keys in the max_bytes check
#   SCENARIOS="hit10 hit100 keys10k miss0 miss20"   subset of the throughput scenarios;
#                     these run only when named here (certificates made with openssl):
#                     tlshit10   hit10 over HTTPS: permgate [server.tls] vs nginx `listen ssl`
#                                with proxy_cache, same certificate, wrk with an https URL
#                     mtlshit10  hit10 over HTTPS, permgate with client certificates
#                                (client_ca_file, require_client_cert = true, the caller named
#                                by its certificate's SAN: tls_identity) against permgate with
#                                TLS only (pgtls). wrk cannot present a client certificate, so
#                                both sides are driven by bench-load (benches/helpers: one
#                                thread, CONNECTIONS keep-alive connections, pinned like wrk)
#                     jwthit10   hit10 with the caller identified by a JWT ([jwt], a client with
#                                jwt_subject; RSA-2048 key, JWKS and RS256 token made with
#                                openssl) against permgate with the static token (pg)
#                     fleethit10 hit10 and miss0 with [redis] on (its own redis-server, pinned to
#                     fleetmiss0 the server core, its CPU counted with permgate's) against
#                                permgate without Redis (pg)
#                     fleetwrite creates (POST, benches/wrk/create.lua) through permgate with
#                                [redis] and two more replicas on the same prefix, all healthy
#                                (the write waits for their acks), against permgate without
#                                Redis; WRITE_CONNECTIONS connection(s), WRITE_PAUSE_MS between
#                                writes, so latency is not queueing: the p99 difference is what
#                                a healthy fleet adds to a write
#   EXTRAS="coalesce idle memory bound"             subset of the one-off checks ("" for none)
#   QUIET_PCT=5 QUIET_MAX=20  before each run, wait up to QUIET_MAX s until other processes
#                     use less than QUIET_PCT % of the machine (each run records how much they
#                     used while it ran: the "other load" column)
#   SERVER_CPU=0 LOAD_CPU=1   cores for the servers and for wrk (and bench-load)
#   REF_BUSY_NS=1000  extra work per request of the second bare hyper server in hit10
#                     (ref10busy: about what permgate adds to a hit; the tail-latency control)
#   PORT_BASE=18400   ports PORT_BASE..PORT_BASE+49 on 127.0.0.1 must be free
#   OUT=target/bench-compare   where the report and raw results are written
#   SKIP_BUILD=1      reuse the binaries already in target/release
#   KEEP_WORK=1       keep the temporary directory (configs, logs) for inspection
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64}
WRITE_CONNECTIONS=${WRITE_CONNECTIONS:-1}
WRITE_PAUSE_MS=${WRITE_PAUSE_MS:-1}
IDLE_SECONDS=${IDLE_SECONDS:-30}
BOUND_DURATION=${BOUND_DURATION:-20s}
SCENARIOS=${SCENARIOS:-hit10 hit100 keys10k miss0 miss20}
EXTRAS=${EXTRAS-coalesce idle memory bound}
QUIET_PCT=${QUIET_PCT:-5}
QUIET_MAX=${QUIET_MAX:-20}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
REF_BUSY_NS=${REF_BUSY_NS:-1000}
PORT_BASE=${PORT_BASE:-18400}
OUT=${OUT:-$ROOT/target/bench-compare}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LUA=$ROOT/benches/wrk

log() { printf '[compare %s] %s\n' "$(date +%T)" "$*" >&2; }
tls_wanted() { case " $SCENARIOS " in *" tlshit10 "* | *" mtlshit10 "*) return 0 ;; esac; return 1; }
mtls_wanted() { case " $SCENARIOS " in *" mtlshit10 "*) return 0 ;; esac; return 1; }
jwt_wanted() { case " $SCENARIOS " in *" jwthit10 "*) return 0 ;; esac; return 1; }
fleet_wanted() { case " $SCENARIOS " in *" fleethit10 "* | *" fleetmiss0 "*) return 0 ;; esac; return 1; }
write_wanted() { case " $SCENARIOS " in *" fleetwrite "*) return 0 ;; esac; return 1; }
redis_wanted() { fleet_wanted || write_wanted; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------------------------------------
# 1. Tools
# ---------------------------------------------------------------------------------------------
install_tools() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v curl >/dev/null || missing+=(curl)
    command -v taskset >/dev/null || missing+=(util-linux)
    tls_wanted && ! command -v openssl >/dev/null && missing+=(openssl)
    jwt_wanted && ! command -v openssl >/dev/null && missing+=(openssl)
    jwt_wanted && ! command -v xxd >/dev/null && missing+=(xxd)
    redis_wanted && ! command -v redis-server >/dev/null && missing+=(redis-server)
    redis_wanted && ! command -v redis-cli >/dev/null && missing+=(redis-tools)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; run as root or install them first"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (apt-get)"
    # Installing nginx must not start the distribution's nginx service (port 80).
    local policy=/usr/sbin/policy-rc.d ours=0
    if [ ! -e $policy ]; then
        printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && ours=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $ours -eq 1 ] && rm -f $policy
    return 0
}

# ---------------------------------------------------------------------------------------------
# Processes: every server we start is recorded and killed on exit.
# ---------------------------------------------------------------------------------------------
STARTED=()
WORK=""
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${STARTED[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${STARTED[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [ -n "$WORK" ] && [ -z "${KEEP_WORK:-}" ]; then rm -rf "$WORK"; fi
    [ -n "${KEEP_WORK:-}" ] && [ -n "$WORK" ] && log "kept $WORK"
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (: >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
    local port=$1 name=$2
    for _ in $(seq 200); do
        port_busy "$port" && return 0
        sleep 0.05
    done
    cat "$WORK/$name.log" >&2 || true
    die "$name did not start listening on 127.0.0.1:$port"
}

declare -A PID PORT ADMIN
# start NAME PORT CMD...: runs CMD pinned to the server core, stdout/stderr in $WORK/NAME.*
start() {
    local name=$1 port=$2
    shift 2
    port_busy "$port" && die "127.0.0.1:$port is already in use (set PORT_BASE)"
    taskset -c "$SERVER_CPU" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    PID[$name]=$!
    PORT[$name]=$port
    STARTED+=($!)
    wait_port "$port" "$name"
}

stop() {
    local name=$1
    kill -TERM "${PID[$name]}" 2>/dev/null || true
    wait "${PID[$name]}" 2>/dev/null || true
}

CLK_TCK=$(getconf CLK_TCK)
# CPU time (clock ticks, user + system, all threads) of the given pids.
ticks() {
    local total=0 pid t
    for pid in "$@"; do
        t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo $total
}
# Busy and total jiffies of the whole machine (all CPUs), from /proc/stat.
machine_jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
# CPU ticks of every process this script started (nginx: master and its children).
our_ticks() {
    local pids=("${STARTED[@]}") child
    if [ -n "${PID[nginx_master]:-}" ]; then
        for child in $(cat /proc/"${PID[nginx_master]}"/task/*/children 2>/dev/null); do pids+=("$child"); done
    fi
    ticks "${pids[@]}"
}
# CPU ticks of this shell's finished children (wrk, curl, ...), via the `times` builtin, into
# the variable named $1. (Not `$(...)`: `times` in a subshell would count the subshell's.)
child_ticks() {
    times >"$WORK/times"
    printf -v "$1" '%s' "$(awk -v hz="$CLK_TCK" 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); printf "%d", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) * hz }' "$WORK/times")"
}
# Percent of the machine's CPU used by processes that are not ours (other users, builds, ...)
# over half a second.
foreign_now() {
    local b0 t0 o0 b1 t1 o1
    read -r b0 t0 < <(machine_jiffies)
    o0=$(our_ticks)
    sleep 0.5
    read -r b1 t1 < <(machine_jiffies)
    o1=$(our_ticks)
    awk -v b=$((b1 - b0)) -v o=$((o1 - o0)) -v t=$((t1 - t0)) 'BEGIN { f = t > 0 ? 100 * (b - o) / t : 0; printf "%d", (f < 0 ? 0 : f) }'
}
# Waits (at most QUIET_MAX seconds) until other processes use less than QUIET_PCT % of the CPUs.
wait_quiet() {
    local start=$SECONDS foreign
    while :; do
        foreign=$(foreign_now)
        [ "$foreign" -lt "$QUIET_PCT" ] && return 0
        if [ $((SECONDS - start)) -ge "$QUIET_MAX" ]; then
            log "machine still busy (${foreign}% of CPU used by other processes); measuring anyway"
            return 0
        fi
        [ $((SECONDS - start)) -eq 0 ] && log "waiting for the machine to quiet down (${foreign}% of CPU used by other processes)"
        sleep 0.5
    done
}
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
upstream_count() { curl -s --max-time 5 "http://127.0.0.1:${PORT[$1]}/__count"; }

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
# permgate_config NAME PORT UPSTREAM_NAME [extra [cache] lines...]
permgate_config() {
    local name=$1 port=$2 upstream=$3
    shift 3
    {
        echo "[server]"
        echo "listen = \"127.0.0.1:$port\""
        echo "worker_threads = 1"
        echo "drain_timeout_ms = 1000"
        echo
        echo "[upstream]"
        echo "base_url = \"http://127.0.0.1:${PORT[$upstream]}/v1\""
        echo "request_timeout_ms = 10000"
        echo
        echo "[cache]"
        local line
        for line in "$@"; do echo "$line"; done
        echo
        echo "[[clients]]"
        echo "name = \"bench\""
        echo "token_sha256 = \"$TOKEN_SHA256\""
        echo "checkpoints = [\"*\"]"
        # PG_TAIL: more tables (e.g. [server.tls]), when the caller sets it.
        if [ -n "${PG_TAIL:-}" ]; then printf '\n%s\n' "$PG_TAIL"; fi
    } >"$WORK/$name.toml"
}

# ECDSA P-256 throughout (cert-manager's usual choice). One CA for the server certificate, which
# nginx and permgate both present, and one for client certificates (mTLS).
make_certs() {
    local d=$WORK/tls ca
    mkdir -p "$d"
    for ca in ca clients-ca; do
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj "/CN=permgate bench $ca" -keyout "$d/$ca.key" -out "$d/$ca.crt" 2>/dev/null
    done
    make_leaf server ca "subjectAltName=DNS:localhost,IP:127.0.0.1" serverAuth
    make_leaf client clients-ca "subjectAltName=URI:$CLIENT_SPIFFE" clientAuth
}
CLIENT_SPIFFE=spiffe://bench.local/ns/bench/sa/load

# make_leaf NAME CA SAN USAGE: NAME.crt and NAME.key, signed by CA
make_leaf() {
    local name=$1 ca=$2 san=$3 usage=$4 d=$WORK/tls
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
        -keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
    printf '%s\nextendedKeyUsage=%s\n' "$san" "$usage" >"$d/$name.ext"
    openssl x509 -req -in "$d/$name.csr" -CA "$d/$ca.crt" -CAkey "$d/$ca.key" -CAcreateserial \
        -days 2 -extfile "$d/$name.ext" -out "$d/$name.crt" 2>/dev/null
}

# start_permgate_tls NAME PORT [more [server.tls] lines...]: a hit10 permgate over HTTPS
start_permgate_tls() {
    local name=$1 port=$2 table line
    shift 2
    table=$(printf '[server.tls]\ncert_file = "%s"\nkey_file = "%s"' "$WORK/tls/server.crt" "$WORK/tls/server.key")
    for line in "$@"; do table="$table"$'\n'"$line"; done
    PG_TAIL=$table start_permgate "$name" "$port" up0 "info,permgate::access=off" "ttl_seconds = 3600"
}

b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }

# jwthit10: an RSA-2048 key, its JWKS ($WORK/jwks.json) and an RS256 JWT signed with it ($JWT),
# as a Kubernetes projected service-account token would be (valid for an hour).
make_jwt() {
    local d=$WORK/jwt n e kid header claims input signature now
    mkdir -p "$d"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$d/key.pem" 2>/dev/null
    n=$(openssl rsa -in "$d/key.pem" -noout -modulus | sed 's/^Modulus=//' | xxd -r -p | b64url)
    e=$(openssl rsa -in "$d/key.pem" -noout -text | sed -n 's/^publicExponent: [0-9]* (0x\([0-9a-fA-F]*\)).*/\1/p')
    [ $((${#e} % 2)) -eq 1 ] && e=0$e
    e=$(printf '%s' "$e" | xxd -r -p | b64url)
    [ -n "$n" ] && [ -n "$e" ] || die "could not read the RSA key's modulus and exponent"
    kid=bench-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
    printf '{"keys":[{"kty":"RSA","kid":"%s","alg":"RS256","use":"sig","n":"%s","e":"%s"}]}\n' \
        "$kid" "$n" "$e" >"$WORK/jwks.json"
    now=$(date +%s)
    header=$(printf '{"alg":"RS256","typ":"JWT","kid":"%s"}' "$kid" | b64url)
    claims=$(printf '{"iss":"%s","aud":["permgate"],"sub":"%s","iat":%d,"nbf":%d,"exp":%d}' \
        "$JWT_ISSUER" "$JWT_SUBJECT" "$now" "$now" $((now + 3600)) | b64url)
    input=$header.$claims
    signature=$(printf '%s' "$input" | openssl dgst -sha256 -sign "$d/key.pem" -binary | b64url)
    JWT=$input.$signature
}
JWT_ISSUER=https://bench.local
JWT_SUBJECT=system:serviceaccount:bench:client

# fleethit10, fleetmiss0, fleetwrite: one redis-server on the server core, no persistence.
start_redis() {
    local port=$1
    start redis "$port" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$WORK"
}
redis_commands() { redis-cli -p "${PORT[redis]}" info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p'; }

# start_permgate NAME PORT UPSTREAM LOG_FILTER [cache lines...]; PG_ADMIN_LISTEN, when the
# caller sets it, is the admin listener's address (/metrics).
start_permgate() {
    local name=$1 port=$2 upstream=$3 filter=$4 admin=()
    shift 4
    permgate_config "$name" "$port" "$upstream" "$@"
    if [ -n "${PG_ADMIN_LISTEN:-}" ]; then admin=(PERMGATE_ADMIN_LISTEN="$PG_ADMIN_LISTEN"); fi
    start "$name" "$port" env OPENAI_ADMIN_KEY="$ADMIN_KEY" PERMGATE_LOG="$filter" \
        PERMGATE_LOG_FORMAT=json "${admin[@]}" "${PG_BIN:-$PERMGATE}" serve --config "$WORK/$name.toml"
}

# metric NAME SYSTEM: the value of a metric on SYSTEM's admin listener (0 if absent)
metric() {
    curl -s --max-time 5 "http://${ADMIN[$2]}/metrics" | awk -v m="$1" '$1 == m { v = $2 } END { printf "%d", v }'
}

nginx_config() {
    local dir=$WORK/nginx
    mkdir -p "$dir"/{cache-hit,cache-miss0,cache-miss20,client_body,proxy,fastcgi,uwsgi,scgi}
    # The worker runs as nobody: it must be able to reach and write its cache and temp dirs.
    chmod 0711 "$WORK"
    chmod 0777 "$dir"/*
    local location="
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \"Bearer $ADMIN_KEY\";
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;"
    cat >"$dir/nginx.conf" <<EOF
# Generated by benches/compare.sh: nginx 1.22 as an ops team would put it in front of the API.
worker_processes 1;
user nobody nogroup;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
daemon off;
events { worker_connections 8192; }
http {
    access_log off;
    # Keep benchmark connections open like hyper does (the default closes every 1000).
    keepalive_requests 10000000;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    proxy_cache_path $dir/cache-hit levels=1:2 keys_zone=hit:16m max_size=1g inactive=1h use_temp_path=off;
    proxy_cache_path $dir/cache-miss0 levels=1:2 keys_zone=miss0:64m max_size=1g inactive=1h use_temp_path=off;
    proxy_cache_path $dir/cache-miss20 levels=1:2 keys_zone=miss20:16m max_size=1g inactive=1h use_temp_path=off;
    upstream up0 { server 127.0.0.1:${PORT[up0]}; keepalive 128; }
    upstream up20 { server 127.0.0.1:${PORT[up20]}; keepalive 128; }
    server {
        listen 127.0.0.1:$((PORT_BASE + 20));
        location / { proxy_pass http://up0; proxy_cache hit; $location }
    }
    server {
        listen 127.0.0.1:$((PORT_BASE + 21));
        location / { proxy_pass http://up0; proxy_cache miss0; $location }
    }
    server {
        listen 127.0.0.1:$((PORT_BASE + 22));
        location / { proxy_pass http://up20; proxy_cache miss20; $location }
    }
$(if tls_wanted; then nginx_tls_server "$location"; fi)
}
EOF
}

# tlshit10's nginx: TLS terminated with permgate's certificate, the same cache zone as hit10.
nginx_tls_server() {
    cat <<EOF
    server {
        listen 127.0.0.1:$((PORT_BASE + 23)) ssl;
        ssl_certificate $WORK/tls/server.crt;
        ssl_certificate_key $WORK/tls/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        location / { proxy_pass http://up0; proxy_cache hit; $1 }
    }
EOF
}

start_nginx() {
    nginx_config
    local p ports="20 21 22"
    if tls_wanted; then ports="$ports 23"; fi
    for p in $ports; do port_busy $((PORT_BASE + p)) && die "127.0.0.1:$((PORT_BASE + p)) is in use"; done
    taskset -c "$SERVER_CPU" nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
        >"$WORK/nginx.out" 2>"$WORK/nginx.log" &
    local master=$!
    STARTED+=($master)
    PID[nginx_master]=$master
    for p in $ports; do wait_port $((PORT_BASE + p)) nginx; done
    local child worker=""
    for child in $(cat /proc/"$master"/task/*/children); do
        grep -qa "worker process" "/proc/$child/cmdline" && worker=$child
    done
    [ -n "$worker" ] || die "no nginx worker process found"
    # Counted for CPU per request: the worker does all the proxying and cache I/O.
    PID[nginx]=$worker
}

# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
# wrk_run URL SCRIPT DURATION CONNECTIONS AUTH [VAR=value...] -> prints the RESULT line
wrk_run() {
    local url=$1 script=$2 duration=$3 connections=$4 auth=$5
    shift 5
    env "$@" taskset -c "$LOAD_CPU" wrk -t1 -c"$connections" -d"$duration" --timeout 5s \
        -H "Authorization: Bearer $auth" -s "$script" "$url" | grep '^RESULT' || true
}
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }

# load_run URL DURATION CONNECTIONS AUTH [CERT KEY] -> prints the RESULT line, as wrk_run.
# bench-load (mtlshit10) can present a client certificate, wrk cannot. One thread, keep-alive,
# HTTP/1.1, requests back to back; trusts only the bench CA.
load_run() {
    local url=$1 duration=$2 connections=$3 auth=$4 cert=${5:-} key=${6:-} client=()
    if [ -n "$cert" ]; then client=(--cert "$cert" --key "$key"); fi
    taskset -c "$LOAD_CPU" "$LOAD_BIN" --url "$url" --duration "$duration" --connections "$connections" \
        --timeout 5s --header "Authorization: Bearer $auth" --cacert "$WORK/tls/ca.crt" "${client[@]}" |
        grep '^RESULT' || true
}

ONE=/v1/fine_tuning/checkpoints/ft:gpt-4o-mini-2024-07-18:acme:bench:B7R9VjQd/permissions

# target SCENARIO SYSTEM ROUND: sets URL SCRIPT AUTH VARS (wrk env) CPU_PIDS UPSTREAM LOADER
# CERT CONNS
target() {
    local scenario=$1 system=$2 round=$3
    local port=${PORT[$system]:-}
    [ "$system" = nginx ] && case $scenario in
        hit10 | hit100 | keys10k) port=$((PORT_BASE + 20)) ;;
        miss0) port=$((PORT_BASE + 21)) ;;
        miss20) port=$((PORT_BASE + 22)) ;;
        tlshit10) port=$((PORT_BASE + 23)) ;;
    esac
    local server=$system
    [ "$system" = pg ] && case $scenario in
        miss0 | fleetmiss0) server=pgmiss0 ;;
        miss20) server=pgmiss20 ;;
    esac
    [ "$system" = pgfleet ] && [ "$scenario" = fleetmiss0 ] && server=pgfleetmiss
    [ "$server" != "$system" ] && port=${PORT[$server]}
    # CPU per request: the server's process; with [redis] also the redis-server it calls, and
    # in fleetwrite the other two replicas, which apply and acknowledge every write.
    CPU_PIDS=("${PID[$system]}")
    [ "$server" != "$system" ] && CPU_PIDS=("${PID[$server]}")
    case $system in
        pgfleet) CPU_PIDS+=("${PID[redis]}") ;;
        pgwfleet) CPU_PIDS+=("${PID[pgwfleet2]}" "${PID[pgwfleet3]}" "${PID[redis]}") ;;
    esac
    AUTH=$TOKEN
    [ "$system" = pgjwt ] && AUTH=$JWT
    SCRIPT=$LUA/report.lua
    VARS=(BENCH_NONE=1)
    UPSTREAM=up0
    LOADER=wrk
    CERT=()
    CONNS=$CONNECTIONS
    case $scenario in
        hit10 | jwthit10 | fleethit10) URL=http://127.0.0.1:$port$ONE ;;
        tlshit10) URL=https://127.0.0.1:$port$ONE ;;
        mtlshit10)
            URL=https://127.0.0.1:$port$ONE
            LOADER=load
            if [ "$system" = pgmtls ]; then CERT=("$WORK/tls/client.crt" "$WORK/tls/client.key"); fi
            ;;
        hit100) URL="http://127.0.0.1:$port$ONE?limit=100" ;;
        keys10k)
            URL=http://127.0.0.1:$port
            SCRIPT=$LUA/cycle.lua
            VARS=(BENCH_KEYS=10000 BENCH_CHECKPOINT_PREFIX=ft:gpt-4o-mini-2024-07-18:acme:k)
            ;;
        miss0 | miss20 | fleetmiss0)
            URL=http://127.0.0.1:$port
            SCRIPT=$LUA/unique.lua
            VARS=(BENCH_RUN_ID="r$round-$system-$RANDOM$RANDOM")
            [ "$scenario" = miss20 ] && UPSTREAM=up20
            case $system in direct*) AUTH=$ADMIN_KEY ;; esac
            ;;
        fleetwrite)
            URL=http://127.0.0.1:$port$ONE
            SCRIPT=$LUA/create.lua
            VARS=(BENCH_PAUSE_MS="$WRITE_PAUSE_MS")
            AUTH=$WRITER_TOKEN
            CONNS=$WRITE_CONNECTIONS
            ;;
    esac
}

RESULTS=""
# measure SCENARIO SYSTEM ROUND [DURATION]: one wrk run, appended to $RESULTS (round 0 = warm-up)
measure() {
    local scenario=$1 system=$2 round=$3 duration=${4:-$DURATION}
    target "$scenario" "$system" "$round"
    local calls_before cpu_before cpu_after calls_after line
    [ "$round" -gt 0 ] && wait_quiet
    calls_before=$(upstream_count "$UPSTREAM")
    local busy0 total0 ours0 kids0 busy1 total1 ours1 kids1
    read -r busy0 total0 < <(machine_jiffies)
    ours0=$(our_ticks)
    child_ticks kids0
    cpu_before=$(ticks "${CPU_PIDS[@]}")
    local redis_before=0 redis_after=0 acks_before=0 acks_after=0 missed_before=0 missed_after=0
    local with_redis=0
    case $system in pgfleet | pgwfleet) with_redis=1 ;; esac
    [ $with_redis -eq 1 ] && redis_before=$(redis_commands)
    if [ "$system" = pgwfleet ]; then
        acks_before=$(metric permgate_fleet_acks_awaited_total pgwfleet)
        missed_before=$(metric permgate_fleet_acks_missed_total pgwfleet)
    fi
    if [ "$LOADER" = load ]; then
        load_run "$URL" "$duration" "$CONNS" "$AUTH" "${CERT[@]}" >"$WORK/wrk.result"
    else
        wrk_run "$URL" "$SCRIPT" "$duration" "$CONNS" "$AUTH" "${VARS[@]}" >"$WORK/wrk.result"
    fi
    cpu_after=$(ticks "${CPU_PIDS[@]}")
    # Redis commands the run caused (the INFO that reads the count before is one of them).
    [ $with_redis -eq 1 ] && redis_after=$(($(redis_commands) - 1))
    if [ "$system" = pgwfleet ]; then
        acks_after=$(metric permgate_fleet_acks_awaited_total pgwfleet)
        missed_after=$(metric permgate_fleet_acks_missed_total pgwfleet)
    fi
    child_ticks kids1
    ours1=$(our_ticks)
    read -r busy1 total1 < <(machine_jiffies)
    line=$(cat "$WORK/wrk.result")
    calls_after=$(upstream_count "$UPSTREAM")
    # CPU used by other processes during the run, in % of the machine (noise indicator).
    local foreign
    foreign=$(awk -v b=$((busy1 - busy0)) -v o=$((ours1 - ours0 + kids1 - kids0)) -v t=$((total1 - total0)) \
        'BEGIN { f = t > 0 ? 100 * (b - o) / t : 0; printf "%.1f", (f < 0 ? 0 : f) }')
    [ -n "$line" ] || die "$LOADER produced no result for $scenario/$system"
    local requests cpu_us
    requests=$(field requests "$line")
    cpu_us=$(awk -v t=$((cpu_after - cpu_before)) -v hz="$CLK_TCK" -v n="$requests" \
        'BEGIN { printf "%.1f", (n > 0 ? t * 1e6 / hz / n : 0) }')
    local errors=$(($(field socket_errors "$line") + $(field status_errors "$line")))
    [ "$errors" -gt 0 ] && log "WARNING: $scenario/$system: $errors errors ($line)"
    [ "$round" -eq 0 ] && return 0
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$scenario" "$system" \
        "$(field rps "$line")" "$(field p50_us "$line")" "$(field p99_us "$line")" \
        "$(field max_us "$line")" "$requests" "$errors" "$cpu_us" $((calls_after - calls_before)) \
        "$foreign" $((redis_after - redis_before)) $((acks_after - acks_before)) \
        $((missed_after - missed_before)) >>"$RESULTS"
    log "$(printf 'round %s %-8s %-9s %9s req/s  p50 %6s us  p99 %6s us  cpu/req %6s us  upstream calls %-6s other load %s%%' \
        "$round" "$scenario" "$system" "$(field rps "$line")" "$(field p50_us "$line")" \
        "$(field p99_us "$line")" "$cpu_us" $((calls_after - calls_before)) "$foreign")$(
        [ $with_redis -eq 1 ] && awk -v c=$((redis_after - redis_before)) -v n="$requests" \
            'BEGIN { printf "  redis commands/request %.2f", (n > 0 ? c / n : 0) }')$(
        [ "$system" = pgwfleet ] && awk -v a=$((acks_after - acks_before)) -v m=$((missed_after - missed_before)) \
            -v n="$requests" 'BEGIN { printf "  acks awaited/write %.2f, replicas waited out %d", (n > 0 ? a / n : 0), m }')"
}

systems_of() {
    case $1 in
        hit10) echo "${HIT10_SYSTEMS:-ref10 ref10busy nginx pg pglog}${BASELINE:+ pgbase}" ;;
        hit100) echo "ref100 nginx pg" ;;
        keys10k) echo "nginx pg" ;;
        miss0) echo "direct0 nginx pg" ;;
        miss20) echo "direct20 nginx pg" ;;
        tlshit10) echo "nginx pgtls" ;;
        mtlshit10) echo "pgtls pgmtls" ;;
        jwthit10) echo "pg pgjwt" ;;
        fleethit10 | fleetmiss0) echo "pg pgfleet" ;;
        fleetwrite) echo "pgw pgwfleet" ;;
        *) die "unknown scenario $1" ;;
    esac
}

# Runs the 10,000-key cycle against SYSTEM until a whole pass costs no upstream call.
warm_keys() {
    local system=$1 before after
    for _ in $(seq 8); do
        before=$(upstream_count up0)
        target keys10k "$system" 0
        wrk_run "$URL" "$SCRIPT" 2s "$CONNECTIONS" "$AUTH" "${VARS[@]}" >/dev/null
        after=$(upstream_count up0)
        [ "$after" = "$before" ] && return 0
    done
    log "WARNING: $system: the 10,000 keys still miss after 8 passes"
}

# ---------------------------------------------------------------------------------------------
# One-off checks: each appends "name<TAB>value<TAB>unit<TAB>target<TAB>met|missed" to $EXTRA
# ---------------------------------------------------------------------------------------------
EXTRA=""
extra() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$EXTRA"; }
verdict() { awk "BEGIN { exit !($1) }" && echo met || echo missed; }

check_coalesce() {
    log "coalescing: 1,000 concurrent cold requests for one key (upstream holds 1 s)"
    start upslow $((PORT_BASE + 2)) "$UPSTREAM_BIN" --listen "127.0.0.1:$((PORT_BASE + 2))" \
        --admin-key "$ADMIN_KEY" --delay-ms 1000
    start_permgate pgcoal $((PORT_BASE + 35)) upslow "info,permgate::access=off" "ttl_seconds = 3600"
    local before after line
    before=$(upstream_count upslow)
    line=$(CONNECTIONS=1000 wrk_run "http://127.0.0.1:${PORT[pgcoal]}$ONE" "$LUA/report.lua" 3s 1000 "$TOKEN")
    after=$(upstream_count upslow)
    local calls=$((after - before))
    log "coalescing: $(field requests "$line") requests, $calls upstream call(s), max latency $(field max_us "$line") us"
    extra "coalescing: upstream calls for 1,000 concurrent cold requests" "$calls" "calls" "== 1" \
        "$(verdict "$calls == 1")"
    stop pgcoal
    stop upslow
}

check_idle() {
    log "idle expiry: 10,000 entries with a 1 s lifetime, ${IDLE_SECONDS} s idle, then 1 s of traffic"
    start_permgate pgidle $((PORT_BASE + 36)) up0 "info,permgate::access=off" \
        "ttl_seconds = 1" "stale_while_revalidate_seconds = 0" "stale_if_error_seconds = 0" \
        "negative_ttl_seconds = 0"
    local before after
    before=$(upstream_count up0)
    for _ in $(seq 10); do
        wrk_run "http://127.0.0.1:${PORT[pgidle]}" "$LUA/cycle.lua" 2s "$CONNECTIONS" "$TOKEN" \
            BENCH_KEYS=10000 BENCH_CHECKPOINT_PREFIX=ft:gpt-4o-mini-2024-07-18:acme:idle- >/dev/null
        after=$(upstream_count up0)
        [ $((after - before)) -ge 10000 ] && break
    done
    log "idle expiry: stored $((after - before)) pages; idling ${IDLE_SECONDS} s"
    sleep "$IDLE_SECONDS"
    local line
    line=$(wrk_run "http://127.0.0.1:${PORT[pgidle]}" "$LUA/cycle.lua" 1s "$CONNECTIONS" "$TOKEN" \
        BENCH_KEYS=10000 BENCH_CHECKPOINT_PREFIX=ft:gpt-4o-mini-2024-07-18:acme:idle-)
    local max_us
    max_us=$(field max_us "$line")
    log "idle expiry: first second: $(field requests "$line") requests, p99 $(field p99_us "$line") us, max $max_us us"
    extra "idle: max latency, first 1 s after 30 s idle with 10,000 expired entries" \
        "$(awk -v u="$max_us" 'BEGIN { printf "%.1f", u / 1000 }')" ms "<= 50 ms" "$(verdict "$max_us <= 50000")"
    stop pgidle
}

check_memory() {
    local pages=100000
    log "memory: RSS with $pages cached 10-item pages"
    start_permgate pgmem $((PORT_BASE + 37)) up0 "info,permgate::access=off" \
        "ttl_seconds = 3600" "max_bytes = 1073741824"
    local rss0 before after
    rss0=$(rss_kib "${PID[pgmem]}")
    before=$(upstream_count up0)
    after=$before
    for _ in $(seq 30); do
        # Each pass continues after the pages already stored.
        wrk_run "http://127.0.0.1:${PORT[pgmem]}" "$LUA/cycle.lua" 5s "$CONNECTIONS" "$TOKEN" \
            BENCH_KEYS=$pages BENCH_OFFSET=$((after - before)) \
            BENCH_CHECKPOINT_PREFIX=ft:gpt-4o-mini-2024-07-18:acme:mem- >/dev/null
        after=$(upstream_count up0)
        [ $((after - before)) -ge $pages ] && break
    done
    sleep 1
    local rss body total limit
    rss=$(rss_kib "${PID[pgmem]}")
    body=$(stat -c %s "$WORK/body10.json")
    total=$((body * pages))
    limit=$(awk -v t=$total 'BEGIN { printf "%d", 1.2 * t / 1024 + 30 * 1024 }')
    log "memory: $((after - before)) fills, RSS $((rss / 1024)) MiB (empty: $((rss0 / 1024)) MiB), bodies $((total / 1048576)) MiB ($body B each)"
    extra "memory: RSS with 100,000 cached 10-item pages (bodies $((total / 1048576)) MiB, $body B each; started at $((rss0 / 1024)) MiB)" \
        "$((rss / 1024))" MiB "<= 1.2 x bodies + 30 MiB = $((limit / 1024)) MiB" "$(verdict "$rss <= $limit")"
    extra "memory: per cached page beyond its body: (RSS - empty RSS) / pages - body" \
        "$(((rss - rss0) * 1024 / pages - body))" "B" "(for comparison)" "-"
    stop pgmem
}

# check_bound ITEMS PORT: a flood of new ITEMS-item pages against the default max_bytes. Large
# pages test the body accounting, small ones the per-page overhead the weigher adds.
check_bound() {
    local items=$1 port=$2 max_bytes=67108864 name=pgbound$1
    log "memory bound: new $items-item pages for $BOUND_DURATION against max_bytes = 64 MiB (the default)"
    start_permgate "$name" "$port" up0 "info,permgate::access=off" "ttl_seconds = 3600"
    local before after peak=0 rss
    before=$(upstream_count up0)
    wrk_run "http://127.0.0.1:${PORT[$name]}" "$LUA/unique.lua" "$BOUND_DURATION" "$CONNECTIONS" "$TOKEN" \
        BENCH_RUN_ID="bound-$RANDOM" BENCH_QUERY_EXTRA="&limit=$items" >"$WORK/bound.result" &
    local wrk_pid=$!
    while kill -0 $wrk_pid 2>/dev/null; do
        rss=$(rss_kib "${PID[$name]}")
        [ "$rss" -gt "$peak" ] && peak=$rss
        sleep 0.2
    done
    wait $wrk_pid || true
    after=$(upstream_count up0)
    local body stored_mib limit
    body=$(stat -c %s "$WORK/body$items.json")
    stored_mib=$(((after - before) * body / 1048576))
    limit=$(((max_bytes + 30 * 1048576) / 1024))
    log "memory bound: $((after - before)) distinct $items-item pages ($stored_mib MiB of bodies) sent; peak RSS $((peak / 1024)) MiB"
    extra "memory bound: peak RSS while $((after - before)) new $items-item pages ($stored_mib MiB) arrive, max_bytes 64 MiB" \
        "$((peak / 1024))" MiB "<= max_bytes + 30 MiB = $((limit / 1024)) MiB" "$(verdict "$peak <= $limit")"
    stop "$name"
}

# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
report() {
    awk -F'\t' -v extra="$(cat "$EXTRA")" -v busy_ns="$REF_BUSY_NS" '
    function median(list,   n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
        if (n == 0) return ""
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    function stat(metric, s, y,   r, l) { l = ""; for (r = 1; r <= rounds; r++) if ((metric, s, y, r) in V) l = l " " V[metric, s, y, r]; return median(l) }
    function spread(s, y,   r, lo, hi) {
        lo = ""; hi = ""
        for (r = 1; r <= rounds; r++) if (("rps", s, y, r) in V) {
            if (lo == "" || V["rps", s, y, r] < lo) lo = V["rps", s, y, r]
            if (hi == "" || V["rps", s, y, r] > hi) hi = V["rps", s, y, r]
        }
        return lo == "" ? "" : 100 * (hi - lo) / stat("rps", s, y)
    }
    # the median over rounds of metric(s1, y1) / metric(s2, y2), taken round by round
    function ratio(m, s1, y1, s2, y2,   r, l) {
        l = ""
        for (r = 1; r <= rounds; r++) if ((m, s1, y1, r) in V && (m, s2, y2, r) in V && V[m, s2, y2, r] > 0)
            l = l " " V[m, s1, y1, r] / V[m, s2, y2, r]
        return median(l)
    }
    function diff(m, s1, y1, s2, y2,   r, l) {
        l = ""
        for (r = 1; r <= rounds; r++) if ((m, s1, y1, r) in V && (m, s2, y2, r) in V)
            l = l " " V[m, s1, y1, r] - V[m, s2, y2, r]
        return median(l)
    }
    function have(s, y) { return ("rps", s, y, 1) in V }
    # the median over rounds of the share of its core the server used (req/s x CPU per request)
    function load(s, y,   r, l) {
        l = ""
        for (r = 1; r <= rounds; r++) if (("rps", s, y, r) in V) l = l " " V["rps", s, y, r] * V["cpu", s, y, r] / 1e4
        return median(l)
    }
    function total(metric, s, y,   r, t) { t = 0; for (r = 1; r <= rounds; r++) if ((metric, s, y, r) in V) t += V[metric, s, y, r]; return t }
    # the share of its core a server used, flagged when under 90 %: then the load generator,
    # not the server, was the limit, and CPU per request is the figure to compare
    function saturation(name, s, y,   l) {
        l = load(s, y)
        printf "  %-66s %12s   %-26s %s\n", name, sprintf("%.0f%%", l), "(>= 90%: server-bound)", (l >= 90 ? "info" : "NOT SATURATED")
    }
    # ok: 1 met, 0 missed, -1 a figure for comparison only
    function check(name, value, fmt, goal, ok) {
        if (value == "") { printf "  %-66s %12s   %-26s %s\n", name, "n/a", goal, "not run"; return }
        printf "  %-66s %12s   %-26s %s\n", name, sprintf(fmt, value), goal, ok < 0 ? "info" : ok ? "met" : "MISSED"
    }
    {
        r = $1; s = $2; y = $3
        if (r > rounds) rounds = r
        V["rps", s, y, r] = $4; V["p50", s, y, r] = $5; V["p99", s, y, r] = $6; V["max", s, y, r] = $7
        V["err", s, y, r] = $9; V["cpu", s, y, r] = $10; V["up", s, y, r] = $11; V["bg", s, y, r] = $12
        if ($8 > 0) { V["redis", s, y, r] = $13 / $8; V["acks", s, y, r] = $14 / $8 }
        V["missed", s, y, r] = $15
        if ($12 + 0 > bgmax) bgmax = $12 + 0
        if (!((s, y) in seen)) { seen[s, y] = 1; order[++n] = s SUBSEP y }
        if (length(s) > ws) ws = length(s)
        if (length(y) > wy) wy = length(y)
    }
    END {
        # the first two columns: 8 and 9 wide, wider for longer names (fleethit10)
        ws = ws > 8 ? ws : 8; wy = wy > 9 ? wy : 9
        printf "\n%-" ws "s %-" wy "s %9s %8s %8s %7s %9s %8s %6s %6s  %s\n", "scenario", "system", "req/s", "p50 ms", "p99 ms", "spread", "cpu/req", "upstream", "errors", "other", "ratios: req/s (CPU per request), median of per-round ratios"
        for (i = 1; i <= n; i++) {
            split(order[i], k, SUBSEP); s = k[1]; y = k[2]
            ref = (s == "hit100") ? "ref100" : (s == "miss0") ? "direct0" : (s == "miss20") ? "direct20" : "ref10"
            rs = (s == "keys10k") ? "hit10" : s
            up = 0; er = 0
            for (r = 1; r <= rounds; r++) { up += V["up", s, y, r]; er += V["err", s, y, r] }
            notes = ""
            if (y != ref && have(rs, ref) && s != "fleetwrite") notes = notes sprintf("%s %.3f (%.3f)  ", ref, ratio("rps", s, y, rs, ref), ratio("cpu", rs, ref, s, y))
            if (y != "nginx" && have(s, "nginx") && y !~ /^(ref|direct)/) notes = notes sprintf("nginx %.2fx (%.2fx)  ", ratio("rps", s, y, s, "nginx"), ratio("cpu", s, "nginx", s, y))
            if (s == "keys10k" && have("hit10", y)) notes = notes sprintf("own 1-key %.3f (%.3f)", ratio("rps", s, y, "hit10", y), ratio("cpu", "hit10", y, s, y))
            printf "%-" ws "s %-" wy "s %9.0f %8.3f %8.3f %6.1f%% %7.1fus %8d %6d %5.1f%%  %s\n", s, y, stat("rps", s, y), stat("p50", s, y) / 1000, stat("p99", s, y) / 1000, spread(s, y), stat("cpu", s, y), up, er, stat("bg", s, y), notes
        }
        print "\nspread = (max - min) / median of req/s across rounds; cpu/req = server process CPU time / requests"
        print "(nginx: its worker process; for misses the upstream is not included); upstream = upstream requests"
        print "during the measured runs (0 on hits); other = median CPU used by processes not started by this"
        printf "script, in %% of the machine (max over all runs: %.1f%%). In brackets: the same ratio computed from\n", bgmax
        print "CPU per request instead of req/s (server-side efficiency; less sensitive to a busy machine)."
        if (have("fleethit10", "pgfleet") || have("fleetmiss0", "pgfleet"))
            print "pgfleet (permgate with [redis]): cpu/req counts permgate and its redis-server together."
        if (have("fleetwrite", "pgwfleet"))
            print "pgwfleet (three replicas with [redis]): cpu/req counts the three permgates and redis-server together."
        print "\nTargets (issue 6):"
        check("cache hit, 1 key, 10 items: permgate / bare hyper", have("hit10", "pg") && have("hit10", "ref10") ? ratio("rps", "hit10", "pg", "hit10", "ref10") : "", "%.3f", ">= 0.85", ratio("rps", "hit10", "pg", "hit10", "ref10") >= 0.85)
        check("  same, by CPU per request (bare hyper cpu/req / permgate cpu/req)", have("hit10", "pg") && have("hit10", "ref10") ? ratio("cpu", "hit10", "ref10", "hit10", "pg") : "", "%.3f", ">= 0.85", ratio("cpu", "hit10", "ref10", "hit10", "pg") >= 0.85)
        check("cache hit, 1 key, 10 items: permgate / nginx", have("hit10", "nginx") && have("hit10", "pg") ? ratio("rps", "hit10", "pg", "hit10", "nginx") : "", "%.2fx", "(target implies ~1.7x)", -1)
        check("cache hit, 1 key, 10 items: nginx / bare hyper", have("hit10", "nginx") && have("hit10", "ref10") ? ratio("rps", "hit10", "nginx", "hit10", "ref10") : "", "%.3f", "(issue: about 0.49)", -1)
        check("cache hit: permgate cpu/req - bare hyper cpu/req, 10 items", have("hit10", "pg") && have("hit10", "ref10") ? diff("cpu", "hit10", "pg", "hit10", "ref10") : "", "%+.1f us", "(what permgate adds)", -1)
        check("cache hit: permgate cpu/req - bare hyper cpu/req, 100 items", have("hit100", "pg") && have("hit100", "ref100") ? diff("cpu", "hit100", "pg", "hit100", "ref100") : "", "%+.1f us", "(no per-byte cost: equal)", -1)
        check("cache hit, 1 key, 10 items: p99 permgate / p99 bare hyper", have("hit10", "pg") && have("hit10", "ref10") ? ratio("p99", "hit10", "pg", "hit10", "ref10") : "", "%.2f", "<= 1.2", ratio("p99", "hit10", "pg", "hit10", "ref10") <= 1.2)
        check("  bare hyper: share of its core used in hit10 (req/s x cpu/req)", have("hit10", "ref10") ? load("hit10", "ref10") : "", "%.0f%%", "(under 100%: wrk is the limit)", -1)
        check("  permgate: share of its core used in hit10", have("hit10", "pg") ? load("hit10", "pg") : "", "%.0f%%", "", -1)
        check(sprintf("  p99 permgate / p99 bare hyper doing %d ns more per request", busy_ns), have("hit10", "pg") && have("hit10", "ref10busy") ? ratio("p99", "hit10", "pg", "hit10", "ref10busy") : "", "%.2f", "(the control: ref10busy)", -1)
        check("10,000 keys / 1 key (permgate)", have("keys10k", "pg") && have("hit10", "pg") ? ratio("rps", "keys10k", "pg", "hit10", "pg") : "", "%.3f", ">= 0.9", ratio("rps", "keys10k", "pg", "hit10", "pg") >= 0.9)
        if (have("hit100", "pg") && have("hit100", "ref100") && have("hit10", "pg") && have("hit10", "ref10")) {
            r100 = ratio("rps", "hit100", "pg", "hit100", "ref100"); r10 = ratio("rps", "hit10", "pg", "hit10", "ref10")
            d = r100 / r10 - 1
            check(sprintf("100-item ratio %.3f vs 10-item ratio %.3f: difference", r100, r10), 100 * d, "%+.1f%%", "within 5%", d <= 0.05 && d >= -0.05)
        } else check("100-item ratio vs 10-item ratio", "", "", "within 5%", 0)
        check("miss, 0 ms upstream: permgate / nginx", have("miss0", "pg") && have("miss0", "nginx") ? ratio("rps", "miss0", "pg", "miss0", "nginx") : "", "%.2fx", ">= 2x", ratio("rps", "miss0", "pg", "miss0", "nginx") >= 2)
        check("  same, by CPU per miss (nginx / permgate)", have("miss0", "pg") && have("miss0", "nginx") ? ratio("cpu", "miss0", "nginx", "miss0", "pg") : "", "%.2fx", ">= 2x", ratio("cpu", "miss0", "nginx", "miss0", "pg") >= 2)
        check("miss, 0 ms upstream: permgate CPU per miss", have("miss0", "pg") ? stat("cpu", "miss0", "pg") : "", "%.1f us", "<= 25 us", stat("cpu", "miss0", "pg") <= 25)
        check("miss, 0 ms upstream: nginx CPU per miss (worker)", have("miss0", "nginx") ? stat("cpu", "miss0", "nginx") : "", "%.1f us", "(issue: about 60 us)", -1)
        check("miss, 20 ms upstream: permgate / direct", have("miss20", "pg") && have("miss20", "direct20") ? ratio("rps", "miss20", "pg", "miss20", "direct20") : "", "%.3f", ">= 0.97", ratio("rps", "miss20", "pg", "miss20", "direct20") >= 0.97)
        check("miss, 20 ms upstream: nginx / direct", have("miss20", "nginx") && have("miss20", "direct20") ? ratio("rps", "miss20", "nginx", "miss20", "direct20") : "", "%.3f", "(issue: about 0.95)", -1)
        check("miss, 20 ms upstream: permgate p50 - direct p50", have("miss20", "pg") && have("miss20", "direct20") ? diff("p50", "miss20", "pg", "miss20", "direct20") / 1000 : "", "%+.3f ms", "<= +0.5 ms", diff("p50", "miss20", "pg", "miss20", "direct20") <= 500)
        check("access log on: permgate / bare hyper (10 items, 1 key)", have("hit10", "pglog") && have("hit10", "ref10") ? ratio("rps", "hit10", "pglog", "hit10", "ref10") : "", "%.3f", ">= 0.7", ratio("rps", "hit10", "pglog", "hit10", "ref10") >= 0.7)
        check("  same, by CPU per request", have("hit10", "pglog") && have("hit10", "ref10") ? ratio("cpu", "hit10", "ref10", "hit10", "pglog") : "", "%.3f", ">= 0.7", ratio("cpu", "hit10", "ref10", "hit10", "pglog") >= 0.7)
        if (have("tlshit10", "pgtls") && have("tlshit10", "nginx"))
            check("cache hit over TLS, 1 key, 10 items: permgate / nginx", ratio("rps", "tlshit10", "pgtls", "tlshit10", "nginx"), "%.2fx", "(both terminate TLS)", -1)
        if (have("tlshit10", "pgtls") && have("hit10", "pg"))
            check("  permgate cpu/req: TLS - plain HTTP", diff("cpu", "tlshit10", "pgtls", "hit10", "pg"), "%+.1f us", "(what TLS adds per request)", -1)
        if (have("mtlshit10", "pgmtls") && have("mtlshit10", "pgtls")) {
            check("cache hit, mTLS / TLS (permgate; bench-load drives both)", ratio("rps", "mtlshit10", "pgmtls", "mtlshit10", "pgtls"), "%.3f", ">= 0.9", ratio("rps", "mtlshit10", "pgmtls", "mtlshit10", "pgtls") >= 0.9)
            check("  same, by CPU per request (TLS / mTLS)", ratio("cpu", "mtlshit10", "pgtls", "mtlshit10", "pgmtls"), "%.3f", ">= 0.9", ratio("cpu", "mtlshit10", "pgtls", "mtlshit10", "pgmtls") >= 0.9)
            check("  permgate cpu/req: mTLS - TLS", diff("cpu", "mtlshit10", "pgmtls", "mtlshit10", "pgtls"), "%+.1f us", "(what mTLS adds per hit)", -1)
            saturation("  permgate TLS: share of its core used in mtlshit10", "mtlshit10", "pgtls")
            saturation("  permgate mTLS: share of its core used in mtlshit10", "mtlshit10", "pgmtls")
        }
        if (have("mtlshit10", "pgtls") && have("tlshit10", "pgtls"))
            check("  the same TLS hit (pgtls) driven by bench-load / by wrk", ratio("rps", "mtlshit10", "pgtls", "tlshit10", "pgtls"), "%.3f", "(rates of the two loaders)", -1)
        if (have("jwthit10", "pgjwt") && have("jwthit10", "pg")) {
            check("cache hit, JWT caller / static-token caller (permgate)", ratio("rps", "jwthit10", "pgjwt", "jwthit10", "pg"), "%.3f", ">= 0.9", ratio("rps", "jwthit10", "pgjwt", "jwthit10", "pg") >= 0.9)
            check("  same, by CPU per request (static / JWT)", ratio("cpu", "jwthit10", "pg", "jwthit10", "pgjwt"), "%.3f", ">= 0.9", ratio("cpu", "jwthit10", "pg", "jwthit10", "pgjwt") >= 0.9)
            check("  permgate cpu/req: JWT - static token", diff("cpu", "jwthit10", "pgjwt", "jwthit10", "pg"), "%+.1f us", "(what the JWT adds per hit)", -1)
        }
        if (have("fleethit10", "pgfleet") && have("fleethit10", "pg")) {
            check("cache hit, [redis] on / off (permgate)", ratio("rps", "fleethit10", "pgfleet", "fleethit10", "pg"), "%.3f", ">= 0.9", ratio("rps", "fleethit10", "pgfleet", "fleethit10", "pg") >= 0.9)
            check("  same, by CPU per request, redis-server included (off / on)", ratio("cpu", "fleethit10", "pg", "fleethit10", "pgfleet"), "%.3f", ">= 0.9", ratio("cpu", "fleethit10", "pg", "fleethit10", "pgfleet") >= 0.9)
            check("  Redis commands per hit", stat("redis", "fleethit10", "pgfleet"), "%.2f", "(SPEC: hits stay local, 0)", -1)
        }
        if (have("fleetmiss0", "pgfleet") && have("fleetmiss0", "pg")) {
            check("miss, 0 ms upstream, [redis] on / off (permgate)", ratio("rps", "fleetmiss0", "pgfleet", "fleetmiss0", "pg"), "%.3f", ">= 0.8", ratio("rps", "fleetmiss0", "pgfleet", "fleetmiss0", "pg") >= 0.8)
            check("  same, by CPU per miss, redis-server included (off / on)", ratio("cpu", "fleetmiss0", "pg", "fleetmiss0", "pgfleet"), "%.3f", ">= 0.8", ratio("cpu", "fleetmiss0", "pg", "fleetmiss0", "pgfleet") >= 0.8)
            check("  Redis commands per miss", stat("redis", "fleetmiss0", "pgfleet"), "%.2f", "", -1)
        }
        if (have("fleetwrite", "pgwfleet") && have("fleetwrite", "pgw")) {
            check("write, 3 healthy replicas: p99 with [redis] - p99 without", diff("p99", "fleetwrite", "pgwfleet", "fleetwrite", "pgw") / 1000, "%+.3f ms", "<= +2 ms", diff("p99", "fleetwrite", "pgwfleet", "fleetwrite", "pgw") <= 2000)
            check("  p50 with [redis] - p50 without", diff("p50", "fleetwrite", "pgwfleet", "fleetwrite", "pgw") / 1000, "%+.3f ms", "(added at the median)", -1)
            check("  p50 / p99 without Redis (pgw), ms", sprintf("%.3f / %.3f", stat("p50", "fleetwrite", "pgw") / 1000, stat("p99", "fleetwrite", "pgw") / 1000), "%s", "", -1)
            check("  p50 / p99 with [redis], 3 replicas (pgwfleet), ms", sprintf("%.3f / %.3f", stat("p50", "fleetwrite", "pgwfleet") / 1000, stat("p99", "fleetwrite", "pgwfleet") / 1000), "%s", "", -1)
            check("  acknowledgements awaited per write", stat("acks", "fleetwrite", "pgwfleet"), "%.2f", "(2 replicas x 2 fan-outs: 4)", -1)
            check("  replicas waited out instead of acknowledging (all rounds)", total("missed", "fleetwrite", "pgwfleet"), "%d", "== 0 (all healthy)", total("missed", "fleetwrite", "pgwfleet") == 0)
            check("  Redis commands per write", stat("redis", "fleetwrite", "pgwfleet"), "%.2f", "", -1)
        }
        m = split(extra, lines, "\n")
        for (i = 1; i <= m; i++) if (lines[i] != "") {
            split(lines[i], f, "\t")
            printf "  %s\n  %-66s %12s   %-26s %s\n", f[1], "", f[2] " " f[3], f[4], f[5] == "met" ? "met" : f[5] == "missed" ? "MISSED" : "info"
        }
    }' "$RESULTS"
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
[ "$(nproc)" -ge 2 ] || log "WARNING: fewer than 2 CPUs: servers and wrk share a core, figures are not comparable"
[ "$ROUNDS" -ge 1 ] || die "ROUNDS must be at least 1"
install_tools
if [ -z "${SKIP_BUILD:-}" ]; then
    log "building permgate and the helpers (release, fat LTO: a few minutes the first time)"
    # Two invocations: building the examples pulls in dev-dependencies, whose features must not
    # leak into the permgate binary being measured (it is built exactly as `cargo build --release`).
    (cd "$ROOT" && cargo build --release --locked --bin permgate &&
        cargo build --release --locked --example bench-upstream --example bench-reference --example bench-load)
fi
PERMGATE=$TARGET_DIR/release/permgate
UPSTREAM_BIN=$TARGET_DIR/release/examples/bench-upstream
REFERENCE_BIN=$TARGET_DIR/release/examples/bench-reference
LOAD_BIN=$TARGET_DIR/release/examples/bench-load
for bin in "$PERMGATE" "$UPSTREAM_BIN" "$REFERENCE_BIN" "$LOAD_BIN"; do [ -x "$bin" ] || die "missing $bin"; done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

base=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
WORK=$(mktemp -d "$base/permgate-bench.XXXXXX")
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=$OUT/results-$STAMP.tsv
EXTRA=$WORK/extra.tsv
: >"$RESULTS"
: >"$EXTRA"
# Letters and digits of both cases, as a real key's (a hex one could share a piece with the
# config's hex token digests, which permgate refuses).
ADMIN_KEY=sk-admin-$(head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' | head -c 40)
TOKEN=bench-client-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
TOKEN_SHA256=$(printf '%s' "$TOKEN" | "$PERMGATE" hash-token)
WRITER_TOKEN=bench-writer-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')

log "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1); servers on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU"
log "runs of $DURATION, $ROUNDS rounds, $CONNECTIONS connections; work dir $WORK"

start up0 "$PORT_BASE" "$UPSTREAM_BIN" --listen "127.0.0.1:$PORT_BASE" --admin-key "$ADMIN_KEY"
start up20 $((PORT_BASE + 1)) "$UPSTREAM_BIN" --listen "127.0.0.1:$((PORT_BASE + 1))" \
    --admin-key "$ADMIN_KEY" --delay-ms 20
PID[direct0]=${PID[up0]}
PORT[direct0]=${PORT[up0]}
PID[direct20]=${PID[up20]}
PORT[direct20]=${PORT[up20]}
quiet="info,permgate::access=off"
start_permgate pg $((PORT_BASE + 30)) up0 "$quiet" "ttl_seconds = 3600"
start_permgate pglog $((PORT_BASE + 32)) up0 "info" "ttl_seconds = 3600"
if [ -n "${BASELINE:-}" ]; then
    PG_BIN=$BASELINE start_permgate pgbase $((PORT_BASE + 24)) up0 "$quiet" "ttl_seconds = 3600"
fi
start_permgate pgmiss0 $((PORT_BASE + 33)) up0 "$quiet" "ttl_seconds = 3600"
start_permgate pgmiss20 $((PORT_BASE + 34)) up20 "$quiet" "ttl_seconds = 3600"
if tls_wanted; then
    make_certs
    start_permgate_tls pgtls $((PORT_BASE + 31))
fi
if mtls_wanted; then
    # The caller is named by its certificate (tls_identity), as an mTLS deployment names it; it
    # still sends the bearer token, as the SDKs do.
    start_permgate_tls pgmtls $((PORT_BASE + 40)) "client_ca_file = \"$WORK/tls/clients-ca.crt\"" \
        "require_client_cert = true" "" "[[clients]]" "name = \"bench-mtls\"" \
        "tls_identity = \"$CLIENT_SPIFFE\"" "checkpoints = [\"*\"]"
fi
if jwt_wanted; then
    make_jwt
    PG_TAIL=$(printf '[jwt]\nissuer = "%s"\naudiences = ["permgate"]\njwks_file = "%s"\nleeway_seconds = 30\n\n[[clients]]\nname = "bench-jwt"\njwt_subject = "%s"\ncheckpoints = ["*"]' \
        "$JWT_ISSUER" "$WORK/jwks.json" "$JWT_SUBJECT") start_permgate pgjwt $((PORT_BASE + 41)) up0 "$quiet" "ttl_seconds = 3600"
fi
redis_wanted && start_redis $((PORT_BASE + 44))
if fleet_wanted; then
    # Two independent fleets of one replica (own key prefixes) on the one redis-server.
    for fleet in "pgfleet 42" "pgfleetmiss 43"; do
        read -r name offset <<<"$fleet"
        PG_TAIL=$(printf '[redis]\nurl = "redis://127.0.0.1:%s"\nkey_prefix = "permgate:%s:"' "${PORT[redis]}" "$name") \
            start_permgate "$name" $((PORT_BASE + offset)) up0 "$quiet" "ttl_seconds = 3600"
    done
fi
if write_wanted; then
    # fleetwrite: a client that may write; permgate without Redis (pgw), and a fleet of three
    # replicas on one key prefix (pgwfleet takes the writes; pgwfleet2 and pgwfleet3 apply and
    # acknowledge them). pgwfleet's admin listener serves the ack counters.
    writer=$(printf '[[clients]]\nname = "bench-writer"\ntoken_sha256 = "%s"\ncheckpoints = ["*"]\ncan_write = true' \
        "$(printf '%s' "$WRITER_TOKEN" | "$PERMGATE" hash-token)")
    PG_TAIL=$writer start_permgate pgw $((PORT_BASE + 45)) up0 "$quiet" "ttl_seconds = 3600"
    fleet=$(printf '[redis]\nurl = "redis://127.0.0.1:%s"\nkey_prefix = "permgate:pgwfleet:"' "${PORT[redis]}")
    ADMIN[pgwfleet]=127.0.0.1:$((PORT_BASE + 49))
    PG_TAIL=$writer$'\n\n'$fleet PG_ADMIN_LISTEN=${ADMIN[pgwfleet]} \
        start_permgate pgwfleet $((PORT_BASE + 46)) up0 "$quiet" "ttl_seconds = 3600"
    for replica in "pgwfleet2 47" "pgwfleet3 48"; do
        read -r name offset <<<"$replica"
        PG_TAIL=$writer$'\n\n'$fleet start_permgate "$name" $((PORT_BASE + offset)) up0 "$quiet" "ttl_seconds = 3600"
    done
fi
start_nginx

# The reference serves exactly the bytes permgate serves for the same page.
auth=(-H "Authorization: Bearer $TOKEN")
curl -sf "${auth[@]}" "http://127.0.0.1:${PORT[pg]}$ONE" -o "$WORK/body10.json" || die "permgate did not serve the page"
curl -sf "${auth[@]}" "http://127.0.0.1:${PORT[pg]}$ONE?limit=100" -o "$WORK/body100.json"
for system in pglog; do
    curl -sf "${auth[@]}" "http://127.0.0.1:${PORT[$system]}$ONE" -o /dev/null
    curl -sf "${auth[@]}" "http://127.0.0.1:${PORT[$system]}$ONE?limit=100" -o /dev/null
done
curl -sf "http://127.0.0.1:$((PORT_BASE + 20))$ONE" -o "$WORK/nginx10.json"
curl -sf "http://127.0.0.1:$((PORT_BASE + 20))$ONE?limit=100" -o /dev/null
cmp -s "$WORK/body10.json" "$WORK/nginx10.json" || die "nginx and permgate serve different bytes"
curl -sf -D - "${auth[@]}" "http://127.0.0.1:${PORT[pg]}$ONE" -o /dev/null | grep -qi '^cache-status: permgate; hit' ||
    die "permgate does not serve the page from its cache"
if tls_wanted; then
    tls=(--cacert "$WORK/tls/ca.crt")
    curl -sf "${tls[@]}" "${auth[@]}" "https://127.0.0.1:${PORT[pgtls]}$ONE" -o "$WORK/tls10.json" ||
        die "permgate did not serve the page over TLS"
    curl -sf "${tls[@]}" "https://127.0.0.1:$((PORT_BASE + 23))$ONE" -o "$WORK/nginxtls10.json" ||
        die "nginx did not serve the page over TLS"
    cmp -s "$WORK/body10.json" "$WORK/tls10.json" && cmp -s "$WORK/body10.json" "$WORK/nginxtls10.json" ||
        die "the TLS listeners serve different bytes"
fi
if mtls_wanted; then
    client=(--cert "$WORK/tls/client.crt" --key "$WORK/tls/client.key")
    curl -sf "${tls[@]}" "${client[@]}" "${auth[@]}" "https://127.0.0.1:${PORT[pgmtls]}$ONE" -o /dev/null ||
        die "permgate did not serve the page over mTLS"
    if curl -sf "${tls[@]}" "${auth[@]}" "https://127.0.0.1:${PORT[pgmtls]}$ONE" -o /dev/null 2>&1; then
        die "permgate served a client without a certificate though require_client_cert = true"
    fi
    # The certificate names the caller: an unknown bearer token beside it does not matter.
    curl -sf "${tls[@]}" "${client[@]}" -H "Authorization: Bearer not-a-client-token" \
        "https://127.0.0.1:${PORT[pgmtls]}$ONE" -o /dev/null ||
        die "permgate did not name the caller by its client certificate (see $WORK/pgmtls.log)"
    line=$(load_run "https://127.0.0.1:${PORT[pgmtls]}$ONE" 1s 2 "$TOKEN" "$WORK/tls/client.crt" "$WORK/tls/client.key")
    if [ "$(field status_errors "$line")" != 0 ] || [ "$(field socket_errors "$line")" != 0 ] ||
        [ "$(field requests "$line")" = 0 ]; then
        die "bench-load could not get the page over mTLS: ${line:-no result}"
    fi
fi
if jwt_wanted; then
    jwt_auth=(-H "Authorization: Bearer $JWT")
    curl -sf "${jwt_auth[@]}" "http://127.0.0.1:${PORT[pgjwt]}$ONE" -o "$WORK/jwt10.json" ||
        die "permgate did not serve the page to the JWT caller (see $WORK/pgjwt.log)"
    cmp -s "$WORK/body10.json" "$WORK/jwt10.json" || die "permgate serves the JWT caller different bytes"
    curl -sf -D - "${jwt_auth[@]}" "http://127.0.0.1:${PORT[pgjwt]}$ONE" -o /dev/null |
        grep -qi '^cache-status: permgate; hit' || die "permgate does not serve the JWT caller from its cache"
    # The token is really verified: the same one with another signature is refused.
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${JWT%?????}AAAAA" \
        "http://127.0.0.1:${PORT[pgjwt]}$ONE")
    [ "$code" = 401 ] || die "permgate answered $code to a JWT with a bad signature"
fi
if fleet_wanted; then
    for system in pgfleet pgfleetmiss; do
        curl -sf "${auth[@]}" "http://127.0.0.1:${PORT[$system]}$ONE" -o "$WORK/$system.json" ||
            die "$system did not serve the page"
        cmp -s "$WORK/body10.json" "$WORK/$system.json" || die "$system serves different bytes"
    done
    curl -sf -D - "${auth[@]}" "http://127.0.0.1:${PORT[pgfleet]}$ONE" -o /dev/null |
        grep -qi '^cache-status: permgate; hit' || die "permgate with [redis] does not serve the page from its cache"
    [ "$(redis-cli -p "${PORT[redis]}" dbsize)" -gt 0 ] || die "permgate with [redis] wrote nothing to Redis"
fi
if write_wanted; then
    # Every replica holds a lease and the writer sees all three, so a write waits for two acks.
    live=0
    for _ in $(seq 100); do
        live=$(metric permgate_fleet_replicas_live pgwfleet)
        [ "$live" -ge 3 ] && break
        sleep 0.1
    done
    [ "$live" -eq 3 ] || die "pgwfleet sees $live live replicas, not 3 (see $WORK/pgwfleet*.log)"
    for system in pgw pgwfleet; do
        before=$(upstream_count up0)
        code=$(curl -s -o "$WORK/$system.create.json" -w '%{http_code}' -H "Authorization: Bearer $WRITER_TOKEN" \
            -H "Content-Type: application/json" -d '{"project_ids":["proj_bench"]}' "http://127.0.0.1:${PORT[$system]}$ONE")
        [ "$code" = 200 ] || die "$system answered $code to a create: $(cat "$WORK/$system.create.json")"
        [ $(($(upstream_count up0) - before)) -eq 1 ] || die "$system's create did not reach upstream exactly once"
    done
    awaited=$(metric permgate_fleet_acks_awaited_total pgwfleet)
    [ "$awaited" -eq 4 ] || die "pgwfleet's write waited for $awaited acknowledgements, not 4 (2 replicas, 2 fan-outs)"
    [ "$(metric permgate_fleet_acks_missed_total pgwfleet)" -eq 0 ] ||
        die "pgwfleet's write waited a replica's lease out instead of its ack"
fi
start ref10 $((PORT_BASE + 10)) "$REFERENCE_BIN" --listen "127.0.0.1:$((PORT_BASE + 10))" --body "$WORK/body10.json"
start ref100 $((PORT_BASE + 11)) "$REFERENCE_BIN" --listen "127.0.0.1:$((PORT_BASE + 11))" --body "$WORK/body100.json"
start ref10busy $((PORT_BASE + 12)) "$REFERENCE_BIN" --listen "127.0.0.1:$((PORT_BASE + 12))" \
    --body "$WORK/body10.json" --busy-ns "$REF_BUSY_NS"
log "page bodies: 10 items $(stat -c %s "$WORK/body10.json") B, 100 items $(stat -c %s "$WORK/body100.json") B"

case " $SCENARIOS " in *" keys10k "*)
    log "warming the 10,000 keys"
    warm_keys pg
    warm_keys nginx
    ;;
esac
if [ "$WARMUP" != 0 ]; then
    log "warm-up: one $WARMUP run per scenario and system"
    for scenario in $SCENARIOS; do
        for system in $(systems_of "$scenario"); do measure "$scenario" "$system" 0 "$WARMUP"; done
    done
fi
for round in $(seq "$ROUNDS"); do
    log "round $round of $ROUNDS"
    for scenario in $SCENARIOS; do
        for system in $(systems_of "$scenario"); do measure "$scenario" "$system" "$round"; done
    done
done
log "access log written by the pglog instance: $(stat -c %s "$WORK/pglog.log") bytes"

for check in $EXTRAS; do
    case $check in
        coalesce) check_coalesce ;;
        idle) check_idle ;;
        memory) check_memory ;;
        bound)
            check_bound 100 $((PORT_BASE + 38))
            check_bound 10 $((PORT_BASE + 39))
            ;;
        *) die "unknown check $check" ;;
    esac
done

REPORT=$OUT/report-$STAMP.txt
{
    echo "permgate benchmark comparison, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r)"
    echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), $(rustc --version 2>/dev/null || true)"
    echo "servers pinned to CPU $SERVER_CPU (permgate worker_threads = 1, nginx worker_processes 1),"
    echo "wrk -t1 -c$CONNECTIONS pinned to CPU $LOAD_CPU; $ROUNDS interleaved rounds of $DURATION; medians over rounds."
    if mtls_wanted; then echo "mtlshit10: bench-load (one thread, $CONNECTIONS connections) for both systems, pinned like wrk."; fi
    if write_wanted; then
        echo "fleetwrite: wrk -t1 -c$WRITE_CONNECTIONS, POST creates, a $WRITE_PAUSE_MS ms pause after each answer;"
        echo "pgwfleet = 3 replicas on one redis-server."
    fi
    echo "page bodies: 10 items $(stat -c %s "$WORK/body10.json") B, 100 items $(stat -c %s "$WORK/body100.json") B"
    report
} | tee "$REPORT"
log "report: $REPORT; raw results: $RESULTS"
