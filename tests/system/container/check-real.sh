#!/bin/bash
# The system test's real-cloudflared scenario, run by systemtest.service inside a booted Debian
# container: tunnel-agent and the REAL cloudflared installed from the signed apt repository,
# supervised under the packaged unit with all its sandboxing. No network: with a loopback
# `--edge` cloudflared keeps retrying (0 connections); without it, it exits 1 after ~0.6 s, the
# crash loop the unit's restart policy is checked against.
set -uo pipefail
. /srv/systemtest/lib.sh
: >"$RESULTS"

# CF_VERSION: the real cloudflared's version; PKG_VERSION: tunnel-agent's N (the repository also
# holds the main scenario's N+1 and broken N+2).
. $ST/versions.env
CONFIG=/etc/tunnel-agent/agent.toml
GCP=/run/systemtest/gcp
CF_READY=http://127.0.0.1:20241/ready
INTERNAL_TOKEN=system-test-internal-token-real-4a1c
# Valid-shaped connector tokens (base64 of {"a","t","s"}) for a tunnel that does not exist.
token() { # SECRET_BYTE
  python3 -c 'import base64, json, sys
s = base64.b64encode(bytes([int(sys.argv[1])]) * 32).decode()
print(base64.b64encode(json.dumps({"a": "0123456789abcdef0123456789abcdef",
  "t": "6ff42ae2-765d-4adf-8112-31c55c1551ef", "s": s}).encode()).decode())' "$1"
}
TOKEN1=$(token 1)
TOKEN2=$(token 2)

# EDGE_ARGS: the extra_args line (a loopback edge keeps cloudflared running); EXTRA: more keys.
write_config() { # EDGE_ARGS [EXTRA...]
  {
    cat <<EOF
[agent]
shutdown_grace = "5s"

[gcp]
metadata_url = "http://127.0.0.1:8930"
secret_manager_endpoint = "http://127.0.0.1:8930"

[secrets.internal_token]
source = "file"
path = "secret_internal-token"

[secrets.tunnel_token]
source = "gcp-secret-manager"
name = "projects/system-test/secrets/tunnel-token/versions/latest"

[proxy]
listen = "127.0.0.1:8080"
auth_secret = "internal_token"

[health]
listen = "0.0.0.0:2000"

[routes.hosts]
"app.systemtest" = "http://127.0.0.1:9001"

[cloudflared]
enabled = true
token_secret = "tunnel_token"
token_delivery = "file"
grace_period = "5s"
EOF
    printf '%s\n' "$@"
  } >"$CONFIG.tmp"
  mv "$CONFIG.tmp" "$CONFIG"
}
EDGE='extra_args = ["--edge", "127.0.0.1:7844"]'

set_tunnel_token() { printf '%s' "$1" >"$GCP/secrets/tunnel-token"; }
status_json() { curl -s --max-time 5 http://127.0.0.1:2000/status; }
json_field() { python3 -c 'import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("null" if v is None else v)' "$1"; }
cf_ready_field() { curl -s --max-time 5 "$CF_READY" | json_field "$1"; }
# entries CURSOR MESSAGE_PREFIX [FIELD=VALUE]: how many of the unit's journal entries after CURSOR
# have a MESSAGE starting with MESSAGE_PREFIX (and the journald field FIELD equal to VALUE).
entries() {
  journalctl -u $UNIT --after-cursor="$1" --no-pager -o json | python3 -c 'import json, sys
prefix, want = sys.argv[1], sys.argv[2:]
n = 0
for line in sys.stdin:
    e = json.loads(line)
    if str(e.get("MESSAGE", "")).startswith(prefix) and all(
            str(e.get(k)) == v for k, _, v in (w.partition("=") for w in want)):
        n += 1
print(n)' "${@:2}"
}
has_cloudflared() { cloudflared_pid >/dev/null; }
cf_pid_is_not() { local p; p=$(cloudflared_pid) && [ "$p" != "$1" ]; }

# stays_up PID SECONDS: cloudflared keeps the same pid and nothing restarts it for SECONDS (a
# duration to observe, not a wait for an event).
stays_up() {
  local until=$(($(now_ms) + $2 * 1000))
  while [ "$(now_ms)" -lt "$until" ]; do
    [ "$(cloudflared_pid)" = "$1" ] || return 1
    [ "$(status_json | json_field cloudflared.restarts)" = 0 ] || return 1
    sleep 0.2
  done
}

# --- fixtures --------------------------------------------------------------------------------
mkdir -p /run/systemtest/www "$GCP/secrets"
printf 'app' >/run/systemtest/www/index.html
set_tunnel_token "$TOKEN1"
systemd-run -q --unit=upstream python3 -m http.server --bind 127.0.0.1 --directory /run/systemtest/www 9001
systemd-run -q --unit=fake-gcp $ST/fake-gcp --listen 127.0.0.1:8930 --control "$GCP"
if ! wait_for 20 answers http://127.0.0.1:9001/ 200 || ! wait_for 20 answers http://127.0.0.1:8930/ 404; then
  fail fixtures "the upstream or the fake Secret Manager did not come up"
  finish
  exit 0
fi

# --- 1. both packages from the repository -----------------------------------------------------
check_install() {
  local name=apt-install-tunnel-agent-and-real-cloudflared out
  install -d -m 0700 /etc/tunnel-agent/credentials
  printf '%s\n' "$INTERNAL_TOKEN" >/etc/tunnel-agent/credentials/internal-token
  chmod 0600 /etc/tunnel-agent/credentials/internal-token
  write_config "$EDGE"
  if ! out=$(apt-get update 2>&1 && apt-get install -y "tunnel-agent=$PKG_VERSION" cloudflared </dev/null 2>&1); then
    fail $name "apt-get failed: $out"
  elif [ "$(dpkg-query -W -f '${Version}' cloudflared)" != "$CF_VERSION" ]; then
    fail $name "cloudflared $(dpkg-query -W -f '${Version}' cloudflared), want $CF_VERSION"
  elif [ "$(/usr/bin/cloudflared --version | awk '{ print $3; exit }')" != "$CF_VERSION" ]; then
    fail $name "/usr/bin/cloudflared is not the real $CF_VERSION: $(/usr/bin/cloudflared --version)"
  else
    echo "$out" >"$OUT/apt-install.txt"
    pass $name
  fi
}

# --- 2. it runs under the sandbox ---------------------------------------------------------------
check_runs_under_sandbox() {
  local name=real-cloudflared-runs-under-the-unit-sandbox pid
  if ! wait_for 60 is_state active; then
    fail $name "tunnel-agent is $(prop ActiveState) ($(prop StatusText))"
    return
  fi
  if ! wait_for 30 has_cloudflared; then
    fail $name "no cloudflared in the unit's cgroup"
    return
  fi
  pid=$(cloudflared_pid)
  if [ "$(readlink /proc/$pid/exe)" != /usr/bin/cloudflared ]; then
    fail $name "the supervised process is $(readlink /proc/$pid/exe)"
    return
  fi
  if ! wait_for 30 answers "$CF_READY" 503; then
    fail $name "cloudflared's own /ready never answered: $(curl -s "$CF_READY")"
    return
  fi
  if ! stays_up "$pid" 8; then
    fail $name "cloudflared did not stay up: pid $pid -> $(cloudflared_pid), $(status_json | json_field cloudflared.last_exit)"
    return
  fi
  journalctl -u $UNIT --no-pager -o cat >"$OUT/sandbox-journal.txt"
  # The sandbox's failure modes: a seccomp kill (SIGSYS), a refused call or file. cloudflared's
  # ICMP proxy needs ping_group_range, which no service sandbox grants: it says so and goes on.
  local bad
  bad=$(grep -i -e 'SIGSYS' -e 'bad system call' -e 'killed by signal' -e 'permission denied' \
    -e 'operation not permitted' -e 'read-only file system' "$OUT/sandbox-journal.txt" |
    grep -v -e 'ICMP' -e 'ping_group_range' || true)
  if [ -n "$bad" ]; then
    fail $name "sandbox trouble in the journal: $(echo "$bad" | head -n 3 | tr '\n' ' ')"
  elif [ "$(prop NRestarts)" != 0 ]; then
    fail $name "the unit restarted $(prop NRestarts) times"
  else
    say "cloudflared pid $pid up for 8 s under the sandbox, NRestarts=0"
    pass $name
  fi
}

# --- 3. what the agent shows about it -----------------------------------------------------------
check_ready_status_metrics() {
  local name=ready-0-connections-version-connector-id-metrics ready code connector status metrics
  code=$(http_code http://127.0.0.1:2000/ready)
  ready=$(curl -s http://127.0.0.1:2000/ready)
  connector=$(cf_ready_field connectorId)
  status=$(status_json)
  metrics=$(curl -s http://127.0.0.1:2000/metrics)
  echo "$status" >"$OUT/status.json"
  echo "$metrics" >"$OUT/metrics.txt"
  curl -s "$CF_READY" >"$OUT/cloudflared-ready.json"
  if [ "$(cf_ready_field readyConnections)" != 0 ]; then
    fail $name "cloudflared's /ready: $(curl -s "$CF_READY")"
  elif [ "$code" != 503 ] || [ "$(echo "$ready" | json_field components.cloudflared)" != "no connections" ]; then
    fail $name "agent /ready $code: $ready (want 503, cloudflared: no connections)"
  elif [ "$(echo "$status" | json_field cloudflared.version)" != "$CF_VERSION" ]; then
    fail $name "/status cloudflared.version: $(echo "$status" | json_field cloudflared.version)"
  elif [ "$connector" = null ] || ! wait_for 10 eval '[ "$(status_json | json_field cloudflared.connector_id)" = "$connector" ]'; then
    fail $name "/status connector_id $(status_json | json_field cloudflared.connector_id), cloudflared's /ready says $connector"
  elif ! grep -q "^tunnel_agent_cloudflared_info{version=\"$CF_VERSION\"} 1" <<<"$metrics" ||
    ! grep -q '^cloudflared_' <<<"$metrics" || ! grep -q '^build_info{.*version="'"$CF_VERSION"'"' <<<"$metrics"; then
    fail $name "/metrics lacks the version or cloudflared's own cloudflared_* and build_info series (see metrics.txt)"
  elif ! journalctl -u $UNIT --no-pager -o cat | grep -q "cloudflared version $CF_VERSION (cloudflared)"; then
    fail $name "no 'cloudflared version $CF_VERSION' line in the journal"
  else
    pass $name
  fi
}

# --- 4. its environment: HOME, the token file, no test hook ------------------------------------
check_environment() {
  local name=cloudflared-home-token-file-no-test-hook pid env argv first_line
  pid=$(cloudflared_pid)
  env=$(tr '\0' '\n' <"/proc/$pid/environ")
  argv=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  if ! grep -qx 'HOME=/var/lib/tunnel-agent' <<<"$env"; then
    fail $name "cloudflared's HOME: $(grep '^HOME=' <<<"$env" || echo unset)"
  elif grep -q -e '^TUNNEL_AGENT_' -e '^TUNNEL_TOKEN=' -e '^NOTIFY_SOCKET=' <<<"$env"; then
    fail $name "cloudflared's environment has $(grep -o -e '^TUNNEL_AGENT_[A-Z_]*' -e '^TUNNEL_TOKEN' -e '^NOTIFY_SOCKET' <<<"$env" | tr '\n' ' ')"
  elif [[ $argv != *"run --token-file /run/tunnel-agent/cloudflared.token"* ]] || [[ $argv == *"$TOKEN1"* ]]; then
    fail $name "argv: $argv"
  elif [ "$(cat /run/tunnel-agent/cloudflared.token)" != "$TOKEN1" ]; then
    fail $name "the token file does not hold the token from Secret Manager"
  else
    pass $name
  fi
}

# --- 5. journald never suppresses the unit --------------------------------------------------------
check_no_suppression() {
  local name=journald-never-suppressed-the-unit
  journalctl -b --no-pager -o cat >"$OUT/boot-journal.txt"
  if grep -q 'Suppressed .* messages from tunnel-agent.service' "$OUT/boot-journal.txt"; then
    fail $name "$(grep -m1 'Suppressed' "$OUT/boot-journal.txt")"
  else
    pass $name
  fi
}

# --- 6. reload with a new token restarts it with that token ---------------------------------------
check_reload_new_token() {
  local name=reload-with-new-token-restarts-cloudflared pid c
  pid=$(cloudflared_pid)
  c=$(cursor)
  set_tunnel_token "$TOKEN2"
  if ! systemctl reload $UNIT; then
    fail $name "systemctl reload failed"
  elif ! wait_for 30 cf_pid_is_not "$pid"; then
    fail $name "cloudflared (pid $pid) was not restarted"
  elif [ "$(cat /run/tunnel-agent/cloudflared.token)" != "$TOKEN2" ]; then
    fail $name "the token file does not hold the new token"
  elif kill -0 "$pid" 2>/dev/null; then
    fail $name "the old cloudflared (pid $pid) still runs"
  elif ! stays_up "$(cloudflared_pid)" 3; then
    fail $name "the new cloudflared did not stay up"
  elif ! journal_since "$c" | grep -q 'Initiating graceful shutdown'; then
    fail $name "the old cloudflared was not drained (no 'Initiating graceful shutdown')"
  else
    pass $name
  fi
}

# --- 7. stop drains it ---------------------------------------------------------------------------
check_stop_drains() {
  local name=stop-drains-real-cloudflared c
  c=$(cursor)
  systemctl stop $UNIT
  journal_since "$c" >"$OUT/stop-journal.txt"
  local sigterm drain stopped proxy
  sigterm=$(grep -n -m1 'stopping cloudflared (SIGTERM)' "$OUT/stop-journal.txt" | cut -d: -f1)
  drain=$(grep -n -m1 'Initiating graceful shutdown' "$OUT/stop-journal.txt" | cut -d: -f1)
  stopped=$(grep -n -m1 'cloudflared stopped' "$OUT/stop-journal.txt" | cut -d: -f1)
  proxy=$(grep -n -m1 'proxy stopped' "$OUT/stop-journal.txt" | cut -d: -f1)
  if [ "$(prop Result)" != success ] || [ "$(prop ExecMainStatus)" != 0 ]; then
    fail $name "Result=$(prop Result) ExecMainStatus=$(prop ExecMainStatus)"
  elif [ -z "$sigterm" ] || [ -z "$drain" ] || [ -z "$stopped" ] || [ -z "$proxy" ] ||
    ! [ "$sigterm" -lt "$drain" ] || ! [ "$drain" -lt "$stopped" ] || ! [ "$stopped" -lt "$proxy" ]; then
    fail $name "SIGTERM@$sigterm drain@$drain stopped@$stopped proxy@$proxy (see stop-journal.txt)"
  elif [ "$(entries "$c" 'cloudflared stopped' 'F_RESULT=exited with code 0')" != 1 ]; then
    fail $name "cloudflared did not stop with exit code 0 (see stop-journal.txt)"
  elif grep -q 'SIGKILL' "$OUT/stop-journal.txt"; then
    fail $name "cloudflared needed a SIGKILL"
  else
    pass $name
  fi
}

# --- 8. the real crash loop ends the unit failed, as its comment says ----------------------------
# systemd 252 reports a start limit hit by an automatic restart as "Start request repeated too
# quickly" with Result=exit-code (the last run's), not start-limit-hit.
ended_failed() { is_state failed && journal_since "$1" | grep -q 'Start request repeated too quickly'; }
check_crash_loop_ends_failed() {
  local name=real-crash-loop-ends-unit-failed c t0 elapsed exits giveups
  # No --edge: cloudflared looks the edge up in DNS, fails and exits 1. The agent's restart
  # timings are shortened so the test takes seconds; the unit's start limit is the shipped one.
  write_config 'give_up_after_exits = 3' 'restart_backoff = "100ms"' 'restart_backoff_max = "200ms"'
  systemctl reset-failed $UNIT
  c=$(cursor)
  t0=$(now_ms)
  systemctl start --no-block $UNIT
  if ! wait_for 240 ended_failed "$c"; then
    fail $name "not failed after 240 s: $(prop ActiveState)/$(prop SubState) Result=$(prop Result) NRestarts=$(prop NRestarts)"
    return
  fi
  elapsed=$(($(now_ms) - t0))
  journal_since "$c" >"$OUT/crash-loop-journal.txt"
  exits=$(entries "$c" 'cloudflared exited unexpectedly' 'F_RESULT=exited with code 1')
  # One per agent run: the agent's own error line (its stderr copy says the same, unprefixed).
  giveups=$(grep -c '^tunnel-agent failed: .*giving up' "$OUT/crash-loop-journal.txt")
  local burst uptime
  burst=$(systemctl show -P StartLimitBurst $UNIT)
  uptime=$(journalctl -u $UNIT --after-cursor="$c" -o json --no-pager | python3 -c 'import json, sys
print(next((json.loads(l).get("F_UPTIME_S") for l in sys.stdin if "F_UPTIME_S" in l), "?"))')
  if [ "$giveups" -ne "$burst" ] || [ "$exits" -ne $((3 * burst)) ]; then
    fail $name "$giveups agent runs gave up (want StartLimitBurst=$burst), $exits cloudflared exits (want $((3 * burst)))"
  elif [ "$(prop NRestarts)" -ne "$burst" ] && [ "$(prop NRestarts)" -ne $((burst - 1)) ]; then
    fail $name "NRestarts=$(prop NRestarts) with StartLimitBurst=$burst"
  else
    say "crash loop: failed (start limit) after ${elapsed} ms, $giveups agent runs, $exits cloudflared exits (first after ${uptime} s)"
    pass $name
  fi
}

check_install
check_runs_under_sandbox
check_ready_status_metrics
check_environment
check_no_suppression
check_reload_new_token
check_stop_drains
check_crash_loop_ends_failed
finish
