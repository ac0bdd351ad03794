#!/usr/bin/env bash
# Proxy benchmark: tunnel-agent against nginx doing the same job, and both against the backend
# reached directly. One run measures all three on the same loopback backend, interleaved, so the
# ratios come from the same machine state.
#
#   bench/run.sh                      # 32, 1 and 128 connections, 3 repeats of 10 s each
#   CONNS=32 REPEATS=5 bench/run.sh   # knobs: CONNS DURATION WARMUP REPEATS WRK_THREADS
#                                     #        WRK_CPUS SERVER_CPUS (taskset lists) SKIP_BUILD=1
#   HOLD=1 bench/run.sh               # set everything up, print ports and PIDs, wait (profiling)
#   PERF_OUT=FILE bench/run.sh        # also `perf record` the agent's measured runs into FILE
#   TLS_CONNS="" bench/run.sh         # skip the HTTPS-upstream scenario (default: TLS_CONNS=32)
#   AGENT_B=path/to/other/tunnel-agent bench/run.sh
#                                     # A/B: a second agent build (target "agent_b") in the same
#                                     # run; AGENT_B_ENV="K=V ..." sets its environment
#   ACCESS_LOG=1 bench/run.sh         # also target "agent_log": the same agent with
#                                     # [proxy.access_log] on (every request, JSON, to a file)
#
# Targets:
#   direct  wrk → backend
#   nginx   wrk → nginx (internal-token check, Host map, static bearer, keepalive pool) → backend
#   agent   wrk → tunnel-agent (same, identity token from a fake metadata server, cache warm)
#           → backend
# The backend is a separate nginx instance answering a small static 200.
#
# HTTPS-upstream scenario (seed 000's Cloud Run upstreams are https://): a TLS backend (nginx,
# a CA and certificate made for the run, HTTP/1.1 and h2 by ALPN) behind
#   nginx_tls  nginx: proxy_pass https:// with the CA, proxy_ssl_session_reuse, keepalive
#   agent_tls  tunnel-agent: an https:// route with proxy.ca_file (h2 when ALPN picks it)
# The report adds the TLS backend's new connections (= TLS handshakes) per 10,000 requests.
#
# Prints a Markdown report on stdout (progress on stderr). Leaves nothing running.

set -euo pipefail

CONNS=${CONNS:-"32 1 128"}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-3}
REPEATS=${REPEATS:-3}
TLS_CONNS=${TLS_CONNS-32}
WRK_THREADS=${WRK_THREADS:-1}
WRK_CPUS=${WRK_CPUS:-}
SERVER_CPUS=${SERVER_CPUS:-}
WORKERS=$(nproc)
HOST=bench.example.com
TLS_HOST=tls.example.com
TOKEN=bench-internal-token-0123456789abcdef

repo=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "bench: $*" >&2; }

# --- Tools ---------------------------------------------------------------------------------------
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi

if [[ -z ${SKIP_BUILD:-} ]]; then
    log "building tunnel-agent (release)"
    (cd "$repo" && cargo build --release --quiet)
fi
AGENT=${AGENT:-$repo/target/release/tunnel-agent}

# taskset prefixes (empty: no pinning). A prefix, not a wrapper function, so that `$!` is the
# server's own PID (taskset execs its command) and the script can measure and stop it.
server_pin=()
wrk_pin=()
[[ -n $SERVER_CPUS ]] && server_pin=(taskset -c "$SERVER_CPUS")
[[ -n $WRK_CPUS ]] && wrk_pin=(taskset -c "$WRK_CPUS")

# --- Scratch dir and cleanup ----------------------------------------------------------------------
work=$(mktemp -d /tmp/tunnel-agent-bench.XXXXXX)
pids=()
cleanup() {
    local status=$? pid log
    if ((status != 0)); then
        for log in "$work"/agent*/log; do
            [[ -s $log ]] && { log "last lines of $log:"; tail -n 20 "$log" >&2; }
        done
    fi
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_ports() { # free_ports N: N currently free loopback ports
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])' "$1"
}
read -r BACKEND_PORT NGINX_PORT METADATA_PORT TLS_BACKEND_PORT TLS_STATUS_PORT NGINX_TLS_PORT < <(free_ports 6)

wait_http() { # wait_http URL [curl args...]: poll until URL answers 200, 10 s at most
    local url=$1
    shift
    for _ in $(seq 100); do
        if [[ $(curl -s -o /dev/null -w '%{http_code}' "$@" "$url" || true) == 200 ]]; then return 0; fi
        sleep 0.1
    done
    log "no 200 from $url: $(curl -s -w ' (HTTP %{http_code})' "$@" "$url" 2>&1 | head -c 400)"
    return 1
}

# nginx_conf NAME WORKERS SERVER-BLOCK: a self-contained nginx.conf in $work/NAME
nginx_conf() {
    local dir=$work/$1
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
$([[ $(id -u) == 0 ]] && echo "user root;")
worker_processes $2;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    # nginx closes a client connection after 1000 requests by default; the agent never does.
    keepalive_requests 10000000;
    keepalive_timeout 120s;
$3
}
EOF
}

# --- Backend: a small static 200 ------------------------------------------------------------------
nginx_conf backend 1 "
    server {
        listen 127.0.0.1:$BACKEND_PORT;
        default_type text/plain;
        location / { return 200 \"hello from the backend\\n\"; }
    }"
"${server_pin[@]}" nginx -p "$work/backend" -c "$work/backend/nginx.conf" -g 'daemon off;' &
pids+=($!)
backend_pid=$!

# --- TLS backend: the same 200 over HTTPS (HTTP/1.1 and h2) -----------------------------------------
# A CA and a certificate for 127.0.0.1 (the agent's upstream URL) and localhost (nginx's
# proxy_ssl_name), made for this run.
tls=$work/tls
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = CA:FALSE\n' >"$tls/ext.cnf"
openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial -days 2 \
    -extfile "$tls/ext.cnf" -out "$tls/server.pem" 2>/dev/null
nginx_conf tls_backend 1 "
    server {
        listen 127.0.0.1:$TLS_BACKEND_PORT ssl http2;
        ssl_certificate $tls/server.pem;
        ssl_certificate_key $tls/server.key;
        ssl_session_cache shared:SSL:1m;
        default_type text/plain;
        location / { return 200 \"hello from the backend\\n\"; }
    }
    server {
        listen 127.0.0.1:$TLS_STATUS_PORT;
        location = /status { stub_status; }
    }"
"${server_pin[@]}" nginx -p "$work/tls_backend" -c "$work/tls_backend/nginx.conf" -g 'daemon off;' &
pids+=($!)
# Connections the TLS backend has accepted: each is one TLS handshake.
tls_accepts() { curl -s "http://127.0.0.1:$TLS_STATUS_PORT/status" | awk 'NR == 3 { print $1 }'; }

# --- Fake metadata server ---------------------------------------------------------------------------
python3 "$repo/bench/fake_metadata.py" "$METADATA_PORT" &
pids+=($!)

# --- nginx doing the agent's job ---------------------------------------------------------------------
# A fixed JWT stands in for the identity token (the agent's comes from its cache).
STATIC_JWT=$(python3 -c '
import base64, json, time
e = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
print(e(b"{\"alg\":\"RS256\"}") + "." + e(json.dumps({"aud": "http://upstream", "exp": int(time.time()) + 86400 * 3650}).encode()) + "." + e(b"sig"))')
# What both nginx servers set on the way to the backend: the identity token's stand-in, the
# internal header cleared, X-Forwarded-*, and the hop-by-hop headers (RFC 9110 7.6.1) removed
# (an empty value removes a header).
proxy_headers="
            proxy_set_header Authorization \"Bearer $STATIC_JWT\";
            proxy_set_header X-Internal-Auth-Token \"\";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto http;
            proxy_set_header Connection \"\";
            proxy_set_header Keep-Alive \"\";
            proxy_set_header Proxy-Connection \"\";
            proxy_set_header TE \"\";
            proxy_set_header Upgrade \"\";
            proxy_set_header Proxy-Authorization \"\";"
nginx_conf proxy "$WORKERS" "
    map \$http_host \$route_upstream {
        hostnames;
        default \"\";
        $HOST backend;
    }
    upstream backend {
        server 127.0.0.1:$BACKEND_PORT;
        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            if (\$http_x_internal_auth_token != \"$TOKEN\") { return 401; }
            if (\$route_upstream = \"\") { return 404; }
            proxy_pass http://\$route_upstream;
            proxy_http_version 1.1;
$proxy_headers
        }
    }
    upstream tls_backend {
        server 127.0.0.1:$TLS_BACKEND_PORT;
        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$NGINX_TLS_PORT;
        location / {
            if (\$http_x_internal_auth_token != \"$TOKEN\") { return 401; }
            proxy_pass https://tls_backend;
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate $tls/ca.pem;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_set_header Host localhost;
$proxy_headers
        }
    }"
"${server_pin[@]}" nginx -p "$work/proxy" -c "$work/proxy/nginx.conf" -g 'daemon off;' &
pids+=($!)
nginx_pid=$!

# --- tunnel-agent ------------------------------------------------------------------------------------
declare -A agent_port agent_health agent_pid agent_extra agent_log_level
start_agent() { # start_agent NAME BINARY [ENV...]; agent_extra[NAME]: more TOML for [proxy]
    local name=$1 binary=$2 dir=$work/$1 port health
    shift 2
    read -r port health < <(free_ports 2)
    mkdir -p "$dir"
    cat >"$dir/agent.toml" <<EOF
[agent]
runtime_dir = "$dir/run"
state_dir = "$dir/state"
log_format = "text"
log_level = "${agent_log_level[$name]:-warn}"

[secrets.internal_token]
source = "env"
var = "BENCH_INTERNAL_TOKEN"

[proxy]
listen = "127.0.0.1:$port"
auth_secret = "internal_token"
ca_file = "$tls/ca.pem"
# The bench's backend is a local http:// server, which gets identity tokens like Cloud Run.
allow_id_tokens_over_http = true
# nginx keeps 64 idle upstream connections per worker (keepalive 64), 128 in all: the same here,
# or more than 64 concurrent requests would close and reopen upstream connections.
pool_max_idle_per_host = ${POOL_IDLE:-64}
${agent_extra[$name]:-}

[health]
listen = "127.0.0.1:$health"

[gcp]
metadata_url = "http://127.0.0.1:$METADATA_PORT"

[[route]]
hostnames = ["$HOST"]
upstream = "http://127.0.0.1:$BACKEND_PORT"
upstream_auth = "gcp-id-token"

[[route]]
hostnames = ["$TLS_HOST"]
upstream = "https://127.0.0.1:$TLS_BACKEND_PORT"
upstream_auth = "gcp-id-token"
# As for Cloud Run: the upstream's own Host (over h2, :authority and no host header).
host_header = "upstream"
EOF
    if [[ -n ${agent_extra[$name]:-} ]]; then
        # An access line per request would fill the disk: keep the first 200 lines, read and
        # discard the rest (as journald would read them).
        env "$@" BENCH_INTERNAL_TOKEN=$TOKEN "${server_pin[@]}" "$binary" run -c "$dir/agent.toml" \
            2> >(exec python3 -c '
import sys
with open(sys.argv[1], "wb", buffering=0) as f:
    for n, line in enumerate(sys.stdin.buffer):
        if n < 200:
            f.write(line)' "$dir/log") &
    else
        env "$@" BENCH_INTERNAL_TOKEN=$TOKEN "${server_pin[@]}" "$binary" run -c "$dir/agent.toml" 2>"$dir/log" &
    fi
    pids+=($!)
    agent_pid[$name]=$!
    agent_port[$name]=$port
    agent_health[$name]=$health
}
agents=(agent)
start_agent agent "$AGENT"
if [[ -n ${ACCESS_LOG:-} ]]; then
    agents+=(agent_log)
    # Every request logged (sample = 1): the worst case. stderr goes to $work/agent_log/log.
    agent_extra[agent_log]='access_log = { enabled = true, format = "json", sample = 1.0 }'
    agent_log_level[agent_log]='warn,access=info'
    start_agent agent_log "$AGENT"
fi
if [[ -n ${AGENT_B:-} ]]; then
    agents+=(agent_b)
    # shellcheck disable=SC2086 # AGENT_B_ENV is a list of K=V words
    start_agent agent_b "$AGENT_B" ${AGENT_B_ENV:-}
fi

wait_http "http://127.0.0.1:$BACKEND_PORT/"
wait_http "http://127.0.0.1:$METADATA_PORT/issued" -H 'Metadata-Flavor: Google'
auth=(-H "Host: $HOST" -H "X-Internal-Auth-Token: $TOKEN")
wait_http "http://127.0.0.1:$NGINX_PORT/" "${auth[@]}"
for a in "${agents[@]}"; do
    wait_http "http://127.0.0.1:${agent_health[$a]}/ready"
    # The first proxied request fetches the identity token; every later one hits the cache.
    wait_http "http://127.0.0.1:${agent_port[$a]}/" "${auth[@]}"
    [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${agent_port[$a]}/" -H "Host: $HOST") == 401 ]] ||
        { log "$a accepted a request without the internal token"; exit 1; }
done
if [[ -n ${ACCESS_LOG:-} ]]; then
    # The warm-up requests above were logged (a line is written when its response body ends).
    for _ in $(seq 100); do
        grep -q '"status":200' "$work/agent_log/log" && break
        sleep 0.1
    done
    grep -q '"status":200' "$work/agent_log/log" || { log "agent_log wrote no access line"; exit 1; }
fi
[[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$NGINX_PORT/" -H "Host: $HOST") == 401 ]] ||
    { log "nginx accepted a request without the internal token"; exit 1; }

if [[ -n ${HOLD:-} ]]; then
    log "holding: backend :$BACKEND_PORT (pid $backend_pid), nginx :$NGINX_PORT (pid $nginx_pid)," \
        "agent :${agent_port[agent]} health :${agent_health[agent]} (pid ${agent_pid[agent]}), metadata :$METADATA_PORT; Host: $HOST," \
        "X-Internal-Auth-Token: $TOKEN. Stop with SIGTERM or Ctrl-C."
    for a in "${agents[@]}"; do echo "$a ${agent_port[$a]} ${agent_pid[$a]}"; done >"${HOLD_AGENTS:-/dev/null}"
    while sleep 1; do :; done
fi

# --- Measurement helpers --------------------------------------------------------------------------------
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
# PIDs of an nginx instance: master and workers.
nginx_pids() { echo "$1" $(cat "/proc/$1/task/$1/children"); }
rss_kb() { local t=0 p; for p in "$@"; do t=$((t + $(status_kb "$p" VmRSS))); done; echo $t; }
pss_kb() { local t=0 p; for p in "$@"; do t=$((t + $(awk '$1 == "Pss:" { print $2 }' "/proc/$p/smaps_rollup"))); done; echo $t; }
cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done; echo $t; }
user_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{ print $14 }' "/proc/$p/stat"))); done; echo $t; }
CLK_TCK=$(getconf CLK_TCK)

sleep 1
agent_idle_rss=$(status_kb "${agent_pid[agent]}" VmRSS)
agent_idle_pss=$(pss_kb "${agent_pid[agent]}")
nginx_idle_rss=$(rss_kb $(nginx_pids "$nginx_pid"))
nginx_idle_pss=$(pss_kb $(nginx_pids "$nginx_pid"))
# The HTTPS route's first request (token, TLS handshake) after the idle sample, so "idle" is the
# same state as without the scenario.
if [[ -n $TLS_CONNS ]]; then
    tls_auth=(-H "Host: $TLS_HOST" -H "X-Internal-Auth-Token: $TOKEN")
    wait_http "http://127.0.0.1:$NGINX_TLS_PORT/" "${tls_auth[@]}"
    wait_http "http://127.0.0.1:${agent_port[agent]}/" "${tls_auth[@]}"
fi

declare -A url=(
    [direct]="http://127.0.0.1:$BACKEND_PORT/"
    [nginx]="http://127.0.0.1:$NGINX_PORT/"
)
declare -A server_pids=(
    [direct]="$(nginx_pids "$backend_pid")"
    [nginx]="$(nginx_pids "$nginx_pid")"
)
for a in "${agents[@]}"; do
    url[$a]="http://127.0.0.1:${agent_port[$a]}/"
    server_pids[$a]=${agent_pid[$a]}
done
targets=(direct nginx "${agents[@]}")
# The HTTPS-upstream scenario: the same proxies, another Host (nginx: another port).
declare -A host=()
url[nginx_tls]="http://127.0.0.1:$NGINX_TLS_PORT/"
server_pids[nginx_tls]=${server_pids[nginx]}
host[nginx_tls]=$TLS_HOST
url[agent_tls]="http://127.0.0.1:${agent_port[agent]}/"
server_pids[agent_tls]=${agent_pid[agent]}
host[agent_tls]=$TLS_HOST
tls_targets=(nginx_tls agent_tls)

to_ms() { # wrk's "123.45us" / "1.20ms" / "1.01s" → milliseconds
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

# measure TARGET CONNS: one warm-up run, one measured run; appends
# "rps p50 p99 cpu_us rss_kb handshakes_per_10k user_us"
measure() {
    local target=$1 conns=$2 threads=$WRK_THREADS out pids before after rss_max=0 sampler
    ((threads > conns)) && threads=$conns
    pids=${server_pids[$target]}
    local wrk=(wrk -t"$threads" -c"$conns" --latency -H "Host: ${host[$target]:-$HOST}" -H "X-Internal-Auth-Token: $TOKEN")
    "${wrk_pin[@]}" "${wrk[@]}" -d"${WARMUP}s" "${url[$target]}" >/dev/null || {
        log "$target c=$conns: warm-up failed; server processes alive: $(for p in $pids; do kill -0 "$p" 2>/dev/null && echo -n "$p "; done)"
        exit 1
    }
    before=$(cpu_ticks $pids)
    local user_before
    user_before=$(user_ticks $pids)
    local accepts_before
    accepts_before=$(tls_accepts)
    # RSS under load: sample every 0.5 s while wrk runs.
    (
        m=0
        while sleep 0.5; do r=$(rss_kb $pids); ((r > m)) && m=$r && echo $m >"$work/rss_max"; done
    ) &
    sampler=$!
    local perf=()
    if [[ -n ${PERF_OUT:-} && $target == agent ]]; then
        perf record -F 1999 -g -o "$PERF_OUT" -p "${agent_pid[agent]}" -- sleep "$DURATION" 2>/dev/null &
        perf=($!)
    fi
    out=$("${wrk_pin[@]}" "${wrk[@]}" -d"${DURATION}s" "${url[$target]}") || {
        log "$target c=$conns: wrk failed; server processes alive: $(for p in $pids; do kill -0 "$p" 2>/dev/null && echo -n "$p "; done)"
        exit 1
    }
    ((${#perf[@]})) && wait "${perf[0]}"
    kill $sampler 2>/dev/null
    wait $sampler 2>/dev/null || true
    after=$(cpu_ticks $pids)
    local user_after
    user_after=$(user_ticks $pids)
    local handshakes=$(($(tls_accepts) - accepts_before))
    rss_max=$(cat "$work/rss_max" 2>/dev/null || echo 0)
    rm -f "$work/rss_max"
    if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
        log "$target c=$conns: errors during the run:"
        echo "$out" >&2
        exit 1
    fi
    local rps p50 p99 requests cpu_us
    rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
    requests=$(awk '/requests in/ { print $1 }' <<<"$out")
    cpu_us=$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    # New TLS backend connections (handshakes) per 10,000 requests, in the measured run.
    local hs_per_10k
    hs_per_10k=$(awk -v h="$handshakes" -v n="$requests" 'BEGIN { printf "%.1f", h * 10000 / n }')
    local user_us
    user_us=$(awk -v t=$((user_after - user_before)) -v hz="$CLK_TCK" -v n="$requests" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    echo "$rps $p50 $p99 $cpu_us $rss_max $hs_per_10k $user_us" >>"$work/results.$target.$conns"
    log "$(printf '%-9s c=%-3s rps=%-9s p50=%-7s p99=%-7s cpu/req=%sus rss=%skB tls-handshakes/10k=%s' \
        "$target" "$conns" "$rps" "$p50" "$p99" "$cpu_us" "$rss_max" "$hs_per_10k")"
}

median() { # median FILE COLUMN
    sort -g -k"$2,$2" "$1" | awk -v c="$2" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
log "load average before: $load_before"
for conns in $CONNS; do
    for rep in $(seq "$REPEATS"); do
        for target in "${targets[@]}"; do
            measure "$target" "$conns"
        done
    done
done
for conns in $TLS_CONNS; do
    for rep in $(seq "$REPEATS"); do
        for target in "${tls_targets[@]}"; do
            measure "$target" "$conns"
        done
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

agent_hwm=$(status_kb "${agent_pid[agent]}" VmHWM)
agent_after_rss=$(status_kb "${agent_pid[agent]}" VmRSS)
tokens_issued=$(curl -s -H 'Metadata-Flavor: Google' "http://127.0.0.1:$METADATA_PORT/issued")
token_fetches=$(curl -s "http://127.0.0.1:${agent_health[agent]}/metrics" | awk '/^tunnel_agent_id_token_fetches_total/ { print $2 }')

# --- Report -----------------------------------------------------------------------------------------
cat <<EOF
### Run of $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')

\`CONNS="$CONNS" DURATION=$DURATION WARMUP=$WARMUP REPEATS=$REPEATS WRK_THREADS=$WRK_THREADS WRK_CPUS="$WRK_CPUS" SERVER_CPUS="$SERVER_CPUS" bench/run.sh\`

Machine: $(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(uname -r);
nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') with $WORKERS workers; tunnel-agent with the default \`proxy.workers\` (one per CPU: $WORKERS).
Load average before: $load_before; after: $load_after.
Identity tokens issued by the fake metadata server during the whole run: $tokens_issued (agent's token_fetches_total: ${token_fetches:-?}).

Medians of $REPEATS runs of ${DURATION} s (after ${WARMUP} s of warm-up each). cpu/req is user + system CPU time of the
server processes (nginx master + workers; the agent) per request; "of it user" is the part
spent in user space (the rest is the kernel: sockets, wake-ups).

| conns | target | req/s | p50 ms | p99 ms | cpu/req µs | of it user µs | RSS under load kB |
|---:|---|---:|---:|---:|---:|---:|---:|
EOF
for conns in $CONNS; do
    for target in "${targets[@]}"; do
        f=$work/results.$target.$conns
        printf '| %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$conns" "$target" \
            "$(median "$f" 1)" "$(median "$f" 2)" "$(median "$f" 3)" "$(median "$f" 4)" "$(median "$f" 7)" "$(median "$f" 5)"
    done
done
cat <<EOF

Agent / nginx (> 1 is better for req/s; < 1 is better for latency, CPU and memory):

| conns | req/s | p50 | p99 | cpu/req |
|---:|---:|---:|---:|---:|
EOF
for conns in $CONNS; do
    n=$work/results.nginx.$conns
    for a in "${agents[@]}"; do
        r=$work/results.$a.$conns
        label=$conns
        ((${#agents[@]} > 1)) && label="$conns ($a)"
        echo "| $label | $(ratio "$(median "$r" 1)" "$(median "$n" 1)") | $(ratio "$(median "$r" 2)" "$(median "$n" 2)") |" \
            "$(ratio "$(median "$r" 3)" "$(median "$n" 3)") | $(ratio "$(median "$r" 4)" "$(median "$n" 4)") |"
    done
done
if [[ -n $TLS_CONNS ]]; then
    cat <<EOF

HTTPS upstream (TLS backend: nginx, HTTP/1.1 and h2 by ALPN; nginx proxies over HTTP/1.1 with
keepalive and session reuse, the agent over whatever ALPN picks). Handshakes: new connections
the TLS backend accepted during the measured runs, per 10,000 requests.

| conns | target | req/s | p50 ms | p99 ms | cpu/req µs | TLS handshakes / 10k req |
|---:|---|---:|---:|---:|---:|---:|
EOF
    for conns in $TLS_CONNS; do
        for target in "${tls_targets[@]}"; do
            f=$work/results.$target.$conns
            printf '| %s | %s | %.0f | %s | %s | %s | %s |\n' "$conns" "$target" \
                "$(median "$f" 1)" "$(median "$f" 2)" "$(median "$f" 3)" "$(median "$f" 4)" "$(median "$f" 6)"
        done
        n=$work/results.nginx_tls.$conns
        r=$work/results.agent_tls.$conns
        echo "| $conns | agent / nginx | $(ratio "$(median "$r" 1)" "$(median "$n" 1)") | $(ratio "$(median "$r" 2)" "$(median "$n" 2)") |" \
            "$(ratio "$(median "$r" 3)" "$(median "$n" 3)") | $(ratio "$(median "$r" 4)" "$(median "$n" 4)") | |"
    done
fi
cat <<EOF

Memory (kB; nginx = master + $WORKERS workers):

| | agent | nginx | agent / nginx |
|---|---:|---:|---:|
| RSS idle | $agent_idle_rss | $nginx_idle_rss | $(ratio "$agent_idle_rss" "$nginx_idle_rss") |
| PSS idle | $agent_idle_pss | $nginx_idle_pss | $(ratio "$agent_idle_pss" "$nginx_idle_pss") |
| agent VmHWM (peak) / RSS after the run | $agent_hwm / $agent_after_rss | | |
EOF

# --- Against the goals (issue 11) ---------------------------------------------------------------------
verdict() { # verdict VALUE OP LIMIT: "met" or "missed"
    awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN {
        ok = (op == ">=") ? (v >= l) : (v <= l)
        print (v == "-" ? "-" : (ok ? "met" : "**missed**")) }'
}
goal_row() { # goal_row LABEL VALUE OP LIMIT
    echo "| $1 | $2 | $3 $4 | $(verdict "$2" "$3" "$4") |"
}
cat <<EOF

Against the goals (agent / nginx unless stated):

| figure | this run | goal | |
|---|---:|---:|---|
EOF
for conns in $CONNS; do
    n=$work/results.nginx.$conns
    r=$work/results.agent.$conns
    goal_row "req/s, $conns conns" "$(ratio "$(median "$r" 1)" "$(median "$n" 1)")" ">=" 1.2
    goal_row "cpu/req, $conns conns" "$(ratio "$(median "$r" 4)" "$(median "$n" 4)")" "<=" 1.0
    goal_row "p50, $conns conns" "$(ratio "$(median "$r" 2)" "$(median "$n" 2)")" "<=" 1.0
    goal_row "p99, $conns conns" "$(ratio "$(median "$r" 3)" "$(median "$n" 3)")" "<=" 1.0
done
for conns in $TLS_CONNS; do
    n=$work/results.nginx_tls.$conns
    r=$work/results.agent_tls.$conns
    goal_row "HTTPS upstream req/s, $conns conns" "$(ratio "$(median "$r" 1)" "$(median "$n" 1)")" ">=" 1.2
    goal_row "HTTPS upstream cpu/req, $conns conns" "$(ratio "$(median "$r" 4)" "$(median "$n" 4)")" "<=" 1.0
done
goal_row "idle RSS (kB, absolute)" "$agent_idle_rss" "<=" 8192
goal_row "idle PSS" "$(ratio "$agent_idle_pss" "$nginx_idle_pss")" "<=" 1.0
