#!/usr/bin/env bash
# Upgrade-in-place benchmark: how long new connections wait while the proxy re-executes into a
# new binary, tunnel-agent (`tunnel-agent upgrade`: drain, exec on the same PID, adopt the
# sockets) against nginx's own binary upgrade (USR2: a new master beside the old one, WINCH,
# QUIT), both in front of the same loopback backend, in the same run.
#
#   bench/upgrade.sh                 # 5 upgrades of each, 4 client loops
#   ROUNDS=10 LOOPS=8 bench/upgrade.sh
#   SKIP_BUILD=1 bench/upgrade.sh    # use target/release/tunnel-agent as it is
#
# A client loop opens a new connection per request (connect, GET, first byte of the answer) and
# records when each started and how long it took. For each upgrade the window is from the
# trigger to the moment the upgrade reported done (nginx: the new master's workers answered and
# the old master exited); the report gives p50/p99/max of connect + first byte for requests that
# started inside the windows, the same outside them, and failed requests (refused, reset, not 200).
# It also reports the agent's resident memory before and after, and the size of the carried state.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_setup tunnel-agent-upgrade-bench
ROUNDS=${ROUNDS:-5}
LOOPS=${LOOPS:-4}

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    cargo build --release --quiet
fi
release=${CARGO_TARGET_DIR:-target}/release/tunnel-agent
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend=127.0.0.1:$(free_port)
agent_port=$(free_port)
health_port=$(free_port)
nginx_port=$(free_port)
start_backend "$backend"

# tunnel-agent, from a copy of the binary that each round replaces as dpkg would.
mkdir -p "$WORK/bin" "$WORK/run" "$WORK/state"
install_agent() { cp "$release" "$WORK/bin/.new" && mv "$WORK/bin/.new" "$WORK/bin/tunnel-agent"; }
install_agent
cat > "$WORK/agent.toml" <<TOML
[agent]
runtime_dir = "$WORK/run"
state_dir = "$WORK/state"
log_format = "text"
upgrade_drain = "5s"
[health]
listen = "127.0.0.1:$health_port"
[proxy]
listen = "127.0.0.1:$agent_port"
[cloudflared]
enabled = false
[routes.hosts]
"bench.example.com" = "http://$backend"
TOML
"$WORK/bin/tunnel-agent" run -c "$WORK/agent.toml" 2> "$WORK/agent.log" &
agent_pid=$!
PIDS+=($agent_pid)

# nginx in front, with a master process (the binary upgrade needs one).
mkdir -p "$WORK/front"
cat > "$WORK/front.conf" <<NGINX
worker_processes 1;
pid $WORK/front/nginx.pid;
error_log $WORK/front/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/front; proxy_temp_path $WORK/front; fastcgi_temp_path $WORK/front; uwsgi_temp_path $WORK/front; scgi_temp_path $WORK/front;
  upstream backend { server $backend; keepalive 32; }
  server { listen 127.0.0.1:$nginx_port; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } }
}
NGINX
# By its absolute path: the binary upgrade re-executes argv[0].
"$(command -v nginx)" -c "$WORK/front.conf"

for _ in $(seq 100); do
    curl -fs -o /dev/null "http://127.0.0.1:$health_port/ready" && curl -fs -o /dev/null "http://127.0.0.1:$nginx_port/" && break
    sleep 0.1
done

python3 - "$WORK" "$agent_port" "$nginx_port" "$agent_pid" "$ROUNDS" "$LOOPS" "$release" <<'PY'
import json, os, signal, socket, statistics, subprocess, sys, threading, time
held = []

work, agent_port, nginx_port, agent_pid, rounds, loops, release = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
REQ = b"GET / HTTP/1.1\r\nHost: bench.example.com\r\nConnection: close\r\n\r\n"

def one(port):
    t0 = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(REQ)
        data = s.recv(64)
        s.close()
        ok = data.startswith(b"HTTP/1.1 200")
        return t0, time.monotonic() - t0, ok
    except OSError:
        return t0, time.monotonic() - t0, False

def load(port, stop, out):
    while not stop.is_set():
        out.append(one(port))

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

def agent_upgrade():
    subprocess.run(["cp", release, f"{work}/bin/.new"], check=True)
    os.replace(f"{work}/bin/.new", f"{work}/bin/tunnel-agent")
    r = subprocess.run([f"{work}/bin/tunnel-agent", "upgrade", "--json", "-c", f"{work}/agent.toml"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"upgrade failed: {r.stdout}{r.stderr}")
    held.append(json.loads(r.stdout)["status"]["agent"]["last_upgrade"]["held_ms"])

def nginx_master():
    # Between the old master's rename to nginx.pid.oldbin and the new one's write: none.
    try:
        return int(open(f"{work}/front/nginx.pid").read())
    except (FileNotFoundError, ValueError):
        return None

def nginx_upgrade():
    old = nginx_master()
    os.kill(old, signal.SIGUSR2)
    # The new master writes nginx.pid and renames the old one's to nginx.pid.oldbin.
    deadline = time.monotonic() + 10
    while not os.path.exists(f"{work}/front/nginx.pid.oldbin") or nginx_master() in (None, old):
        if time.monotonic() > deadline:
            sys.exit("nginx did not start a new master after USR2 (see front/error.log)")
        time.sleep(0.005)
    time.sleep(0.2)  # the new master's workers start accepting
    os.kill(old, signal.SIGWINCH)
    os.kill(old, signal.SIGQUIT)
    while os.path.exists(f"/proc/{old}"):
        time.sleep(0.005)

def run(name, port, upgrade):
    out, windows = [], []
    stop = threading.Event()
    threads = [threading.Thread(target=load, args=(port, stop, out)) for _ in range(loops)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    for _ in range(rounds):
        start = time.monotonic()
        upgrade()
        windows.append((start, time.monotonic()))
        time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    inside = [d for (t0, d, ok) in out if any(a <= t0 <= b for a, b in windows)]
    outside = [d for (t0, d, ok) in out if not any(a <= t0 <= b for a, b in windows)]
    failed = sum(1 for (_, _, ok) in out if not ok)
    def q(v, p):
        v = sorted(v)
        return v[min(len(v) - 1, int(round((len(v) - 1) * p)))] * 1000 if v else float("nan")
    took = [b - a for a, b in windows]
    print(f"{name:6} upgrades {rounds}, each {statistics.median(took)*1000:.0f} ms (median), requests {len(out)}, failed {failed}")
    print(f"{name:6}   during the upgrade: n={len(inside)} p50 {q(inside,.5):.1f} ms p99 {q(inside,.99):.1f} ms max {q(inside,1):.1f} ms")
    print(f"{name:6}   otherwise:          n={len(outside)} p50 {q(outside,.5):.1f} ms p99 {q(outside,.99):.1f} ms max {q(outside,1):.1f} ms")

before = rss_kb(agent_pid)
run("agent", agent_port, agent_upgrade)
after = rss_kb(agent_pid)
print(f"agent  new connections held (the agent's own held_ms: last accept of the old image to ready of the new): {sorted(held)} ms")
print(f"agent  resident memory: {before} kB before, {after} kB after {rounds} upgrades (same pid {agent_pid})")
run("nginx", nginx_port, nginx_upgrade)
PY
grep -o 'executing .* in place ([0-9]* bytes of state, [0-9]* descriptors)' "$WORK/agent.log" | tail -1
nginx -c "$WORK/front.conf" -s quit 2>/dev/null || true
