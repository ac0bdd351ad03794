#!/bin/bash
# The system test's main scenario, run by systemtest.service inside a booted Debian container:
# install the package from the signed apt repository, then drive tunnel-agent.service through
# start, reload, watchdog, upgrades in place (through apt: upgrade, rollback, downgrade), restart,
# stop and purge with real systemd, recording one result line per check.
set -uo pipefail
. /srv/systemtest/lib.sh
. /srv/systemtest/upgrade.sh
: >"$RESULTS"

# OLD_VERSION, NEW_VERSION, BROKEN_VERSION: tunnel-agent's three packages in the repository;
# OLD_AGENT_VERSION, NEW_AGENT_VERSION: the versions N's and N+1's binaries report.
. $ST/versions.env
FAKE_CF_VERSION=0.0.0+systemtest
CONFIG=/etc/tunnel-agent/agent.toml
ROUTES=/etc/tunnel-agent/routes.json
GCP=/run/systemtest/gcp
INTERNAL_TOKEN=system-test-internal-token-5bd2
# Shaped like a connector token (base64 of {"a","t","s"}): the fake, like cloudflared, exits 255
# on anything else.
TUNNEL_TOKEN=eyJhIjoiMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYiLCJ0IjoiNmZmNDJhZTItNzY1ZC00YWRmLTgxMTItMzFjNTVjMTU1MWVmIiwicyI6ImMzbHpkR1Z0TFhSbGMzUXRkSFZ1Ym1Wc0xYUnZhMlZ1TFRreFkyVXVMaTQ9In0=

via_proxy() { # HOST PATH [curl args]: the body; the auth header carries the internal token
  curl -s --max-time 5 -H "Host: $1" -H "X-Internal-Auth-Token: $INTERNAL_TOKEN" "${@:3}" "http://127.0.0.1:8080$2"
}
serves() { [ "$(via_proxy app.systemtest /color)" = "$1" ]; }
status_says() { [[ $(prop StatusText) == *"$1"* ]]; }
load_count_at_least() { [ "$(grep -c "$1" "$OUT/reload-load.txt")" -ge "$2" ]; }
restarted_from() { [ "$(prop MainPID)" != "$1" ] && [ "$(prop MainPID)" != 0 ] && is_state active; }

# The routes, in the seed's routes.json format: app.systemtest to the "blue" or "green" upstream.
write_routes() { # UPSTREAM_PORT
  printf '{"app.systemtest": "http://127.0.0.1:%s"}\n' "$1" >"$ROUTES.tmp"
  mv "$ROUTES.tmp" "$ROUTES"
}

# The configuration under test: the internal token from (fake) Secret Manager, the tunnel token
# from a credential file, routes from a file (kept as last good state), the (fake) cloudflared.
write_config() {
  cat >"$CONFIG.tmp" <<EOF
[agent]
shutdown_grace = "10s"
boot_timeout = "120s"

[gcp]
metadata_url = "http://127.0.0.1:8930"
secret_manager_endpoint = "http://127.0.0.1:8930"

[secrets.internal_token]
source = "gcp-secret-manager"
name = "projects/system-test/secrets/internal-token/versions/latest"

[secrets.tunnel_token]
source = "file"
path = "secret_tunnel-token"

[proxy]
listen = "127.0.0.1:8080"
auth_secret = "internal_token"

[health]
listen = "0.0.0.0:2000"

[routes]
source = "file"
file = "$ROUTES"

[cloudflared]
enabled = true
token_secret = "tunnel_token"
grace_period = "5s"
EOF
  mv "$CONFIG.tmp" "$CONFIG"
}

# --- fixtures: upstreams and the fake metadata server / Secret Manager -------------------------
mkdir -p /run/systemtest/www/blue /run/systemtest/www/green "$GCP/secrets"
printf blue >/run/systemtest/www/blue/color
printf green >/run/systemtest/www/green/color
printf '%s' "$INTERNAL_TOKEN" >"$GCP/secrets/internal-token"
systemd-run -q --unit=upstream-blue python3 -m http.server --bind 127.0.0.1 --directory /run/systemtest/www/blue 9001
systemd-run -q --unit=upstream-green python3 -m http.server --bind 127.0.0.1 --directory /run/systemtest/www/green 9002
systemd-run -q --unit=fake-gcp $ST/fake-gcp --listen 127.0.0.1:8930 --control "$GCP"
if ! wait_for 20 answers http://127.0.0.1:9001/color 200 || ! wait_for 20 answers http://127.0.0.1:9002/color 200 ||
  ! wait_for 20 answers http://127.0.0.1:8930/ 404; then
  fail fixtures "the upstreams or the fake Secret Manager did not come up"
  finish
  exit 0
fi

# --- 0. the repository: signed, checked ---------------------------------------------------------
# apt with only the given source list, and lists and archives of its own in DIR, for the
# negative checks.
apt_with() { # DIR SOURCE_LINE APT-GET-ARGS...
  local dir=$1
  mkdir -p "$dir/lists/partial" "$dir/archives/partial"
  echo "$2" >"$dir/sources.list"
  shift 2
  apt-get -o Dir::Etc::SourceList="$dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent \
    -o Dir::State::Lists="$dir/lists" -o Dir::Cache::Archives="$dir/archives" "$@"
}

check_repository_is_verified() {
  local name=apt-repository-signature-and-checksums out
  if ! out=$(apt-get update 2>&1); then
    fail $name "apt-get update failed: $out"
    return
  fi
  echo "$out" >"$OUT/apt-update.txt"
  # The same repository with a key it was not signed with: apt refuses it.
  : >/tmp/empty-keyring.gpg
  if out=$(apt_with /tmp/apt-wrong-key "deb [signed-by=/tmp/empty-keyring.gpg] file:$ST/apt stable main" update 2>&1) ||
    [[ $out != *NO_PUBKEY* && $out != *"not signed"* ]]; then
    fail $name "apt accepted the repository with the wrong key: $out"
    return
  fi
  # A package that differs from the checksum in the signed index: apt refuses to fetch it.
  cp -a $ST/apt /tmp/tampered
  local deb
  deb=$(ls /tmp/tampered/pool/main/tunnel-agent_"$OLD_VERSION"_*.deb)
  printf 'x' >>"$deb"
  (
    cd /tmp
    apt_with /tmp/apt-tampered "deb [signed-by=/etc/apt/keyrings/tunnel-agent.gpg] file:/tmp/tampered stable main" \
      update &&
      apt_with /tmp/apt-tampered "deb [signed-by=/etc/apt/keyrings/tunnel-agent.gpg] file:/tmp/tampered stable main" \
        install -y --download-only "tunnel-agent=$OLD_VERSION" </dev/null
  ) >"$OUT/apt-tampered.txt" 2>&1
  local rc=$?
  if [ $rc -eq 0 ] || ! grep -q -i -e 'Hash Sum mismatch' -e 'unexpected size' "$OUT/apt-tampered.txt"; then
    fail $name "apt fetched a package that differs from the signed index (rc=$rc, see apt-tampered.txt)"
  else
    pass $name
  fi
}

# --- 1. install without a config: enabled, inactive by condition, not failed -------------------
check_install_without_config() {
  local name=package-install-without-config out
  # As a fleet pins it: exact versions from the repository.
  if ! out=$(apt-get install -y "tunnel-agent=$OLD_VERSION" "cloudflared=$FAKE_CF_VERSION" </dev/null 2>&1); then
    fail $name "apt-get install failed: $out"
    return
  fi
  echo "$out" >"$OUT/apt-install.txt"
  if [ "$(systemctl is-enabled $UNIT)" != enabled ]; then
    fail $name "unit is $(systemctl is-enabled $UNIT), want enabled"
  elif [ "$(prop ActiveState)" != inactive ] || [ "$(prop ConditionResult)" != no ]; then
    fail $name "want inactive with ConditionResult=no, got $(prop ActiveState) ConditionResult=$(prop ConditionResult)"
  elif [ ! -d /etc/tunnel-agent/credentials ] || [ "$(stat -c %a /etc/tunnel-agent/credentials)" != 700 ]; then
    fail $name "/etc/tunnel-agent/credentials missing or not mode 0700"
  else
    pass $name
  fi
}

check_unit_verifies() {
  local name=unit-verify-installed out
  # man is not installed in the container: the man page is checked by lintian on the host.
  systemd-analyze security --no-pager $UNIT >"$OUT/security.txt" 2>&1
  if out=$(systemd-analyze verify --man=no $UNIT 2>&1) && [ -z "$out" ]; then
    pass $name
  else
    fail $name "systemd-analyze verify: $out"
  fi
}

# --- 2. start: activating while a secret is unavailable, active only after READY=1 -------------
check_start_waits_for_ready() {
  local name=start-active-only-after-ready
  install -d -m 0700 /etc/tunnel-agent/credentials
  printf '%s\n' "$TUNNEL_TOKEN" >/etc/tunnel-agent/credentials/tunnel-token
  chmod 0600 /etc/tunnel-agent/credentials/tunnel-token
  write_routes 9001
  write_config
  touch "$GCP/hold" # Secret Manager answers 503 until this file goes away
  systemctl start --no-block $UNIT
  if ! wait_for 30 status_says 'waiting for secret'; then
    fail $name "no 'waiting for secret' status while Secret Manager is down: state=$(prop ActiveState) status=$(prop StatusText)"
    rm -f "$GCP/hold"
    return
  fi
  local state ready
  state=$(prop ActiveState)
  ready=$(http_code http://127.0.0.1:2000/ready)
  rm -f "$GCP/hold"
  if [ "$state" != activating ]; then
    fail $name "state is $state while the agent waits for a secret, want activating"
  elif [ "$ready" = 200 ]; then
    fail $name "/ready answered 200 before the agent was ready"
  elif ! wait_for 60 is_state active; then
    fail $name "not active 60 s after Secret Manager came back: $(prop ActiveState) $(prop StatusText)"
  else
    say "status while waiting: activating; after READY=1: $(prop ActiveState) ($(prop StatusText))"
    pass $name
  fi
}

check_ready_answers() {
  local name=ready-on-2000
  if wait_for 30 answers http://127.0.0.1:2000/ready 200; then
    curl -s http://127.0.0.1:2000/ready >"$OUT/ready.json"
    curl -s http://127.0.0.1:2000/status >"$OUT/status.json"
    pass $name
  else
    fail $name "/ready: $(curl -s http://127.0.0.1:2000/ready)"
  fi
}

check_proxy_serves() {
  local name=proxy-routes-and-auth code
  code=$(http_code http://127.0.0.1:8080/color -H 'Host: app.systemtest')
  if ! serves blue; then
    fail $name "app.systemtest/color gave '$(via_proxy app.systemtest /color)', want blue"
  elif [ "$code" != 401 ]; then
    fail $name "a request without the internal token got $code, want 401"
  else
    pass $name
  fi
}

# --- 3. the journal: structured fields, cloudflared's lines, no secret values ------------------
check_journal_fields() {
  local name=journal-structured-fields
  journalctl -u $UNIT --no-pager -o json >"$OUT/journal-fields.json"
  # tracing-journald: the message; each event field as F_<NAME>; TARGET; PRIORITY (info = 5).
  if python3 - "$OUT/journal-fields.json" <<'EOF'; then
import json, sys
entries = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# The message carries the address for the default output; the field keeps it for -o json.
up = [e for e in entries if e.get("MESSAGE", "").startswith("proxy up on ")]
assert up, "no 'proxy up on ADDR' entry"
e = up[-1]
assert e.get("F_LISTEN") == "127.0.0.1:8080", f"F_LISTEN={e.get('F_LISTEN')!r}"
assert e["MESSAGE"] == "proxy up on 127.0.0.1:8080", e["MESSAGE"]
assert e.get("SYSLOG_IDENTIFIER") == "tunnel-agent", e.get("SYSLOG_IDENTIFIER")
assert e.get("PRIORITY") == "5", e.get("PRIORITY")
assert e.get("TARGET", "").startswith("tunnel_agent"), e.get("TARGET")
EOF
    pass $name
  else
    fail $name "no journald-native entry 'proxy up' with F_LISTEN, TARGET, PRIORITY fields"
  fi
}

check_journal_cloudflared_lines() {
  local name=journal-cloudflared-lines
  if wait_for 20 journal_has_cloudflared_line 'Registered tunnel connection'; then
    pass $name
  else
    fail $name "no cloudflared line (TARGET=cloudflared, 'Registered tunnel connection') in the journal"
  fi
}

check_no_secret_in_logs() {
  local name=no-secrets-in-journal-or-argv pid
  pid=$(cloudflared_pid) || true
  # To a file first: `journalctl | grep -q` under pipefail fails on the match it is looking for.
  journalctl -b --no-pager -o verbose >"$OUT/journal-verbose.txt"
  if grep -q -e "$INTERNAL_TOKEN" -e "$TUNNEL_TOKEN" "$OUT/journal-verbose.txt"; then
    fail $name "a secret value appears in the journal"
  elif [ -z "$pid" ]; then
    fail $name "cloudflared is not running in the unit's cgroup"
  elif [[ $(tr '\0' ' ' <"/proc/$pid/cmdline") == *"$INTERNAL_TOKEN"* || $(tr '\0' ' ' <"/proc/$pid/cmdline") == *"$TUNNEL_TOKEN"* ]]; then
    fail $name "a secret value appears in cloudflared's argv"
  else
    pass $name
  fi
}

# --- 3c. no core file carries a secret; cloudflared gets only what it needs ---------------------
# LimitCORE=0 in the unit, the agent non-dumpable (the kernel then gives its /proc/PID files to
# root), and cloudflared's environment an allow-list (agent/tunnel/mod.rs, PASSED_ENV), plus
# HTTP_PROXY and HTTPS_PROXY naming the agent's own proxy and nothing else
# (`cloudflared.remote_ingress = "via-proxy"`, the default: tunnel::egress_proxy_env).
check_no_core_and_a_scrubbed_child() {
  local name=no-core-dumps-agent-not-dumpable-child-env-scrubbed pid cf extra
  pid=$(prop MainPID)
  cf=$(cloudflared_pid) || true
  if [ -n "$cf" ]; then
    tr '\0' '\n' <"/proc/$cf/environ" >"$OUT/cloudflared-environ.txt"
    extra=$(grep -v -E '^(PATH|LANG|LC_ALL|TZ|SSL_CERT_FILE|SSL_CERT_DIR|HOME|TUNNEL_TOKEN)=|^HTTPS?_PROXY=http://127\.0\.0\.1:8080$' \
      "$OUT/cloudflared-environ.txt" | cut -d= -f1 | tr '\n' ' ' || true)
    # Both proxy variables are there: a missing one would let that scheme go around the proxy.
    for var in HTTP_PROXY HTTPS_PROXY; do
      grep -qx "$var=http://127.0.0.1:8080" "$OUT/cloudflared-environ.txt" || extra="$extra(no $var=http://127.0.0.1:8080) "
    done
  fi
  if [ "$(prop LimitCORE)" != 0 ] || [ "$(prop LimitCORESoft)" != 0 ]; then
    fail $name "LimitCORE=$(prop LimitCORE) LimitCORESoft=$(prop LimitCORESoft), want 0"
  elif ! grep -Eq '^Max core file size +0 +0 ' "/proc/$pid/limits"; then
    fail $name "the agent's core limit is not 0: $(grep 'core file' "/proc/$pid/limits")"
  elif [ "$(stat -c %u "/proc/$pid/status")" != 0 ]; then
    fail $name "the agent is dumpable: /proc/$pid/status belongs to uid $(stat -c %u "/proc/$pid/status")"
  elif [ -z "$cf" ]; then
    fail $name "cloudflared is not running in the unit's cgroup"
  elif [ -n "$extra" ]; then
    fail $name "cloudflared's environment is not what it needs: $extra"
  else
    pass $name
  fi
}

# --- 4. reload with a changed route, under load: the new route serves, nothing fails ------------
check_reload_changed_route() {
  local name=reload-changed-route-no-failed-requests rc
  rm -f /run/systemtest/stop-load
  (
    while [ ! -e /run/systemtest/stop-load ]; do
      curl -s --max-time 5 -H 'Host: app.systemtest' -H "X-Internal-Auth-Token: $INTERNAL_TOKEN" \
        -w ' %{http_code}\n' "http://127.0.0.1:8080/color?n=[1-20]"
    done
  ) >"$OUT/reload-load.txt" 2>&1 &
  local load=$!
  wait_for 10 load_count_at_least '^blue 200$' 20
  write_routes 9002
  systemctl reload $UNIT
  rc=$?
  wait_for 10 serves green
  local switched=$?
  # Keep the load going a little past the switch, so requests on both sides are counted.
  wait_for 10 load_count_at_least '^green 200$' 20
  touch /run/systemtest/stop-load
  wait $load
  local total bad blue green
  total=$(grep -c . "$OUT/reload-load.txt")
  bad=$(grep -v -c -E '^(blue|green) 200$' "$OUT/reload-load.txt")
  blue=$(grep -c '^blue 200$' "$OUT/reload-load.txt")
  green=$(grep -c '^green 200$' "$OUT/reload-load.txt")
  say "reload under load: $total requests, $blue blue, $green green, $bad failed"
  if [ $rc -ne 0 ]; then
    fail $name "systemctl reload exited $rc"
  elif [ $switched -ne 0 ]; then
    fail $name "the new upstream never served after the reload"
  elif [ "$bad" -ne 0 ] || [ "$blue" -eq 0 ] || [ "$green" -eq 0 ]; then
    fail $name "$total requests: $blue blue, $green green, $bad failed (see reload-load.txt)"
  else
    pass $name
  fi
}

# --- 5. reload with a broken config: the reload fails loudly, the old config keeps serving ------
check_reload_broken_config() {
  local name=reload-broken-config-rejected pid rc c
  pid=$(prop MainPID)
  c=$(cursor)
  sed -i 's/^auth_secret = "internal_token"/auth_secret = "internal_tokn"/' "$CONFIG"
  systemctl reload $UNIT 2>"$OUT/reload-broken.txt"
  rc=$?
  journal_since "$c" >"$OUT/reload-broken-journal.txt"
  if [ $rc -eq 0 ]; then
    fail $name "systemctl reload succeeded with a broken config"
  elif ! grep -q 'proxy.auth_secret: no secret named "internal_tokn"' "$OUT/reload-broken-journal.txt"; then
    fail $name "no journal line naming proxy.auth_secret (see reload-broken-journal.txt)"
  elif [ "$(prop ActiveState)" != active ] || [ "$(prop MainPID)" != "$pid" ]; then
    fail $name "the service did not stay up: $(prop ActiveState), MainPID $pid -> $(prop MainPID)"
  elif ! serves green; then
    fail $name "the previous config stopped serving"
  else
    say "journal: $(grep -m1 'proxy.auth_secret' "$OUT/reload-broken-journal.txt")"
    pass $name
  fi
  write_config
}

# --- 6. watchdog: a stopped agent is killed and restarted by systemd ---------------------------
check_watchdog() {
  local name=watchdog-restarts-hung-agent pid restarts c t0 elapsed
  pid=$(prop MainPID)
  restarts=$(prop NRestarts)
  c=$(cursor)
  t0=$(now_ms)
  kill -STOP "$pid"
  if ! wait_for 90 restarted_from "$pid"; then
    kill -CONT "$pid" 2>/dev/null
    fail $name "not restarted 90 s after SIGSTOP: $(prop ActiveState) MainPID=$(prop MainPID)"
    return
  fi
  elapsed=$(($(now_ms) - t0))
  journal_since "$c" >"$OUT/watchdog-journal.txt"
  if ! grep -q 'Watchdog timeout' "$OUT/watchdog-journal.txt"; then
    fail $name "restarted, but not by the watchdog (see watchdog-journal.txt)"
  elif [ "$(prop NRestarts)" -le "$restarts" ]; then
    fail $name "NRestarts did not grow ($restarts -> $(prop NRestarts))"
  elif kill -0 "$pid" 2>/dev/null; then
    fail $name "the hung agent (pid $pid) is still alive"
  elif ! wait_for 30 answers http://127.0.0.1:2000/ready 200; then
    fail $name "/ready not 200 after the restart"
  elif [ "$(unit_pids | wc -l)" -ne 2 ]; then
    fail $name "want the agent and one cloudflared in the cgroup, got: $(unit_pids | tr '\n' ' ')"
  else
    say "watchdog: restarted after ${elapsed} ms (WatchdogSec=$(prop WatchdogUSec))"
    pass $name
  fi
}

# --- 7. upgrades through apt: in place (same process), rolled back, downgraded (upgrade.sh) -----

# --- 7b. cloudflared under the packaged unit cannot read the credential file ------------------
# It shares the agent's UID, so only the agent's Landlock sandbox (agent/tunnel/sandbox.rs, and
# the unit's SystemCallFilter= allowing the Landlock calls) keeps it out. The fake cloudflared,
# run through a link in a control directory, tries to read the tunnel token's credential file
# and to create a file in the state directory, and records what it got. The control directory
# is writable for the unit (a drop-in) and open to cloudflared (`sandbox_allow`).
PROBE=/run/systemtest/cf-probe
DROPIN=/run/systemd/system/$UNIT.d/cf-probe.conf
probe_recorded() { grep -q '^probe .* write ' "$PROBE/events" 2>/dev/null; }
restart_with_config() {
  systemctl daemon-reload
  systemctl restart $UNIT && wait_for 60 answers http://127.0.0.1:2000/ready 200
}
check_cloudflared_confined() {
  local name=cloudflared-cannot-read-credentials-or-write-state denied
  # systemd-nspawn's own seccomp filter hides the Landlock syscalls from the container (EPERM:
  # the agent logs that the kernel offers none), so there is nothing to check here; on a VM the
  # unit allows them (SystemCallFilter=landlock_*) and tests/tunnel.rs checks the confinement.
  if journalctl -u $UNIT -b --no-pager -o cat | grep -q 'this kernel offers no Landlock'; then
    skip $name "no Landlock inside systemd-nspawn (its seccomp filter refuses the syscalls); tests/tunnel.rs covers the confinement"
    return
  fi
  install -d -m 1777 "$PROBE"
  : >"$PROBE/control"
  rm -f "$PROBE/events"
  ln -sf /usr/bin/cloudflared "$PROBE/cloudflared"
  printf '%s\n' /run/credentials/$UNIT/secret_tunnel-token >"$PROBE/probe_read"
  printf '%s\n' /var/lib/tunnel-agent >"$PROBE/probe_write"
  chmod 0644 "$PROBE"/*
  mkdir -p "$(dirname "$DROPIN")"
  printf '[Service]\nReadWritePaths=%s\n' "$PROBE" >"$DROPIN"
  write_config
  printf 'path = "%s/cloudflared"\nsandbox_allow = ["%s"]\n' "$PROBE" "$PROBE" >>"$CONFIG"
  if ! restart_with_config; then
    fail $name "not ready with cloudflared run from $PROBE: $(prop ActiveState) $(prop StatusText)"
  elif ! wait_for 20 probe_recorded; then
    fail $name "the fake cloudflared recorded no probe (events: $(cat "$PROBE/events" 2>/dev/null | tr '\n' ';'))"
  else
    cp "$PROBE/events" "$OUT/cf-probe-events.txt"
    denied=$(grep -c '^probe .* denied 13 ' "$PROBE/events")
    if grep -q '^probe .* ok ' "$PROBE/events"; then
      fail $name "cloudflared got through: $(grep '^probe .* ok ' "$PROBE/events" | tr '\n' ';')"
    elif [ "$denied" != 2 ]; then
      fail $name "want 2 probes denied with EACCES, got: $(grep '^probe' "$PROBE/events" | tr '\n' ';')"
    elif ls /var/lib/tunnel-agent/ | grep -q planted-by-cloudflared; then
      fail $name "a file was planted in the state directory"
    else
      pass $name
    fi
  fi
  rm -f "$DROPIN"
  write_config
  restart_with_config || say "not ready again after $name: $(prop ActiveState) $(prop StatusText)"
}

# --- 8. stop: one SIGTERM to cloudflared before the proxy stops, clean exit --------------------
check_stop_order() {
  local name=stop-cloudflared-before-proxy-clean-exit c rc
  c=$(cursor)
  systemctl stop $UNIT
  rc=$?
  journal_since "$c" >"$OUT/stop-journal.txt"
  # Line numbers of each step in the agent's own account of the shutdown.
  local shut sigterm cf_drain cf_stopped proxy
  shut=$(grep -n -m1 'shutting down' "$OUT/stop-journal.txt" | cut -d: -f1)
  sigterm=$(grep -n -m1 'stopping cloudflared (SIGTERM)' "$OUT/stop-journal.txt" | cut -d: -f1)
  cf_drain=$(grep -n -m1 'Initiating graceful shutdown' "$OUT/stop-journal.txt" | cut -d: -f1)
  cf_stopped=$(grep -n -m1 'cloudflared stopped' "$OUT/stop-journal.txt" | cut -d: -f1)
  proxy=$(grep -n -m1 'proxy stopped' "$OUT/stop-journal.txt" | cut -d: -f1)
  if [ $rc -ne 0 ] || [ "$(prop Result)" != success ] || [ "$(prop ExecMainStatus)" != 0 ]; then
    fail $name "stop rc=$rc Result=$(prop Result) ExecMainStatus=$(prop ExecMainStatus)"
  elif [ -z "$shut" ] || [ -z "$sigterm" ] || [ -z "$cf_drain" ] || [ -z "$cf_stopped" ] || [ -z "$proxy" ]; then
    fail $name "missing steps in the journal (see stop-journal.txt)"
  elif ! [ "$shut" -lt "$sigterm" ] || ! [ "$sigterm" -lt "$cf_drain" ] || ! [ "$cf_drain" -lt "$cf_stopped" ] ||
    ! [ "$cf_stopped" -lt "$proxy" ]; then
    fail $name "wrong order: shutting down@$shut SIGTERM@$sigterm drain@$cf_drain cloudflared-stopped@$cf_stopped proxy@$proxy"
  elif grep -q -e 'second SIGTERM' -e 'SIGKILL' "$OUT/stop-journal.txt"; then
    fail $name "cloudflared got a second SIGTERM or a SIGKILL (see stop-journal.txt)"
  elif ! python3 - "$c" <<'EOF'; then
import json, subprocess, sys
out = subprocess.run(["journalctl", "-u", "tunnel-agent.service", "--after-cursor", sys.argv[1], "-o", "json"],
                     capture_output=True, text=True, check=True).stdout
entries = [json.loads(l) for l in out.splitlines()]
stopped = [e for e in entries if str(e.get("MESSAGE", "")).startswith("proxy stopped")]
sys.exit(0 if stopped and stopped[-1].get("F_DRAINED") == "true" else 1)
EOF
    fail $name "no 'proxy stopped' entry with F_DRAINED=true"
  else
    pass $name
  fi
}

# --- 9. purge: state removed, the operator's config left alone ---------------------------------
check_purge() {
  local name=package-purge-removes-state out
  if ! out=$(apt-get purge -y tunnel-agent </dev/null 2>&1); then
    fail $name "apt-get purge failed: $out"
  elif [ -e /var/lib/tunnel-agent ] || [ -e /var/lib/private/tunnel-agent ]; then
    fail $name "state left after purge: $(ls -d /var/lib/tunnel-agent /var/lib/private/tunnel-agent 2>/dev/null)"
  elif [ -e /usr/lib/systemd/system/$UNIT ] || systemctl cat $UNIT >/dev/null 2>&1; then
    fail $name "the unit is still installed"
  elif [ ! -f "$CONFIG" ]; then
    fail $name "purge removed the operator's $CONFIG"
  else
    pass $name
  fi
}

check_repository_is_verified
check_install_without_config
check_unit_verifies
check_start_waits_for_ready
check_ready_answers
check_proxy_serves
check_journal_fields
check_journal_cloudflared_lines
check_no_secret_in_logs
check_no_core_and_a_scrubbed_child
check_reload_changed_route
check_reload_broken_config
check_watchdog
check_upgrade_in_place
check_upgrade_rollback
check_downgrade_in_place
check_restart_after_upgrades
check_upgrade_starts_stopped_unit
check_policy_rc_d_holds_the_agent
check_cloudflared_confined
check_stop_order
check_purge
finish
