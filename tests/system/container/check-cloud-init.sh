#!/bin/bash
# The system test's cloud-init scenario, run by systemtest.service inside a booted container
# whose only instructions were the shipped cloud-init example (rendered with test values) in
# the NoCloud seed: did the service come up from cloud-init alone?
set -uo pipefail
. /srv/systemtest/lib.sh
: >"$RESULTS"

CONFIG=/etc/tunnel-agent/agent.toml
. $ST/cloud-init.env # INTERNAL_TOKEN, TUNNEL_TOKEN: the values rendered into the user-data

check_cloud_init_finished() {
  local name=cloud-init-ran-cleanly rc
  timeout 300 cloud-init status --wait >/dev/null
  rc=$?
  cloud-init status --long >"$OUT/cloud-init-status.txt" 2>&1
  cp /var/log/cloud-init-output.log "$OUT/" 2>/dev/null
  if [ $rc -ne 0 ]; then
    fail $name "cloud-init status exited $rc: $(tr '\n' ' ' <"$OUT/cloud-init-status.txt")"
  elif ! grep -q 'status: done' "$OUT/cloud-init-status.txt"; then
    fail $name "$(tr '\n' ' ' <"$OUT/cloud-init-status.txt")"
  else
    pass $name
  fi
}

check_installed_by_cloud_init() {
  local name=package-installed-over-cloud-init-config
  if [ "$(dpkg-query -W -f '${Status}' tunnel-agent 2>/dev/null)" != "install ok installed" ]; then
    fail $name "tunnel-agent is not installed"
  elif dpkg -S "$CONFIG" >/dev/null 2>&1; then
    fail $name "$CONFIG belongs to a package (dpkg would manage it)"
  elif ! python3 - "$CONFIG" <<'EOF'; then
import sys, yaml
seed = yaml.safe_load(open("/var/lib/cloud/seed/nocloud/user-data"))
want = next(f["content"] for f in seed["write_files"] if f["path"] == sys.argv[1])
sys.exit(0 if open(sys.argv[1]).read() == want else 1)
EOF
    fail $name "$CONFIG differs from what the user-data wrote"
  else
    pass $name
  fi
}

check_service_up() {
  local name=service-up-from-cloud-init-alone
  if ! wait_for 60 is_state active; then
    fail $name "tunnel-agent is $(prop ActiveState) ($(prop StatusText))"
  elif [ "$(systemctl is-enabled $UNIT)" != enabled ]; then
    fail $name "not enabled (the next boot would not start it)"
  elif ! wait_for 30 answers http://127.0.0.1:2000/ready 200; then
    fail $name "/ready: $(curl -s http://127.0.0.1:2000/ready)"
  else
    curl -s http://127.0.0.1:2000/ready >"$OUT/ready.json"
    pass $name
  fi
}

check_config_in_effect() {
  local name=user-data-config-in-effect with without
  # The example routes app.example.com to :3000, where nothing listens here: a 502 with the
  # token proves the route table and the token came from the user-data; 401 without it.
  with=$(http_code http://127.0.0.1:8080/ -H 'Host: app.example.com' -H "X-Internal-Auth-Token: $INTERNAL_TOKEN")
  without=$(http_code http://127.0.0.1:8080/ -H 'Host: app.example.com')
  if [ "$with" != 502 ] || [ "$without" != 401 ]; then
    fail $name "with the token: $with (want 502), without: $without (want 401)"
  elif ! wait_for 20 journal_has_cloudflared_line 'Registered tunnel connection'; then
    fail $name "cloudflared (started with the credential-file token) never connected"
  else
    pass $name
  fi
}

check_cloud_init_finished
check_installed_by_cloud_init
check_service_up
check_config_in_effect
finish
