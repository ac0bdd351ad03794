#!/usr/bin/env bash
# The OCI image test: builds the image (packaging/image/build.sh, a release build), adds a test
# layer on top of it (Debian's python3, and at /usr/local/bin/cloudflared, where users put the
# real one, tests/image/orphaning-cloudflared in front of tests/fakes/cloudflared), runs it with
# podman as the image says (its user and entry point; `run`, as a pod with a file passes it) on
# a read-only root with a config file mounted at the default path, and checks:
#   - PID 1 is tunnel-agent, its one child the agent, cloudflared the agent's child; all run as
#     uid 65532, on a root mounted read-only;
#   - `/ready` answers 200 once a table is pushed to the config API and the tunnel is up, and
#     `/status` reports that table and cloudflared, with no secret value in it;
#   - a request through the proxy reaches an upstream this script runs on the host;
#   - the orphan cloudflared leaves behind does not stay a zombie (PID 1 reaps it);
#   - `podman stop` (SIGTERM) drains: cloudflared gets its SIGTERM, the container exits 0 within
#     the agent's shutdown grace;
#   - no secret value in the log or in any process's argv;
#   - every line the container wrote went to stdout, none to stderr (the image's
#     TUNNEL_AGENT_LOG_STREAM=stdout), read from podman's k8s-file log, which tags each line with
#     its stream;
#   - then as the gateway controller's chart runs its proxy pods, unchanged: no args (the image's
#     default command, `run --from-env`), uid 65534, no capabilities, a read-only root and no
#     volume, its variables only: the directories move beneath /dev/shm (said in the log),
#     `/readyz` is 503 "no config loaded" until a push and 200 after it with the tunnel up,
#     `podman stop` exits 0, every line on stdout and a JSON object (the image's
#     TUNNEL_AGENT_LOG_FORMAT=json, as the controller's proxy logs), no secret in the log.
# The container shares the host's network namespace (--network host) and every listener is on
# 127.0.0.1: nothing leaves loopback. Readiness is polled with deadlines, never slept for.
#
# Skips, saying why, when podman, buildah, python3 or curl are missing, when not root (the checks
# read the container's processes in the host's /proc), or when buildah cannot make a container or
# podman cannot start one here (every error podman gave is printed). TUNNEL_AGENT_SKIP_IMAGE_TEST=1 skips it explicitly. Called from tests/run-all.sh.
# IMAGE_NAME (build.sh's) names the image; the test image is that name with -image-test, so two
# checkouts can run the test side by side.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
say() { echo "[image-test] $*"; }
skip() {
  say "SKIPPED: $*"
  exit 0
}
fail() {
  say "FAIL: $*"
  [ -z "${ctr:-}" ] || podman logs "$ctr" 2>&1 | tail -n 40 | sed 's/^/  log: /'
  exit 1
}

[ "${TUNNEL_AGENT_SKIP_IMAGE_TEST:-}" = 1 ] && skip "TUNNEL_AGENT_SKIP_IMAGE_TEST=1"
for tool in podman buildah python3 curl; do
  command -v "$tool" >/dev/null || skip "$tool not found (apt-get install podman buildah python3 curl)"
done
[ -x /usr/bin/python3 ] || skip "/usr/bin/python3 not found: the test layer copies Debian's python3 (apt-get install python3)"
[ "$(id -u)" = 0 ] || skip "not root (the checks read the container's processes in /proc)"

started=$(date +%s)
target=${CARGO_TARGET_DIR:-$repo/target}
work=$target/image-test
rm -rf "$work"
mkdir -p "$work"

test_image=${IMAGE_NAME:-localhost/tunnel-agent}-image-test:latest
upstream_pid=
ctr=
cleanup() {
  [ -z "$upstream_pid" ] || kill "$upstream_pid" 2>/dev/null || true
  [ -z "$ctr" ] || podman rm -f -v -t 0 "$ctr" >/dev/null 2>&1 || true
  podman rmi "$test_image" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# --- the image, and the test layer on top of it ---------------------------------------------
# buildah's storage may not work here (e.g. overlay on overlay inside a container): say so.
if ! probe=$(buildah from scratch 2>&1); then
  skip "buildah cannot make a container on this machine: $(echo "$probe" | tail -n1)"
fi
buildah rm "$probe" >/dev/null
build_out=$(packaging/image/build.sh)
echo "$build_out" | sed 's/^/  /'
image=$(echo "$build_out" | awk '$1 == "image" { print $2 }')

layer=$work/layer
# Debian's python3 (its standard library is under /usr/lib), whatever python3 PATH finds first.
python=$(readlink -f /usr/bin/python3)
pyver=$(/usr/bin/python3 -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
mkdir -p "$layer/usr/bin" "$layer/usr/local/bin" "$layer/usr/lib"
cp -L "$python" "$layer/usr/bin/python3"
# The standard library without what the fake does not import (tests, IDLE, site packages).
cp -a "/usr/lib/$pyver" "$layer/usr/lib/"
rm -rf "$layer/usr/lib/$pyver"/{test,idlelib,tkinter,ensurepip,lib2to3,site-packages,dist-packages,config-*}
ldd "$python" "/usr/lib/$pyver"/lib-dynload/*.so 2>/dev/null |
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u |
  while read -r lib; do
    mkdir -p "$layer$(dirname "$lib")"
    cp -L "$lib" "$layer$lib"
  done
# orphaning-cloudflared becomes the fake-cloudflared beside it.
install -m 0755 tests/image/orphaning-cloudflared "$layer/usr/local/bin/cloudflared"
install -m 0755 tests/fakes/cloudflared "$layer/usr/local/bin/fake-cloudflared"
tctr=$(buildah from "$image")
buildah copy --quiet "$tctr" "$layer" / >/dev/null
buildah commit --quiet --rm "$tctr" "$test_image" >/dev/null

# --- can podman run a container here? -------------------------------------------------------
# Podman's defaults fail on some hosts, and each failure has one remedy: crun (Debian's default
# runtime) refuses a cgroup v1+v2 "hybrid" host whose v2 hierarchy has a controller ("cgroups in
# hybrid mode not supported"), where runc works; and run as root podman raises RLIMIT_NOFILE and
# RLIMIT_NPROC, which a host may forbid even to root ("setrlimit ... Operation not permitted";
# the limits podman's own processes run with may be lower than this shell's), where limits this
# test needs (4096) do. Tried in this order; the one used is printed.
limits="--ulimit nofile=4096:4096 --ulimit nproc=4096:4096"
candidates=("" "$limits")
if command -v runc >/dev/null; then
  candidates+=("--runtime runc" "--runtime runc $limits")
fi
run_opts=
found=
tried=()
for opts in "${candidates[@]}"; do
  # shellcheck disable=SC2086 # opts is a list of options
  if err=$(podman run --rm $opts --network none "$test_image" --version 2>&1); then
    run_opts=$opts found=1
    break
  fi
  tried+=("${opts:-(defaults)}: $(echo "$err" | tail -n1)")
  say "podman run ${opts:-(defaults)}: $(echo "$err" | tail -n1)"
done
if [ -z "$found" ]; then
  command -v runc >/dev/null || tried+=("runc: not installed (apt-get install runc), not tried")
  skip "podman cannot run a container on this machine: $(printf '%s; ' "${tried[@]}")"
fi
say "podman runs containers with: ${run_opts:-its defaults}"

# --- the upstream, the config ---------------------------------------------------------------
read -r proxy_port health_port api_port cf_port upstream_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
mkdir -p "$work/www"
echo "hello from the host's upstream" >"$work/www/hello.txt"
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$upstream_port" >"$work/upstream.log" 2>&1 &
upstream_pid=$!

api_token=image-test-config-token-$RANDOM$RANDOM
grace=5
cat >"$work/agent.toml" <<TOML
[agent]
log_format = "json"
shutdown_grace = "${grace}s"

[secrets.tunnel_token]
source = "env"
var = "TUNNEL_TOKEN"

[secrets.config_token]
source = "env"
var = "CONFIG_API_TOKEN"

[proxy]
listen = "127.0.0.1:$proxy_port"

[health]
listen = "127.0.0.1:$health_port"

[routes]
source = "config-api"

[config_api]
listen = "127.0.0.1:$api_port"
auth_secret = "config_token"

[cloudflared]
enabled = true
token_secret = "tunnel_token"
metrics = "127.0.0.1:$cf_port"
grace_period = "2s"
TOML
chmod 0644 "$work/agent.toml"
tunnel_token=$(printf '{"a":"account","t":"6ff42ae2-765d-4adf-8112-31c55c1551ef","s":"%s"}' \
  "$(head -c 24 /dev/urandom | base64 -w0)" | base64 -w0)

# --- run it ---------------------------------------------------------------------------------
# The image's own entry point, command and user. Read-only as Kubernetes makes it: no tmpfs on
# /run, /tmp and /var/tmp (podman's --read-only adds them unless --read-only-tmpfs=false). The
# runtime directory is a tmpfs owned by the agent's user (U) (on Kubernetes: an emptyDir); the
# state directory is the image's volume (podman makes an anonymous one, owned as in the image).
# k8s-file: `podman logs` without journald.
# shellcheck disable=SC2086 # run_opts is a list of options
ctr=$(podman run -d $run_opts --read-only --read-only-tmpfs=false --network host --log-driver k8s-file \
  --tmpfs /run/tunnel-agent:rw,nosuid,nodev,mode=0750,U \
  -v "$work/agent.toml:/etc/tunnel-agent/agent.toml:ro" \
  -e TUNNEL_TOKEN="$tunnel_token" -e CONFIG_API_TOKEN="$api_token" "$test_image" run)

# poll DEADLINE_S DESCRIPTION COMMAND...: runs COMMAND until it succeeds, or fails the test.
poll() {
  local deadline=$(($(date +%s) + $1)) what=$2
  shift 2
  until "$@"; do
    [ "$(podman inspect -f '{{.State.Running}}' "$ctr")" = true ] || fail "the container exited while waiting for $what"
    [ "$(date +%s)" -lt "$deadline" ] || fail "no $what within the deadline"
    sleep 0.1
  done
}
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true; }
listening() { [ "$(http_code "http://127.0.0.1:$health_port/ready")" != 000 ]; }
poll 30 "health listener" listening

# The processes, seen from the host: PID 1 the init, its one live child the agent (the same
# binary), cloudflared the agent's child; every one uid 65532; the root mounted read-only.
children() { cat "/proc/$1/task/"*/children 2>/dev/null || true; }
pid1=$(podman inspect -f '{{.State.Pid}}' "$ctr")
[ "$(readlink "/proc/$pid1/exe")" = /usr/bin/tunnel-agent ] || fail "PID 1 runs $(readlink "/proc/$pid1/exe")"
agent_pid=
agent_has_cloudflared() {
  agent_pid=$(children "$pid1" | awk '{ print $1 }')
  [ -n "$agent_pid" ] && [ -n "$(children "$agent_pid")" ]
}
poll 30 "agent under PID 1 with a cloudflared child" agent_has_cloudflared
[ "$(children "$pid1" | wc -w)" = 1 ] || fail "PID 1 has children $(children "$pid1"), not only the agent"
[ "$(readlink "/proc/$agent_pid/exe")" = /usr/bin/tunnel-agent ] || fail "PID 1's child runs $(readlink "/proc/$agent_pid/exe")"
for pid in "$pid1" "$agent_pid" $(children "$agent_pid"); do
  uid=$(awk '$1 == "Uid:" { print $2 "," $3 "," $4 "," $5 }' "/proc/$pid/status")
  [ "$uid" = 65532,65532,65532,65532 ] || fail "process $pid runs as uids $uid, not 65532"
  argv=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  case "$argv" in *"$tunnel_token"* | *"$api_token"*) fail "process $pid has a secret value in its argv" ;; esac
done
root_opts=$(awk '$5 == "/" { print $6 }' "/proc/$pid1/mountinfo")
case ",$root_opts," in *,ro,*) ;; *) fail "the root filesystem is mounted $root_opts, not ro" ;; esac
[ "$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}' "$ctr")" = "true 65532:65532" ] ||
  fail "podman inspect: $(podman inspect -f '{{.HostConfig.ReadonlyRootfs}} {{.Config.User}}' "$ctr")"
say "PASS PID 1 is the init, the agent its one child, cloudflared the agent's; uid 65532 on a read-only root"

# A pushed table is served: the config API takes it, /ready turns 200, the proxy routes by it.
table=$(printf '{"version": 1, "rules": [{"hostnames": ["image-test.example.com"], "backends": [{"url": "http://127.0.0.1:%s"}]}]}' "$upstream_port")
code=$(http_code -X PUT -H "Authorization: Bearer $api_token" -H 'Content-Type: application/json' \
  --data "$table" "http://127.0.0.1:$api_port/config")
[ "$code" = 200 ] || fail "PUT /config answered $code"
ready() { [ "$(http_code "http://127.0.0.1:$health_port/ready")" = 200 ]; }
poll 30 "200 from /ready" ready
say "PASS /ready 200 after a push"
status=$(curl -s --max-time 2 "http://127.0.0.1:$health_port/status")
echo "$status" | python3 -c '
import json, sys
s = json.load(sys.stdin)
assert s["ready"] is True, s["ready"]
assert s["routes"]["count"] == 1, s["routes"]
assert s["cloudflared"]["pid"], s["cloudflared"]
assert s["config_file"] == "/etc/tunnel-agent/agent.toml", s["config_file"]
' || fail "/status: $status"
say "PASS /status: ready, the pushed route, cloudflared running, the default config path"
body=$(curl -s --max-time 5 -H 'Host: image-test.example.com' "http://127.0.0.1:$proxy_port/hello.txt")
[ "$body" = "hello from the host's upstream" ] || fail "through the proxy: got '$body'"
say "PASS a request through the proxy reaches the host's upstream"

# The orphan: it said it exited; then PID 1 must not keep it as a zombie child.
# The log is read whole before grep: with pipefail, `podman logs | grep -q` fails when grep's
# early exit makes podman logs die of SIGPIPE.
container_log() { podman logs "$ctr" 2>&1; }
orphan_said() { grep -q 'orphaning-cloudflared: orphan [0-9]* exiting' <<<"$(container_log)"; }
poll 30 "orphan exit in the log" orphan_said
no_zombies() {
  local pid left=
  for pid in $(children "$pid1"); do
    [ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != Z ] || left="$left $pid"
  done
  [ -z "$left" ] || { echo "$left" >"$work/zombies"; return 1; }
}
poll 5 "reaped orphan (the zombie children of PID 1, host pids, are in $work/zombies)" no_zombies
say "PASS the orphan is reaped"

# SIGTERM drains: cloudflared gets its SIGTERM, the container exits 0 within the grace period.
t0=$(date +%s%N)
podman stop -t $((grace + 10)) "$ctr" >/dev/null
took_ms=$((($(date +%s%N) - t0) / 1000000))
code=$(podman inspect -f '{{.State.ExitCode}}' "$ctr")
[ "$code" = 0 ] || fail "the container exited $code after podman stop"
[ "$took_ms" -lt $((grace * 1000)) ] || fail "podman stop took $took_ms ms, grace is ${grace}s"
logs=$(container_log)
grep -q 'Initiating graceful shutdown' <<<"$logs" || fail "cloudflared was not asked to drain"
say "PASS podman stop: exit 0 after $took_ms ms (grace ${grace}s), cloudflared drained"

# No secret value in the log or /status (argv: checked above, while the processes ran).
for secret in "$tunnel_token" "$api_token"; do
  case "$logs$status" in *"$secret"*) fail "a secret value is in the log or /status" ;; esac
done
say "PASS no secret value in the log or /status"

# stdout_only NEEDLE...: fails unless the container's k8s-file log (`TIME STREAM F|P LINE`, the
# CRI format kubelet writes too) has a line with each NEEDLE and every line is on stdout; sets
# `lines` to how many there are. Read from the file: it keeps each line's stream, which
# `podman logs` does not show apart.
stdout_only() {
  local file needle
  file=$(podman inspect -f '{{.HostConfig.LogConfig.Path}}' "$ctr")
  [ -s "$file" ] || fail "no container log at '$file'"
  awk '$2 != "stdout"' "$file" >"$work/not-stdout"
  [ ! -s "$work/not-stdout" ] || fail "lines not on stdout: $(head -n 5 "$work/not-stdout")"
  for needle in "$@"; do
    grep -qF -- "$needle" "$file" || fail "no '$needle' in the log"
  done
  lines=$(wc -l <"$file")
}
stdout_only '"message":"ready"' '"target":"cloudflared"' 'Initiating graceful shutdown' 'proxy stopped'
say "PASS run: all $lines lines on stdout (the agent's, cloudflared's), none on stderr"

# --- the gateway controller's chart, unchanged ----------------------------------------------
# Its proxy Deployment points at this image with no command and no args (the image's default,
# `run --from-env`), runs it as uid 65534 with a read-only root, no capabilities, no privilege
# escalation and no volume (podman's image volume ignored, as Kubernetes does), and configures
# it with its variables: a tunnel token and the config API's bearer. In its own network namespace
# (--network none): the listeners keep their defaults (:8080 on loopback, :8081, :2000); the
# config API is driven from inside the container, with the test layer's python3.
podman rm -f -v -t 0 "$ctr" >/dev/null
# shellcheck disable=SC2086 # run_opts is a list of options
ctr=$(podman run -d $run_opts --read-only --read-only-tmpfs=false --network none --log-driver k8s-file \
  --user 65534:65534 --cap-drop ALL --security-opt no-new-privileges --image-volume ignore \
  -e TUNNEL_TOKEN="$tunnel_token" -e PROXY_AUTH_TOKEN="$api_token" "$test_image")
config_api_up() { grep -q 'config api up' <<<"$(container_log)"; }
poll 30 "'config api up' from the chart's pod shape" config_api_up
# api METHOD PATH [BODY]: the config API's status code and body, asked from inside the pod.
api() {
  podman exec -e TOKEN="$api_token" "$ctr" python3 -c '
import os, sys, urllib.request, urllib.error
method, path = sys.argv[1], sys.argv[2]
body = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request("http://127.0.0.1:8081" + path, data=body, method=method,
    headers={"Authorization": "Bearer " + os.environ["TOKEN"], "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=2) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
' "$@"
}
answer=$(api GET /readyz)
case "$answer" in "503 "*"no config loaded"*) ;; *) fail "/readyz before a push: $answer" ;; esac
table='{"version": 1, "rules": [{"hostnames": ["chart.example.com"], "backends": [{"url": "http://127.0.0.1:9"}]}]}'
answer=$(api PUT /config "$table")
case "$answer" in "200 "*) ;; *) fail "PUT /config: $answer" ;; esac
chart_ready() { case "$(api GET /readyz)" in "200 "*) true ;; *) false ;; esac; }
poll 30 "/readyz 200 after a push, with the tunnel up" chart_ready
[ "$(podman inspect -f '{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}' "$ctr")" = "65534:65534 true" ] ||
  fail "podman inspect: $(podman inspect -f '{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}' "$ctr")"
say "PASS the chart's pod shape: uid 65534, read-only root, no volume, no args: /readyz 503 'no config loaded', then 200 after a push"
podman stop -t $((grace + 10)) "$ctr" >/dev/null
code=$(podman inspect -f '{{.State.ExitCode}}' "$ctr")
[ "$code" = 0 ] || fail "the chart's pod shape exited $code after podman stop"
stdout_only 'starting with the environment' 'cannot be written' '/dev/shm/tunnel-agent/run' 'config api up' \
  '"target":"cloudflared"' 'Registered tunnel connection' 'proxy stopped'
# JSON, as the controller's own proxy logs: the image's TUNNEL_AGENT_LOG_FORMAT, no file. Each
# k8s-file line is `TIME STREAM F|P LINE`; every LINE must be one JSON object.
python3 - "$(podman inspect -f '{{.HostConfig.LogConfig.Path}}' "$ctr")" <<'PY' || fail "a log line is not a JSON object"
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    payload = line.rstrip("\n").split(" ", 3)[3]
    if not isinstance(json.loads(payload), dict):
        sys.exit(f"not an object: {payload}")
PY
for secret in "$tunnel_token" "$api_token"; do
  case "$(container_log)" in *"$secret"*) fail "a secret value is in the log" ;; esac
done
say "PASS the chart's pod shape: its directories beneath /dev/shm (said), exit 0 after podman stop, all $lines lines on stdout, each a JSON object"
say "all passed in $(($(date +%s) - started)) s"
