#!/usr/bin/env bash
# CPU instructions the agent spends per proxied request (valgrind/callgrind, so the count does
# not depend on what else runs on the machine): one-rule table vs the 200-rule table of
# bench/l7_routes.sh, for the catch-all (worst case) and an exact-path request.
#
# Then the per-request cost of the L7 features added for the gateway controller, each on a
# one-rule table: the client's Host sent upstream ([[route]], the Host rule), three listener
# scopes, and a CORS filter answering a request with an allowed Origin.
#
#   bench/l7_instructions.sh [requests]
#   BIN=path/to/tunnel-agent ONLY=1 bench/l7_instructions.sh   # another build; the one-rule case only
#   KEEP_CG=DIR bench/l7_instructions.sh   # keep the callgrind files in DIR (callgrind_annotate)
#   NGINX=1 bench/l7_instructions.sh   # also nginx doing the one-rule job (one process, no master)
#   python3 bench/callgrind_by_crate.py DIR/cg.one.PID.1 N   # a kept profile, by crate
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
BIN=${BIN:-target/release/tunnel-agent}
. bench/lib.sh
bench_setup l7-ir
UP=127.0.0.1:18290
start_backend "$UP"

config() { # $1 = name, $2 = port; routes on stdin
  printf '[agent]\nruntime_dir = "%s/run"\nstate_dir = "%s/state"\nlog_format = "text"\nlog_level = "warn"\n[proxy]\nlisten = "127.0.0.1:%s"\n[health]\nlisten = "127.0.0.1:%s"\n' \
    "$WORK/$1" "$WORK/$1" "$2" "$(($2 + 1))"
  cat
}
printf '[routes.hosts]\n"bench.example.com" = "http://%s"\n' "$UP" | config one 18291 > "$WORK/one.toml"
many_rules "$UP" | config many 18293 > "$WORK/many.toml"

route_one() { # extra TOML lines for the one [[route]]
  printf '[[route]]\nhostnames = ["bench.example.com"]\nupstream = "http://%s"\n%s\n' "$UP" "$1"
}
route_one '' | config client-host 18295 > "$WORK/client-host.toml"
{ printf '[[listener]]\nname = "exact"\nhostname = "other.example.com"\n[[listener]]\nname = "wild"\nhostname = "*.example.com"\n[[listener]]\nname = "any"\n'
  route_one 'listeners = ["wild"]'; } | config listeners 18297 > "$WORK/listeners.toml"
route_one 'filters = [{ type = "CORS", cors = { allow_origins = ["https://*.example.org"], allow_methods = ["GET"], expose_headers = ["x-total"] } }]' \
  | config cors 18299 > "$WORK/cors.toml"

# Sends $3 keep-alive requests for $2 to port $1 (with an Origin when ORIGIN is set).
load() {
  python3 - "$1" "$2" "$3" "${ORIGIN:-}" <<'PY'
import http.client, sys
port, path, n, origin = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Host": "bench.example.com"}
if origin:
    headers["Origin"] = origin
for _ in range(n):
    c.request("GET", path, headers=headers)
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}

# Instructions per request for $3 on agent config $1 (port $2).
per_request() {
  local cmd=${CMD:-$BIN run -c $WORK/$1.toml}
  # shellcheck disable=SC2086  # the command line is split on purpose
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$1.%p" $cmd 2>/dev/null & local pid=$!
  for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$2/healthz" && break; sleep 0.2; done
  load "$2" "$3" 200
  callgrind_control -z "$pid" >/dev/null 2>&1
  load "$2" "$3" "$N"
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  kill "$pid"; wait "$pid" 2>/dev/null || true
  # The dump after zeroing holds only the measured requests (plus the 1 s health self-probes).
  local ir
  ir=$(grep -h '^summary:' "$WORK"/cg."$1".*.[0-9] 2>/dev/null | tail -1 | awk '{print $2}')
  if [[ -n ${KEEP_CG:-} ]]; then mkdir -p "$KEEP_CG" && cp "$WORK"/cg."$1".*.[0-9] "$KEEP_CG"/; fi
  rm -f "$WORK"/cg."$1".*
  echo $((ir / N))
}
# nginx doing the one-rule job: the Host map, the same headers set and removed on the way to
# the backend, a keepalive pool. One process (no master), so callgrind sees all of it.
nginx_job() {
  mkdir -p "$WORK/nginx-job"
  cat > "$WORK/nginx-job/nginx.conf" <<NGINX
$([[ $(id -u) == 0 ]] && echo "user root;")
master_process off;
daemon off;
worker_processes 1;
pid $WORK/nginx-job/nginx.pid;
error_log $WORK/nginx-job/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx-job; proxy_temp_path $WORK/nginx-job; fastcgi_temp_path $WORK/nginx-job; uwsgi_temp_path $WORK/nginx-job; scgi_temp_path $WORK/nginx-job;
  keepalive_requests 10000000;
  map \$http_host \$route_upstream { hostnames; default ""; bench.example.com backend; }
  upstream backend { server $UP; keepalive 64; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:18301;
    location = /healthz { return 200; }
    location / {
      if (\$route_upstream = "") { return 404; }
      proxy_pass http://\$route_upstream;
      proxy_http_version 1.1;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto http;
      proxy_set_header Connection "";
      proxy_set_header Keep-Alive "";
      proxy_set_header Proxy-Connection "";
      proxy_set_header TE "";
      proxy_set_header Upgrade "";
      proxy_set_header Proxy-Authorization "";
    }
  }
}
NGINX
  echo "nginx -p $WORK/nginx-job -c $WORK/nginx-job/nginx.conf"
}

echo "instructions per request ($N requests each):"
echo "  one rule:                      $(per_request one 18291 /some/other/path)"
if [[ -n ${NGINX:-} ]]; then
  echo "  nginx, the same job:           $(CMD=$(nginx_job) per_request nginx-job 18301 /some/other/path)"
fi
[[ -n ${ONLY:-} ]] && exit 0
echo "  200 rules, catch-all (worst):  $(per_request many 18293 /some/other/path)"
echo "  200 rules, exact hit:          $(per_request many 18293 /exact/25)"
echo "  one [[route]], client's Host:  $(per_request client-host 18295 /some/other/path)"
echo "  + three listener scopes:       $(per_request listeners 18297 /some/other/path)"
echo "  + CORS, allowed Origin:        $(ORIGIN=https://shop.example.org per_request cors 18299 /some/other/path)"
