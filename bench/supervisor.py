#!/usr/bin/env python3
"""Measures the supervisor's numbers with local fakes (no cloud, tests/fakes/cloudflared):

- boot -> READY=1 on a NOTIFY_SOCKET (exec of the agent to the datagram), median of N runs;
- cloudflared exit (SIGKILL) -> new cloudflared process spawned, median of N kills;
- promote (control socket) -> cloudflared spawned, as the agent reports it;
- /ready throughput with wrk (cached verdict; must not touch cloudflared);
- the agent's RSS (VmRSS) idle with cloudflared supervised, and after the /ready load.

Usage: bench/supervisor.py [path/to/tunnel-agent]   (default target/release/tunnel-agent)
It is a measurement script, not a test: it prints numbers and asserts nothing.
"""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target/release/tunnel-agent"))
FAKE = os.path.join(ROOT, "tests/fakes/cloudflared")
RUNS = 5


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def write_config(d, health, metrics, role="active"):
    path = os.path.join(d, "agent.toml")
    with open(path, "w") as f:
        f.write(f"""role = "{role}"
[agent]
runtime_dir = "{d}/run"
state_dir = "{d}/state"
log_format = "text"
log_level = "warn"
[secrets.tunnel_token]
source = "env"
var = "BENCH_TUNNEL_TOKEN"
[proxy]
listen = "127.0.0.1:0"
[health]
listen = "127.0.0.1:{health}"
[routes.hosts]
"app.example.com" = "http://127.0.0.1:9"
[cloudflared]
enabled = true
path = "{FAKE}"
token_secret = "tunnel_token"
metrics = "127.0.0.1:{metrics}"
poll_interval = "100ms"
restart_backoff = "200ms"
""")
    return path


def get(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def status(health):
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{health}/status", timeout=2).read())
    except Exception:
        return {}


def start(d, health, notify_path=None):
    env = {"PATH": os.environ.get("PATH", ""), "BENCH_TUNNEL_TOKEN": "bench-token", "FAKE_CF_DIR": d}
    if notify_path:
        env["NOTIFY_SOCKET"] = notify_path
    return subprocess.Popen([AGENT, "run", "-c", os.path.join(d, "agent.toml")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(p):
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def boot_to_ready():
    times = []
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as d:
            health, metrics = free_port(), free_port()
            write_config(d, health, metrics)
            sock_path = os.path.join(d, "notify.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(sock_path)
            sock.settimeout(10)
            t0 = time.monotonic()
            p = start(d, health, sock_path)
            while True:
                msg = sock.recv(4096).decode()
                if "READY=1" in msg.splitlines():
                    times.append((time.monotonic() - t0) * 1000)
                    break
            stop(p)
            sock.close()
    return times


def main():
    print(f"agent: {AGENT}")
    print(f"load: {open('/proc/loadavg').read().strip()}")
    b = boot_to_ready()
    print(f"boot -> READY=1 (exec to datagram, ms): median {statistics.median(b):.1f}, all {[round(x, 1) for x in b]}")

    with tempfile.TemporaryDirectory() as d:
        health, metrics = free_port(), free_port()
        write_config(d, health, metrics)
        p = start(d, health)
        deadline = time.monotonic() + 20
        while status(health).get("cloudflared", {}).get("connections", 0) == 0:
            assert time.monotonic() < deadline, "tunnel never connected"
            time.sleep(0.05)

        restarts = []
        for _ in range(RUNS):
            old = status(health)["cloudflared"]["pid"]
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            while True:
                pid = status(health).get("cloudflared", {}).get("pid")
                if pid and pid != old:
                    restarts.append((time.monotonic() - t0) * 1000)
                    break
                time.sleep(0.002)
            while status(health).get("cloudflared", {}).get("connections", 0) == 0:
                time.sleep(0.05)
        print(f"cloudflared SIGKILL -> new process spawned (ms, restart_backoff 200ms with jitter): "
              f"median {statistics.median(restarts):.1f}, all {[round(x, 1) for x in restarts]}")

        time.sleep(1)
        idle = rss_kib(p.pid)
        wrk = subprocess.run(["wrk", "-t1", "-c16", "-d5s", f"http://127.0.0.1:{health}/ready"],
                             capture_output=True, text=True)
        rps = [l for l in wrk.stdout.splitlines() if "Requests/sec" in l]
        after = rss_kib(p.pid)
        print(f"/ready throughput (wrk -t1 -c16 -d5s): {rps[0].split()[-1] if rps else wrk.stdout}")
        print(f"agent VmRSS with cloudflared supervised: idle {idle} KiB, after /ready load {after} KiB")

        # Promotion: demote, then time promote (the agent reports command -> spawned).
        ctl = [AGENT, "demote", "-c", os.path.join(d, "agent.toml")]
        subprocess.run(ctl, capture_output=True, check=True)
        t0 = time.monotonic()
        out = subprocess.run([AGENT, "promote", "-c", os.path.join(d, "agent.toml")], capture_output=True, text=True)
        wall = (time.monotonic() - t0) * 1000
        print(f"promote: {out.stdout.splitlines()[0] if out.stdout else out.stderr.strip()} "
              f"(CLI wall time incl. process start {wall:.1f} ms)")
        stop(p)


if __name__ == "__main__":
    main()
