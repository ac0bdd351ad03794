#!/usr/bin/env bash
# Checks the Kubernetes manifests under packaging/kubernetes/, offline and without a cluster:
#
# 1. Schema: every manifest against the Kubernetes JSON schemas bundled in the PyPI package
#    kubernetes-validate (pinned in tests/kubernetes/requirements.txt), strict (an unknown field
#    fails), for the oldest and the newest Kubernetes this file names. A schema it cannot find
#    (an unknown kind or apiVersion) fails too: the validator only warns about that. Run without
#    network where this machine allows it (`unshare --net`), to prove the schemas are local.
#    Self-check first: a copy of a manifest with a misspelt field, and one with a misspelt kind,
#    must fail, so this step can fail.
# 2. Agreement with the agent (the debug build, $TUNNEL_AGENT_BIN or
#    $CARGO_TARGET_DIR/debug/tunnel-agent):
#    - active-standby.yaml: the ConfigMap's agent.toml passes `tunnel-agent check` as it is; the
#      probes' ports are the agent's health.listen port; the agent started with that file (only
#      its listen addresses, directories and cloudflared's metrics address moved to loopback/temp
#      ones, and tests/fakes/cloudflared as `cloudflared` in PATH) answers every probe path with
#      the documented code: a pod with no API server to elect on is a standby, so /healthz 200,
#      /ready 200, /active 503; never 404.
#    - gateway-data-plane.yaml: the container's env (Secret values replaced by test values)
#      passes `tunnel-agent check --from-env`; the probes' port is PROXY_CONFIG_ADDR's; the agent
#      started with `run --from-env` (the same env, PROXY_ADDR and PROXY_CONFIG_ADDR on loopback,
#      a base file for the directories, the health listener and cloudflared's metrics) answers
#      /healthz 200, /readyz 503 before a push and 200 after one.
#    Nothing leaves loopback: the Lease backend is pointed at a closed loopback port.
#
# Installs nothing. Skips, saying why, when the validator is missing (set KUBERNETES_VALIDATE_VENV
# to a venv holding it; .ci/run makes one) or the agent binary is missing (step 2 only).
# Called from tests/run-all.sh. Takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
say() { echo "[kubernetes] $*"; }
fail() {
  say "FAIL: $*"
  exit 1
}

venv=${KUBERNETES_VALIDATE_VENV:-/var/cache/tunnel-agent-ci/kubernetes-validate}
validator=$venv/bin/kubernetes-validate
py=$venv/bin/python3
if [ ! -x "$validator" ] || [ ! -x "$py" ]; then
  say "SKIPPED: $validator not found (python3 -m venv $venv && $venv/bin/pip install -r tests/kubernetes/requirements.txt; .ci/run does)"
  exit 0
fi
# The oldest Kubernetes the manifests are for (PodDisruptionBudget's unhealthyPodEvictionPolicy
# is GA in 1.31) and the newest schema set the pinned validator bundles.
k8s_versions=(1.31.0 1.37.0)
manifests=(packaging/kubernetes/*.yaml)

work=$(mktemp -d)
agent_pids=()
cleanup() {
  for pid in "${agent_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

offline=()
if unshare --net true 2>/dev/null; then
  offline=(unshare --net)
  say "validating with no network (unshare --net)"
else
  say "validating with the network present (unshare --net is not allowed here)"
fi

# The number of objects in a YAML stream (documents with a kind).
count_objects() {
  "$py" - "$1" <<'PY'
import sys, yaml
print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d and "kind" in d))
PY
}

# validate FILE: 0 only when every object passed strict validation for every version, with no
# error and no warning.
validate() {
  local file=$1 objects out version passed
  objects=$(count_objects "$file")
  for version in "${k8s_versions[@]}"; do
    if ! out=$("${offline[@]}" "$validator" --strict -k "$version" "$file" 2>&1); then
      echo "$out"
      return 1
    fi
    if grep -Eq '^(ERROR|WARN)' <<<"$out"; then
      echo "$out"
      return 1
    fi
    passed=$(grep -c '^INFO .* passed for resource' <<<"$out" || true)
    if [ "$passed" != "$objects" ]; then
      echo "$out"
      echo "$file: $passed of $objects objects passed for $version"
      return 1
    fi
  done
}

# 1. Schema, after showing that a broken manifest fails.
sed 's/readOnlyRootFilesystem:/readOnlyRootFilesytem:/' packaging/kubernetes/active-standby.yaml >"$work/typo.yaml"
grep -q readOnlyRootFilesytem "$work/typo.yaml" || fail "self-check: the typo was not made"
if validate "$work/typo.yaml" >"$work/typo.out"; then
  fail "self-check: a misspelt field (readOnlyRootFilesytem) passed validation"
fi
grep -q "'readOnlyRootFilesytem' was unexpected" "$work/typo.out" ||
  fail "self-check: the misspelt field failed, but not for the misspelling: $(cat "$work/typo.out")"
sed 's/^kind: PodDisruptionBudget/kind: PodDisruptionBudgt/' packaging/kubernetes/active-standby.yaml >"$work/kind.yaml"
if validate "$work/kind.yaml" >"$work/kind.out"; then
  fail "self-check: a misspelt kind (PodDisruptionBudgt) passed validation"
fi
say "self-check: a misspelt field and a misspelt kind fail"
for m in "${manifests[@]}"; do
  validate "$m" >"$work/out" || fail "$m: $(cat "$work/out")"
  say "$m: $(count_objects "$m") objects valid (strict) for Kubernetes ${k8s_versions[*]}"
done

# 2. Agreement with the agent.
bin=${TUNNEL_AGENT_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/tunnel-agent}
if [ ! -x "$bin" ]; then
  say "SKIPPED (agreement with the agent): $bin not found (cargo build, or set TUNNEL_AGENT_BIN)"
  exit 0
fi
command -v curl >/dev/null || fail "curl not found (apt-get install curl)"
mkdir -p "$work/bin"
ln -s "$repo/tests/fakes/cloudflared" "$work/bin/cloudflared"
test_path=$work/bin:/usr/bin:/bin

# Facts from the manifests, as shell assignments: the ConfigMap's agent.toml, each container's
# probes resolved to (path, containerPort), and the data plane's env.
"$py" - "$work" packaging/kubernetes/active-standby.yaml packaging/kubernetes/gateway-data-plane.yaml <<'PY' >"$work/facts.sh"
import shlex, sys, yaml
work, standby, plane = sys.argv[1:4]

def objects(path):
    return [d for d in yaml.safe_load_all(open(path)) if d]

def container(path):
    deps = [d for d in objects(path) if d["kind"] == "Deployment"]
    assert len(deps) == 1, f"{path}: one Deployment expected"
    cs = deps[0]["spec"]["template"]["spec"]["containers"]
    assert len(cs) == 1, f"{path}: one container expected"
    return cs[0]

def probes(prefix, c):
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    out = []
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in c:
            get = c[kind]["httpGet"]
            port = ports.get(get["port"], get["port"])
            out.append(f"{kind}:{get['path']}:{port}")
    print(f"{prefix}_probes={shlex.quote(' '.join(out))}")

cms = [d for d in objects(standby) if d["kind"] == "ConfigMap"]
open(f"{work}/agent.toml", "w").write(cms[0]["data"]["agent.toml"])
c = container(standby)
probes("standby", c)
print(f"standby_env={shlex.quote(' '.join(e['name'] for e in c.get('env', [])))}")

c = container(plane)
probes("plane", c)
print(f"plane_args={shlex.quote(' '.join(c.get('args', [])))}")
env = []
for e in c.get("env", []):
    if "value" in e:
        env.append(f"{e['name']}={e['value']}")
    else:
        env.append(f"{e['name']}=SECRET")
print(f"plane_env={shlex.quote(' '.join(env))}")
PY
# shellcheck source=/dev/null
. "$work/facts.sh"

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# A token the fake cloudflared accepts (base64 of a JSON object); not a real one.
test_tunnel_token=$(printf '{"a":"test","t":"test","s":"dGVzdA=="}' | base64 -w0)

# probe URL EXPECTED...: the status code, which must be one of EXPECTED.
probe() {
  local url=$1 code
  shift
  code=$(curl -s -o "$work/body" -w '%{http_code}' --max-time 2 "$url" || true)
  for want in "$@"; do [ "$code" = "$want" ] && return 0; done
  fail "$url answered $code ($(head -c 300 "$work/body" 2>/dev/null)), expected $*"
}

# wait_up URL: polls until the listener answers, for at most 10 s.
wait_up() {
  local i
  for i in $(seq 100); do
    curl -s -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  return 1
}

stop_agent() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  fail "the agent (pid $pid) did not exit within 10 s of SIGTERM"
}

# 2a. active-standby.yaml.
[ "$standby_env" = TUNNEL_TOKEN ] || fail "active-standby.yaml: the container's env is '$standby_env', expected TUNNEL_TOKEN (secrets.tunnel_token)"
(cd "$work" && env -i PATH="$test_path" TUNNEL_TOKEN="$test_tunnel_token" "$bin" check -c agent.toml) >"$work/check.out" 2>&1 ||
  fail "active-standby.yaml: tunnel-agent check on the ConfigMap's agent.toml: $(cat "$work/check.out")"
say "active-standby.yaml: $(cat "$work/check.out")"
health_port=$(sed -n 's/^listen = "0\.0\.0\.0:\([0-9]*\)".*/\1/p' "$work/agent.toml" | head -1)
[ -n "$health_port" ] || fail "active-standby.yaml: agent.toml has no health.listen on 0.0.0.0 (the kubelet probes the pod's IP)"
for p in $standby_probes; do
  [ "${p##*:}" = "$health_port" ] || fail "active-standby.yaml: $p is not on health.listen's port $health_port"
done

h=$(free_port)
x=$(free_port)
m=$(free_port)
mkdir -m 0777 "$work/run" "$work/state" # as an emptyDir is made
sed -e "s#^listen = \"0\.0\.0\.0:$health_port\"#listen = \"127.0.0.1:$h\"#" \
  -e "s#^listen = \"127\.0\.0\.1:8080\"#listen = \"127.0.0.1:$x\"#" \
  -e "s#\"/run/tunnel-agent\"#\"$work/run\"#" -e "s#\"/var/lib/tunnel-agent\"#\"$work/state\"#" \
  -e "s#^\[cloudflared\]#[cloudflared]\nmetrics = \"127.0.0.1:$m\"#" \
  "$work/agent.toml" >"$work/local.toml"
[ "$(diff "$work/agent.toml" "$work/local.toml" | grep -c '^>')" = 5 ] ||
  fail "active-standby.yaml: expected to move exactly 5 lines of agent.toml: $(diff "$work/agent.toml" "$work/local.toml")"
closed=$(free_port) # the Lease API: nothing listens there
env -i PATH="$test_path" TUNNEL_TOKEN="$test_tunnel_token" \
  KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT="$closed" \
  "$bin" run -c "$work/local.toml" >"$work/standby.log" 2>&1 &
agent_pids+=($!)
wait_up "http://127.0.0.1:$h/healthz" || fail "active-standby.yaml: the agent's health listener did not come up: $(tail -5 "$work/standby.log")"
for p in $standby_probes; do
  path=${p#*:}
  path=${path%:*}
  case $path in
  /healthz | /ready) probe "http://127.0.0.1:$h$path" 200 ;;
  /active) probe "http://127.0.0.1:$h$path" 503 ;;
  *) probe "http://127.0.0.1:$h$path" "(a path docs/health.md documents)" ;; # fails, with the code
  esac
  say "active-standby.yaml: ${p%%:*} $path answers as documented for a standby"
done
stop_agent "${agent_pids[-1]}"

# 2b. gateway-data-plane.yaml.
[ "$plane_args" = "run --from-env" ] || fail "gateway-data-plane.yaml: args are '$plane_args', expected 'run --from-env'"
plane_vars=()
for kv in $plane_env; do
  case $kv in
  TUNNEL_TOKEN=SECRET) plane_vars+=("TUNNEL_TOKEN=$test_tunnel_token") ;;
  PROXY_AUTH_TOKEN=SECRET) plane_vars+=("PROXY_AUTH_TOKEN=test-config-token") ;;
  *=SECRET) fail "gateway-data-plane.yaml: ${kv%%=*} comes from a Secret this test does not know" ;;
  *) plane_vars+=("$kv") ;;
  esac
done
env -i PATH="$test_path" "${plane_vars[@]}" "$bin" check --from-env >"$work/check.out" 2>&1 ||
  fail "gateway-data-plane.yaml: tunnel-agent check --from-env: $(cat "$work/check.out")"
say "gateway-data-plane.yaml: check --from-env: $(tr '\n' ' ' <"$work/check.out")"
config_port=$(printf '%s\n' "${plane_vars[@]}" | sed -n 's/^PROXY_CONFIG_ADDR=.*:\([0-9]*\)$/\1/p')
for p in $plane_probes; do
  [ "${p##*:}" = "$config_port" ] || fail "gateway-data-plane.yaml: $p is not on PROXY_CONFIG_ADDR's port $config_port"
done

h=$(free_port)
x=$(free_port)
c=$(free_port)
m=$(free_port)
rm -rf "$work/run" "$work/state"
mkdir -m 0777 "$work/run" "$work/state"
printf '[agent]\nruntime_dir = "%s"\nstate_dir = "%s"\n[health]\nlisten = "127.0.0.1:%s"\n[cloudflared]\nmetrics = "127.0.0.1:%s"\n' \
  "$work/run" "$work/state" "$h" "$m" >"$work/base.toml"
local_vars=()
for kv in "${plane_vars[@]}"; do
  case $kv in
  PROXY_ADDR=*) local_vars+=("PROXY_ADDR=127.0.0.1:$x") ;;
  PROXY_CONFIG_ADDR=*) local_vars+=("PROXY_CONFIG_ADDR=127.0.0.1:$c") ;;
  *) local_vars+=("$kv") ;;
  esac
done
# shellcheck disable=SC2086 # plane_args is two words
env -i PATH="$test_path" "${local_vars[@]}" "$bin" $plane_args -c "$work/base.toml" >"$work/plane.log" 2>&1 &
agent_pids+=($!)
wait_up "http://127.0.0.1:$c/healthz" || fail "gateway-data-plane.yaml: the config port did not come up: $(tail -5 "$work/plane.log")"
for p in $plane_probes; do
  path=${p#*:}
  path=${path%:*}
  case $path in
  /healthz) probe "http://127.0.0.1:$c$path" 200 ;;
  /readyz) probe "http://127.0.0.1:$c$path" 503 ;; # "no config loaded"
  *) probe "http://127.0.0.1:$c$path" "(a path docs/routing.md documents)" ;; # fails, with the code
  esac
  say "gateway-data-plane.yaml: ${p%%:*} $path answers as documented before a push"
done
curl -s -o "$work/body" -w '%{http_code}' --max-time 5 -X PUT -H 'Content-Type: application/json' \
  -H 'Authorization: Bearer test-config-token' \
  --data '{"version": 1, "rules": [{"hostnames": ["app.example.com"], "backends": [{"url": "http://127.0.0.1:9", "weight": 1}]}]}' \
  "http://127.0.0.1:$c/config" >"$work/code"
[ "$(cat "$work/code")" = 200 ] || fail "gateway-data-plane.yaml: PUT /config answered $(cat "$work/code"): $(cat "$work/body")"
# /readyz turns 200 once the table is applied and the (fake) tunnel has connected.
for i in $(seq 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$c/readyz")" = 200 ] && break
  [ "$i" = 100 ] && fail "gateway-data-plane.yaml: /readyz not 200 within 10 s of a push: $(tail -5 "$work/plane.log")"
  sleep 0.1
done
say "gateway-data-plane.yaml: /readyz answers 200 after a push, with the tunnel connected"
stop_agent "${agent_pids[-1]}"
say "ok"
