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
