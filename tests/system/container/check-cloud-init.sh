#!/bin/bash
# The system test's cloud-init scenario, run by systemtest.service inside a booted container
# whose only instructions were the shipped cloud-init example (rendered with test values) in
# the NoCloud seed: did cloud-init add the signed repository, install the pinned packages from
# it, and did the service come up with both tokens from (fake) Secret Manager?
set -uo pipefail
. /srv/systemtest/lib.sh
: >"$RESULTS"

CONFIG=/etc/tunnel-agent/agent.toml
. $ST/cloud-init.env # INTERNAL_TOKEN, TUNNEL_TOKEN (in fake Secret Manager), PKG_VERSION (pinned)
GCP=$ST/gcp

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

check_installed_from_the_repository() {
  local name=apt-source-and-pinned-packages-from-cloud-init list
  list=$(grep -l 'file:/srv/systemtest/apt' /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)
  if [ -z "$list" ]; then
    fail $name "cloud-init wrote no apt source for the repository: $(ls /etc/apt/sources.list.d/)"
  elif ! grep -q 'signed-by=/' "$list"; then
    fail $name "the source is not bound to its key (signed-by): $(cat "$list")"
  elif [ "$(dpkg-query -W -f '${Version}' tunnel-agent 2>/dev/null)" != "$PKG_VERSION" ]; then
    fail $name "tunnel-agent $(dpkg-query -W -f '${Version}' tunnel-agent 2>/dev/null), want the pinned $PKG_VERSION"
  elif [ "$(dpkg-query -W -f '${Version}' cloudflared 2>/dev/null)" != 0.0.0+systemtest ]; then
    # The repository also holds a newer cloudflared: the pin decides.
    fail $name "cloudflared $(dpkg-query -W -f '${Version}' cloudflared 2>/dev/null), want the pinned 0.0.0+systemtest"
  elif ! apt-cache policy tunnel-agent | grep -q 'file:/srv/systemtest/apt'; then
    fail $name "apt does not know tunnel-agent from the repository: $(apt-cache policy tunnel-agent | tr '\n' ' ')"
  else
    cp "$list" "$OUT/apt-source.list"
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
    fail $name "cloudflared never connected"
  elif ! grep -q 'secrets/internal-token/versions/latest:access 200' "$GCP/requests" ||
    ! grep -q 'secrets/tunnel-token/versions/latest:access 200' "$GCP/requests"; then
    fail $name "the tokens did not come from Secret Manager: $(tr '\n' ' ' <"$GCP/requests")"
  elif [ -e /etc/tunnel-agent/credentials ] && [ -n "$(ls -A /etc/tunnel-agent/credentials)" ]; then
    fail $name "secret files on disk: $(ls -A /etc/tunnel-agent/credentials)"
  else
    cp "$GCP/requests" "$OUT/gcp-requests.txt"
    pass $name
  fi
}

# The inline-secret variant, rendered on the host with tokens full of YAML's special
# characters: valid for cloud-init's schema, and each secret file decodes to the exact token.
check_inline_variant() {
  local name=inline-secret-example-survives-yaml-special-characters out
  if ! cloud-init schema --config-file $ST/inline-user-data >"$OUT/inline-schema.txt" 2>&1; then
    fail $name "cloud-init schema: $(tr '\n' ' ' <"$OUT/inline-schema.txt")"
  elif ! cloud-init schema --config-file /var/lib/cloud/seed/nocloud/user-data >"$OUT/schema.txt" 2>&1; then
    fail $name "the shipped example fails cloud-init schema: $(tr '\n' ' ' <"$OUT/schema.txt")"
  elif ! out=$(python3 - <<'EOF' 2>&1); then
import base64, yaml
seed = yaml.safe_load(open("/srv/systemtest/inline-user-data"))
files = {f["path"]: f for f in seed["write_files"]}
for path, want in [("/etc/tunnel-agent/credentials/internal-token", "/srv/systemtest/inline-internal-token"),
                   ("/etc/tunnel-agent/credentials/tunnel-token", "/srv/systemtest/inline-tunnel-token")]:
    f = files[path]
    assert f.get("encoding") == "b64", f"{path}: encoding {f.get('encoding')!r}"
    got = base64.b64decode(f["content"])
    assert got == open(want, "rb").read(), f"{path}: decodes to {got!r}"
EOF
    fail $name "$out"
  else
    pass $name
  fi
}

check_cloud_init_finished
check_installed_from_the_repository
check_installed_by_cloud_init
check_service_up
check_config_in_effect
check_inline_variant
finish
