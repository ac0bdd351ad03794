# Shared by the bench scripts: a scratch directory, children stopped on exit, and a loopback
# nginx backend answering a tiny body. Source it after `set -euo pipefail`; it sets WORK and PIDS.

# bench_setup PREFIX: a scratch directory /tmp/PREFIX.XXXXXX, removed (with every child in PIDS
# stopped) when the script exits.
bench_setup() {
    WORK=$(mktemp -d "/tmp/$1.XXXXXX")
    PIDS=()
    trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
}

# start_backend ADDR: nginx (one worker, no access log) answering 200 "ok" on ADDR.
start_backend() {
    cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK; proxy_temp_path $WORK; fastcgi_temp_path $WORK; uwsgi_temp_path $WORK; scgi_temp_path $WORK;
  server { listen $1; keepalive_requests 1000000; location / { return 200 "ok\n"; } }
}
NGINX
    nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
    PIDS+=($!)
}

# many_rules UPSTREAM: the 200-rule table of the L7 benchmarks, all on bench.example.com: 50
# Exact, 50 RegularExpression, 50 PathPrefix, 49 PathPrefix + header, and the catch-all the
# benchmark request falls through to.
many_rules() {
    python3 - "$1" <<'PY'
import sys
up = sys.argv[1]
def route(match):
    print(f'[[route]]\nhostnames = ["bench.example.com"]\nupstream = "http://{up}"\nmatches = [{match}]\n')
for i in range(50):
    route(f'{{ path = {{ type = "Exact", value = "/exact/{i}" }} }}')
    route(f'{{ path = {{ type = "RegularExpression", value = "/re/{i}/[0-9]+/item" }} }}')
    route(f'{{ path = {{ type = "PathPrefix", value = "/prefix/{i}" }} }}')
for i in range(49):
    route(f'{{ path = {{ type = "PathPrefix", value = "/h" }}, headers = [{{ name = "x-tenant", value = "t{i}" }}] }}')
route('{ path = { type = "PathPrefix", value = "/" } }')
PY
}
