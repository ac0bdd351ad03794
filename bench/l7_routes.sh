#!/usr/bin/env bash
# L7 routing cost: proxy req/s with a 200-rule table vs the one-rule table, and the time to
# apply a 1,000-rule PUT /config. Loopback only; bounded in time. Needs wrk, nginx, curl,
# python3 and a release build (cargo build --release).
#
#   bench/l7_routes.sh [seconds-per-run]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-8}
BIN=target/release/tunnel-agent
. bench/lib.sh
bench_setup l7-bench
UP=127.0.0.1:18190
start_backend "$UP"

base() { # $1 = name, $2 = proxy port, $3 = health port
  cat <<TOML
[agent]
runtime_dir = "$WORK/$1/run"
state_dir = "$WORK/$1/state"
log_format = "text"
log_level = "warn"
[proxy]
listen = "127.0.0.1:$2"
[health]
listen = "127.0.0.1:$3"
TOML
}

# One rule: the seed's host map.
{ base one 18191 18192; printf '[routes.hosts]\n"bench.example.com" = "http://%s"\n' "$UP"; } > "$WORK/one.toml"

# 200 rules on the same hostname (many_rules in bench/lib.sh).
{ base many 18193 18194; many_rules "$UP"; } > "$WORK/many.toml"

# Config API agent for the PUT timing.
{ base api 18195 18196; cat <<TOML
[secrets.token]
source = "env"
var = "BENCH_TOKEN"
[routes]
source = "config-api"
[config_api]
listen = "127.0.0.1:18197"
auth_secret = "token"
TOML
} > "$WORK/api.toml"

for n in one many api; do
  BENCH_TOKEN=bench-token "$BIN" run -c "$WORK/$n.toml" 2>"$WORK/$n.log" & PIDS+=($!)
done
for port in 18190 18191 18193 18197; do
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done
curl -sf -H 'Host: bench.example.com' http://127.0.0.1:18193/some/other/path >/dev/null
curl -sf -H 'Host: bench.example.com' http://127.0.0.1:18191/some/other/path >/dev/null

# Throughput is noisy on a shared 2-core machine, so besides req/s this reports the agent's own
# CPU time per request (utime+stime from /proc over the run), which other load barely moves.
declare -A AGENT_PID
AGENT_PID[18191]=${PIDS[1]}
AGENT_PID[18193]=${PIDS[2]}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
measure() { # $1 = port, $2 = path -> "req/s cpu-us/req"
  local pid=${AGENT_PID[$1]} before after out reqs rps
  before=$(cpu_ticks "$pid")
  out=$(wrk -t1 -c16 -d"${SECS}s" -H 'Host: bench.example.com' "http://127.0.0.1:$1$2")
  after=$(cpu_ticks "$pid")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  awk -v r="$rps" -v t=$((after - before)) -v n="$reqs" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%9.0f req/s %6.1f us/req", r, t * 1e6 / hz / n }'
}
echo "run | one-rule              | 200 rules, catch-all (worst) | 200 rules, exact hit"
for run in $(seq "${ROUNDS:-5}"); do
  echo "$run   | $(measure 18191 /some/other/path) | $(measure 18193 /some/other/path) | $(measure 18193 /exact/25)"
done

# 1,000-rule PUT: 250 each of Exact, PathPrefix, RegularExpression and header matches over 10
# hostnames, each with a response header filter and two weighted backends.
python3 - "$UP" > "$WORK/put.json" <<'PY'
import json, sys
up = sys.argv[1]
rules = []
for i in range(1000):
    kind = i % 4
    path = [{"type": "Exact", "value": f"/e/{i}"}, {"type": "PathPrefix", "value": f"/p/{i}"},
            {"type": "RegularExpression", "value": f"/r/{i}/[a-z]+/[0-9]{{1,6}}"}, {"type": "PathPrefix", "value": "/h"}][kind]
    match = {"path": path}
    if kind == 3:
        match["headers"] = [{"type": "Exact", "name": "x-tenant", "value": f"t{i}"}]
    rules.append({"hostnames": [f"h{i % 10}.example.com"], "matches": [match],
                  "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-rule", "value": str(i)}]}}],
                  "backends": [{"url": f"http://{up}", "weight": 80}, {"url": f"http://{up}", "weight": 20}]})
print(json.dumps({"version": 1, "rules": rules}))
PY
echo "1000-rule PUT /config ($(wc -c < "$WORK/put.json") bytes), seconds (curl time_total):"
for v in 1 2 3 4 5; do
  sed "s/\"version\": 1,/\"version\": $v,/" "$WORK/put.json" > "$WORK/put-$v.json"
  curl -s -o /dev/null -w '%{http_code} %{time_total}\n' -X PUT -H 'Authorization: Bearer bench-token' \
    -H 'Content-Type: application/json' --data-binary "@$WORK/put-$v.json" http://127.0.0.1:18197/config
done
