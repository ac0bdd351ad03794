#!/usr/bin/env python3
"""Work a route table costs to compile: wall time and peak RSS of `tunnel-agent check` on the
pathological tables of issue 18 (and the largest table the limits allow).

    bench/route_compile.py [BIN]        # BIN defaults to target/debug/tunnel-agent

Prints wall time, user CPU time (less disturbed by a busy machine) and peak RSS. Each case is a
config file (and, for pushes, the push as the persisted `config-api.json` that
`check` compiles like a push). Every run is capped at 20 s and 3 GiB of address space, so a
table that is not bounded shows as "killed" instead of taking the machine down.
"""
import json
import os
import subprocess
import sys
import tempfile

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/debug/tunnel-agent"
TIMEOUT_S = 20
MAX_AS = 3 << 30


def base(work):
    return f'[agent]\nruntime_dir = "{work}/run"\nstate_dir = "{work}/state"\n'


def listeners_toml(work, n):
    """n listeners and n rules without listeners (each rule on every listener)."""
    out = [base(work)]
    for i in range(n):
        out.append(f'[[listener]]\nname = "l{i}"\nhostname = "h{i}.example.com"\n')
    for i in range(n):
        out.append(f'[[route]]\nhostnames = ["r{i}.example.com"]\nupstream = "http://127.0.0.1:1"\n')
    return "".join(out)


def regex_push(rules, hostnames, regexes):
    """`rules` rules sharing `hostnames` hostnames, each with `regexes` regex path matches."""
    hosts = [f"host{h}.tenant.example.com" for h in range(hostnames)]
    return {
        "version": 1,
        "rules": [
            {
                "name": f"r{r}",
                "hostnames": hosts,
                "matches": [
                    {"path": {"type": "RegularExpression", "value": f"/svc{r}/api{j}/[a-z0-9-]+/(item|list)"}}
                    for j in range(regexes)
                ],
                "backends": [{"url": "http://127.0.0.1:1"}],
            }
            for r in range(rules)
        ],
    }


def push_config(work, push):
    os.makedirs(f"{work}/state", exist_ok=True)
    with open(f"{work}/state/config-api.json", "w") as f:
        json.dump(push, f)
    return base(work) + (
        '[secrets.token]\nsource = "env"\nvar = "BENCH_TOKEN"\n'
        '[routes]\nsource = "config-api"\n'
        '[config_api]\nauth_secret = "token"\n'
    )


def run(name, make):
    with tempfile.TemporaryDirectory(prefix="route-compile.") as work:
        text = make(work)
        path = f"{work}/agent.toml"
        with open(path, "w") as f:
            f.write(text)
        size = os.path.getsize(path)
        push = os.path.exists(f"{work}/state/config-api.json")
        if push:
            size = os.path.getsize(f"{work}/state/config-api.json")
        cmd = ["prlimit", f"--as={MAX_AS}", "/usr/bin/time", "-f", "%e %U %M", BIN, "check", "-c", path]
        env = dict(os.environ, BENCH_TOKEN="bench-token")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        except subprocess.TimeoutExpired:
            print(f"{name:<52} {size / 1024:>5.0f} KiB killed after {TIMEOUT_S} s")
            return
        lines = p.stderr.strip().splitlines()
        secs, cpu, kib = lines[-1].split() if lines else ("?", "?", "0")
        said = (p.stdout + "\n".join(lines[:-1])).strip().replace("\n", " ")
        verdict = "ok" if p.returncode == 0 else f"exit {p.returncode}"
        if push and "(0 routes)" in p.stdout:
            # `check` reports a persisted push it cannot load as no routes (the agent logs why
            # and waits for the next push).
            verdict = "refused"
        if p.returncode < 0 or p.returncode > 128:
            verdict = f"killed ({p.returncode})"
        print(f"{name:<52} {size / 1024:>5.0f} KiB {secs:>6} s {cpu:>6} s {int(kib) / 1024:>7.1f} MiB  {verdict}: {said[:110]}")


def listeners_64(work):
    out = [base(work)]
    for i in range(64):
        out.append(f'[[listener]]\nname = "l{i}"\nhostname = "h{i}.example.com"\n')
    for i in range(2000):
        out.append(f'[[route]]\nhostnames = ["r{i}.example.com"]\nupstream = "http://127.0.0.1:1"\n')
    return "".join(out)


CASES = [
    ("2,000 listeners x 2,000 rules (TOML)", lambda w: listeners_toml(w, 2000)),
    ("64 listeners x 2,000 rules (TOML)", listeners_64),
    ("push: 5 rules x 40 hostnames x 60 regexes", lambda w: push_config(w, regex_push(5, 40, 60))),
    ("push: 5 rules x 16 hostnames x 60 regexes", lambda w: push_config(w, regex_push(5, 16, 60))),
    ("push: 16 rules x 16 hostnames x 64 regexes", lambda w: push_config(w, regex_push(16, 16, 64))),
    ("push: 16 rules x 64 hostnames x 64 regexes (largest allowed)", lambda w: push_config(w, regex_push(16, 64, 64))),
    ("push: 1 MiB, 40 rules x 40 hostnames x 265 regexes", lambda w: push_config(w, regex_push(40, 40, 265))),
]


if __name__ == "__main__":
    print(f"{BIN} (load average {os.getloadavg()[0]:.1f})")
    print(f"{'case':<52} {'size':>9} {'wall':>8} {'user':>8} {'peak RSS':>11}  verdict")
    for name, make in CASES:
        run(name, make)
