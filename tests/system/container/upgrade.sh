# The main scenario's upgrade checks (issue 20): `apt-get install` of another version re-executes
# the running agent in place. Sourced by check-main.sh after lib.sh; uses its CONFIG,
# INTERNAL_TOKEN, versions.env and helpers.
#
# The repository holds tunnel-agent three times (tests/system/run.sh): N ($OLD_VERSION, agent
# $OLD_AGENT_VERSION), N+1 ($NEW_VERSION, agent $NEW_AGENT_VERSION: another binary, and a unit
# with one added setting) and a broken N+2 ($BROKEN_VERSION: a /usr/bin/tunnel-agent that passes
# the checks but hands the exec'd image garbage instead of the carried state, over N's binary).
# In order: N -> N+1 in place under load; N+1 -> N+2 rolled back under load; N+2 -> N, a
# downgrade, in place; `systemctl restart` as before; N -> N+1 with the unit stopped starts it;
# N+1 -> N while policy-rc.d forbids restarts leaves the agent alone.

LOAD=/run/systemtest/load

# The agent's /status, one value: a Python expression over `d`, printed as JSON unless a string.
status_get() {
  curl -s --max-time 5 http://127.0.0.1:2000/status |
    python3 -c 'import json, sys
d = json.load(sys.stdin)
try:
    v = '"$1"'
except (KeyError, IndexError, TypeError):
    v = "<missing>"
print(v if isinstance(v, str) else json.dumps(v))' 2>/dev/null || echo "<no status>"
}

count_at_least() { [ "$(grep -c -E "$2" "$1" 2>/dev/null)" -ge "$3" ]; }

# start_load NAME: until stop_load, through the proxy: requests on keep-alive connections (20 per
# connection, curl's URL glob), one-request connections (with when each started, connect and
# first-byte times), and /ready every 10 ms (a sample that fails names its error). Into
# $OUT/NAME/.
start_load() {
  local dir=$OUT/$1
  mkdir -p "$dir"
  rm -f $LOAD.stop
  LOAD_DIR=$dir
  (
    while [ ! -e $LOAD.stop ]; do
      curl -s --max-time 5 -H 'Host: app.systemtest' -H "X-Internal-Auth-Token: $INTERNAL_TOKEN" \
        -w ' %{http_code}\n' "http://127.0.0.1:8080/color?n=[1-20]"
    done
  ) >"$dir/keepalive.txt" 2>&1 &
  LOAD_PIDS=$!
  (
    while [ ! -e $LOAD.stop ]; do
      t=$(now_ms)
      r=$(curl -s -o /dev/null --max-time 5 -H 'Host: app.systemtest' -H "X-Internal-Auth-Token: $INTERNAL_TOKEN" \
        -w '%{http_code} %{time_connect} %{time_starttransfer}' http://127.0.0.1:8080/color)
      echo "$t $r"
    done
  ) >"$dir/new-connections.txt" 2>&1 &
  LOAD_PIDS="$LOAD_PIDS $!"
  # One process, so the samples are 10 ms apart (a curl per sample takes longer than that).
  python3 - "$dir/ready.txt" $LOAD.stop <<'EOF' &
import http.client, os, sys, time
out = open(sys.argv[1], "w", buffering=1)
while not os.path.exists(sys.argv[2]):
    t = int(time.time() * 1000)
    try:
        c = http.client.HTTPConnection("127.0.0.1", 2000, timeout=2)
        c.request("GET", "/ready")
        code = c.getresponse().status
        c.close()
    except (OSError, http.client.HTTPException) as e:
        code = type(e).__name__
    out.write(f"{t} {code}\n")
    time.sleep(0.01)
EOF
  LOAD_PIDS="$LOAD_PIDS $!"
  wait_for 10 count_at_least "$dir/keepalive.txt" '^green 200$' 20
}

# stop_load: keeps the load going a little past the change (20 more keep-alive requests, 10 more
# new connections), so requests on both sides of it are counted; then LOAD_BAD (requests that
# failed or answered anything but green 200, plus /ready samples other than 200) and
# LOAD_SUMMARY.
stop_load() {
  local ka nc
  ka=$(grep -c . "$LOAD_DIR/keepalive.txt")
  nc=$(grep -c . "$LOAD_DIR/new-connections.txt")
  wait_for 10 count_at_least "$LOAD_DIR/keepalive.txt" . $((ka + 20))
  wait_for 10 count_at_least "$LOAD_DIR/new-connections.txt" . $((nc + 10))
  touch $LOAD.stop
  # shellcheck disable=SC2086 # a list of pids
  wait $LOAD_PIDS
  local ka_total ka_bad nc_total nc_bad ready_total ready_bad
  ka_total=$(grep -c . "$LOAD_DIR/keepalive.txt")
  ka_bad=$(grep -v -c -E '^green 200$' "$LOAD_DIR/keepalive.txt")
  nc_total=$(grep -c . "$LOAD_DIR/new-connections.txt")
  nc_bad=$(awk '$2 != 200' "$LOAD_DIR/new-connections.txt" | grep -c .)
  ready_total=$(grep -c . "$LOAD_DIR/ready.txt")
  ready_bad=$(awk '$2 != 200' "$LOAD_DIR/ready.txt" | grep -c .)
  LOAD_BAD=$((ka_bad + nc_bad + ready_bad))
  LOAD_SUMMARY="$ka_total keep-alive requests ($ka_bad failed), $nc_total new connections ($nc_bad failed),"
  LOAD_SUMMARY+=" $ready_total /ready samples ($ready_bad not 200)"
}

# latency WINDOW_START_MS WINDOW_END_MS: p50/p99/max of connect+first byte of the new connections
# started in the window (the apt-get run), and how many there were.
latency() {
  python3 - "$LOAD_DIR/new-connections.txt" "$1" "$2" <<'EOF'
import sys
rows = [l.split() for l in open(sys.argv[1]) if len(l.split()) == 4]
t = sorted(float(r[3]) * 1000 for r in rows if int(sys.argv[2]) <= int(r[0]) <= int(sys.argv[3]))
if not t:
    print("no new connections in the window")
else:
    pick = lambda q: t[min(len(t) - 1, int(q * len(t)))]
    print(f"{len(t)} new connections: connect+first byte p50 {pick(0.5):.1f} ms, p99 {pick(0.99):.1f} ms, max {t[-1]:.1f} ms")
EOF
}

# apt_in_place NAME VERSION [APT ARGS]: installs VERSION under load and records what the checks
# compare: APT_RC, $OUT/NAME/apt.txt, the MainPID, cloudflared's pid and restarts, the route
# version and NRestarts before (BEFORE_*) and after (AFTER_*), the journal since, the load.
apt_in_place() {
  local name=$1 version=$2 c t1 t2
  shift 2
  BEFORE_PID=$(prop MainPID)
  BEFORE_CF=$(cloudflared_pid) || BEFORE_CF=none
  BEFORE_CF_RESTARTS=$(status_get 'd["cloudflared"]["restarts"]')
  BEFORE_ROUTES=$(status_get 'd["routes"]["version"]')
  BEFORE_NRESTARTS=$(prop NRestarts)
  c=$(cursor)
  start_load "$name"
  t1=$(now_ms)
  APT_RC=0
  apt-get install -y "$@" "tunnel-agent=$version" </dev/null >"$OUT/$name/apt.txt" 2>&1 || APT_RC=$?
  t2=$(now_ms)
  wait_for 30 is_state active
  stop_load
  AFTER_PID=$(prop MainPID)
  AFTER_CF=$(cloudflared_pid) || AFTER_CF=none
  AFTER_CF_RESTARTS=$(status_get 'd["cloudflared"]["restarts"]')
  AFTER_ROUTES=$(status_get 'd["routes"]["version"]')
  AFTER_NRESTARTS=$(prop NRestarts)
  journal_since "$c" >"$OUT/$name/journal.txt"
  curl -s --max-time 5 http://127.0.0.1:2000/status >"$OUT/$name/status.json"
  curl -s --max-time 5 http://127.0.0.1:2000/metrics >"$OUT/$name/metrics.txt"
  {
    echo "apt-get install: $((t2 - t1)) ms, exit $APT_RC"
    echo "load: $LOAD_SUMMARY"
    echo "during apt-get: $(latency "$t1" "$t2")"
    echo "held new connections (last_upgrade.held_ms): $(status_get 'd["agent"]["last_upgrade"]["held_ms"]') ms"
  } >"$OUT/$name/timing.txt"
  sed "s/^/$name: /" "$OUT/$name/timing.txt" | while IFS= read -r l; do say "$l"; done
}

# The facts every in-place change must keep, or the reason it did not: empty when all hold.
kept_process() {
  if [ "$AFTER_PID" != "$BEFORE_PID" ]; then
    echo "MainPID changed: $BEFORE_PID -> $AFTER_PID"
  elif [ "$AFTER_NRESTARTS" != "$BEFORE_NRESTARTS" ]; then
    echo "systemd restarted the unit: NRestarts $BEFORE_NRESTARTS -> $AFTER_NRESTARTS"
  elif ! is_state active; then
    echo "the unit is $(prop ActiveState) ($(prop SubState))"
  elif [ "$AFTER_CF" != "$BEFORE_CF" ]; then
    echo "cloudflared's pid changed: $BEFORE_CF -> $AFTER_CF"
  elif [ "$AFTER_CF_RESTARTS" != "$BEFORE_CF_RESTARTS" ]; then
    echo "cloudflared's restarts changed: $BEFORE_CF_RESTARTS -> $AFTER_CF_RESTARTS"
  elif [ "$AFTER_ROUTES" != "$BEFORE_ROUTES" ]; then
    echo "the route table's version changed: $BEFORE_ROUTES -> $AFTER_ROUTES"
  elif [ "$LOAD_BAD" -ne 0 ]; then
    echo "$LOAD_SUMMARY"
  fi
}

agent_version_is() { [[ $(status_get 'd["agent"]["version"]') == "$1 ("* ]]; }
metric_is() { grep -q -F "tunnel_agent_upgrades_total{result=\"$1\"} $2" "$OUT/$3/metrics.txt"; }
apt_said() { grep -q -F "$2" "$OUT/$1/apt.txt"; }
UNIT_CHANGED_NOTE="changed /usr/lib/systemd/system/$UNIT: its new settings apply at the next restart"

# --- N -> N+1: in place, under load --------------------------------------------------------------
check_upgrade_in_place() {
  local name=apt-upgrade-in-place-same-pid-same-cloudflared-no-failed-request why sum creds
  sum=$(sha256sum "$CONFIG")
  creds=$(ls -la /etc/tunnel-agent/credentials | sha256sum)
  if [ ! -f /var/lib/tunnel-agent/routes.json ]; then
    fail $name "no state (/var/lib/tunnel-agent/routes.json) before the upgrade"
    return
  fi
  apt_in_place upgrade "$NEW_VERSION"
  why=$(kept_process)
  if [ "$APT_RC" -ne 0 ]; then
    fail $name "apt-get install (upgrade) exited $APT_RC (see upgrade/apt.txt)"
  elif [ "$(dpkg-query -W -f '${Version}' tunnel-agent)" != "$NEW_VERSION" ]; then
    fail $name "installed version is $(dpkg-query -W -f '${Version}' tunnel-agent)"
  elif [ -n "$why" ]; then
    fail $name "$why"
  elif ! agent_version_is "$NEW_AGENT_VERSION"; then
    fail $name "/status agent.version is '$(status_get 'd["agent"]["version"]')', want $NEW_AGENT_VERSION"
  elif [ "$(status_get 'd["agent"]["upgrades"]')" != 1 ] ||
    [ "$(status_get 'd["agent"]["last_upgrade"]["result"]')" != completed ]; then
    fail $name "/status agent: $(status_get 'd["agent"]'), want upgrades 1, last_upgrade completed"
  elif ! metric_is completed 1 upgrade; then
    fail $name "no tunnel_agent_upgrades_total{result=\"completed\"} 1 in /metrics"
  elif ! grep -q -F "$NEW_AGENT_VERSION" "$OUT/upgrade/journal.txt"; then
    fail $name "the journal does not name the new version $NEW_AGENT_VERSION"
  elif ! apt_said upgrade "re-executing the running agent in place" || ! apt_said upgrade "$UNIT_CHANGED_NOTE"; then
    fail $name "postinst did not say it re-executes in place and that the unit changed (see upgrade/apt.txt)"
  elif [ "$(sha256sum "$CONFIG")" != "$sum" ] || [ "$(ls -la /etc/tunnel-agent/credentials | sha256sum)" != "$creds" ]; then
    fail $name "the upgrade changed $CONFIG or /etc/tunnel-agent/credentials"
  elif grep -q -i conffile "$OUT/upgrade/apt.txt"; then
    fail $name "the upgrade asked about a conffile (see upgrade/apt.txt)"
  elif [ ! -f /var/lib/tunnel-agent/routes.json ]; then
    fail $name "state lost across the upgrade"
  else
    pass $name
  fi
}

# --- N+1 -> N+2 (broken): rolled back, the tunnel untouched, apt succeeds ------------------------
check_upgrade_rollback() {
  local name=apt-upgrade-broken-binary-rolls-back why
  apt_in_place rollback "$BROKEN_VERSION"
  why=$(kept_process)
  if [ "$APT_RC" -ne 0 ]; then
    fail $name "a refused upgrade failed the apt transaction: exit $APT_RC (see rollback/apt.txt)"
  elif [ -n "$why" ]; then
    fail $name "$why"
  elif ! agent_version_is "$NEW_AGENT_VERSION"; then
    fail $name "/status agent.version is '$(status_get 'd["agent"]["version"]')', want still $NEW_AGENT_VERSION"
  elif [ "$(status_get 'd["agent"]["last_upgrade"]["result"]')" != rolled-back ] ||
    [ "$(status_get 'd["agent"]["last_upgrade"]["error"]')" = null ]; then
    fail $name "/status agent: $(status_get 'd["agent"]'), want last_upgrade rolled-back with an error"
  elif ! metric_is rolled-back 1 rollback; then
    fail $name "no tunnel_agent_upgrades_total{result=\"rolled-back\"} 1 in /metrics"
  elif ! grep -q -i -E 'roll(ed|ing)?[ -]?back' "$OUT/rollback/journal.txt"; then
    fail $name "the journal does not say it rolled back (see rollback/journal.txt)"
  elif ! apt_said rollback "the previous version keeps serving" || ! apt_said rollback "systemctl restart tunnel-agent"; then
    fail $name "postinst did not say the previous version keeps serving and how to restart (see rollback/apt.txt)"
  elif apt_said rollback "$UNIT_CHANGED_NOTE"; then
    fail $name "postinst said the unit changed, but N+1 and N+2 ship the same unit"
  else
    say "rollback: $(status_get 'd["agent"]["last_upgrade"]["error"]')"
    pass $name
  fi
}

# --- N+2 -> N: a downgrade takes the same path ---------------------------------------------------
check_downgrade_in_place() {
  local name=apt-downgrade-in-place why
  apt_in_place downgrade "$OLD_VERSION" --allow-downgrades
  why=$(kept_process)
  if [ "$APT_RC" -ne 0 ]; then
    fail $name "apt-get install (downgrade) exited $APT_RC (see downgrade/apt.txt)"
  elif [ -n "$why" ]; then
    fail $name "$why"
  elif ! agent_version_is "$OLD_AGENT_VERSION"; then
    fail $name "/status agent.version is '$(status_get 'd["agent"]["version"]')', want $OLD_AGENT_VERSION"
  elif [ "$(status_get 'd["agent"]["last_upgrade"]["result"]')" != completed ]; then
    fail $name "/status agent: $(status_get 'd["agent"]'), want last_upgrade completed"
  elif ! apt_said downgrade "$UNIT_CHANGED_NOTE"; then
    fail $name "postinst did not say the unit changed (N's unit lacks N+1's added setting; see downgrade/apt.txt)"
  else
    pass $name
  fi
}

# --- systemctl restart still restarts: a new process, a new cloudflared, no upgrade history -------
check_restart_after_upgrades() {
  local name=systemctl-restart-after-in-place-upgrades pid cf
  pid=$(prop MainPID)
  cf=$(cloudflared_pid) || cf=none
  if ! systemctl restart $UNIT; then
    fail $name "systemctl restart failed: $(prop ActiveState) $(prop StatusText)"
  elif ! wait_for 60 answers http://127.0.0.1:2000/ready 200; then
    fail $name "/ready not 200 after the restart"
  elif ! restarted_from "$pid"; then
    fail $name "MainPID $pid -> $(prop MainPID), state $(prop ActiveState)"
  elif [ "$(cloudflared_pid || echo none)" = "$cf" ]; then
    fail $name "cloudflared (pid $cf) survived a restart"
  elif ! agent_version_is "$OLD_AGENT_VERSION" || [ "$(status_get 'd["agent"]["upgrades"]')" != 0 ]; then
    fail $name "/status agent: $(status_get 'd["agent"]'), want $OLD_AGENT_VERSION with 0 upgrades"
  elif ! serves green; then
    fail $name "not serving after the restart"
  else
    pass $name
  fi
}

# --- an enabled unit that is not running is started on upgrade, as before -------------------------
# These two check the package alone: /status's top-level version, which every agent has.
check_upgrade_starts_stopped_unit() {
  local name=apt-upgrade-starts-an-enabled-stopped-unit out
  systemctl stop $UNIT
  if ! out=$(apt-get install -y "tunnel-agent=$NEW_VERSION" </dev/null 2>&1); then
    fail $name "apt-get install exited non-zero: $out"
  elif ! wait_for 60 answers http://127.0.0.1:2000/ready 200 || ! is_state active; then
    fail $name "not started by the upgrade: $(prop ActiveState) $(prop StatusText)"
  elif [ "$(status_get 'd["version"]')" != "$NEW_AGENT_VERSION" ]; then
    fail $name "/status version is $(status_get 'd["version"]'), want $NEW_AGENT_VERSION"
  elif [[ $out == *"re-executing"* ]]; then
    fail $name "postinst tried to re-execute a stopped agent: $out"
  else
    pass $name
  fi
}

# --- policy-rc.d forbidding restarts holds the re-execution too -----------------------------------
check_policy_rc_d_holds_the_agent() {
  local name=apt-upgrade-honours-policy-rc-d pid out
  pid=$(prop MainPID)
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  out=$(apt-get install -y --allow-downgrades "tunnel-agent=$OLD_VERSION" </dev/null 2>&1)
  local rc=$?
  rm -f /usr/sbin/policy-rc.d
  if [ $rc -ne 0 ]; then
    fail $name "apt-get install exited $rc: $out"
  elif [ "$(prop MainPID)" != "$pid" ] || [ "$(status_get 'd["version"]')" != "$NEW_AGENT_VERSION" ]; then
    fail $name "the agent changed: MainPID $pid -> $(prop MainPID), version $(status_get 'd["version"]')"
  elif [[ $out != *"policy-rc.d forbids"* ]]; then
    fail $name "postinst did not say policy-rc.d held the agent: $out"
  else
    pass $name
  fi
}
