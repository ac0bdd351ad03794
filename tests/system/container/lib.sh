# Helpers for the checks that run inside the booted container. Sourced, not executed.
#
# Each check records one line in /results/results.txt: `PASS name`, `FAIL name: reason` or
# `SKIP name: reason`; tests/system/run.sh on the host counts them.

ST=/srv/systemtest
OUT=/results
RESULTS=$OUT/results.txt
UNIT=tunnel-agent.service
export SYSTEMD_PAGER='' SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

say() { echo "[systemtest] $*"; }
pass() { echo "PASS $1" >>"$RESULTS"; say "PASS $1"; }
fail() { echo "FAIL $1: $2" >>"$RESULTS"; say "FAIL $1: $2"; }
skip() { echo "SKIP $1: $2" >>"$RESULTS"; say "SKIP $1: $2"; }

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# wait_for SECONDS COMMAND...: runs COMMAND every 100 ms until it succeeds; fails once SECONDS
# have passed. A poll with a deadline, never a fixed sleep.
wait_for() {
  local deadline=$(($(now_ms) + $1 * 1000))
  shift
  until "$@"; do
    [ "$(now_ms)" -lt "$deadline" ] || return 1
    sleep 0.1
  done
}

prop() { systemctl show -P "$1" "$UNIT"; }
is_state() { [ "$(prop ActiveState)" = "$1" ]; }

# http_code URL [curl args...]: the status code, or 000 when nothing answered.
http_code() {
  local url=$1
  shift
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@" "$url" || true
}
answers() { [ "$(http_code "$1")" = "$2" ]; }

# The cursor of the unit's last journal entry, so a check can read only what happened after it.
# Taken with the same -u filter it is used with: `--after-cursor` with a filter skips one
# matching entry too many when the cursor's own entry does not match.
cursor() { journalctl -u "$UNIT" -n 1 -q --show-cursor -o cat | sed -n 's/^-- cursor: //p'; }
journal_since() { journalctl -u "$UNIT" --after-cursor="$1" --no-pager -o cat; }

# The processes in the unit's cgroup (the agent and its children). Read from /proc/PID/cgroup,
# which works on the unified and on the hybrid cgroup hierarchy alike.
unit_pids() {
  local f
  for f in /proc/[0-9]*/cgroup; do
    if grep -q ":/system.slice/$UNIT\$" "$f" 2>/dev/null; then
      f=${f#/proc/}
      echo "${f%/cgroup}"
    fi
  done
}

# The pid of the process whose command line is `… cloudflared tunnel …`.
cloudflared_pid() {
  local p cmd
  for p in $(unit_pids); do
    cmd=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)
    if [[ $cmd == *"cloudflared tunnel"* ]]; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

# Whether the unit's journal has a line from cloudflared (re-emitted by the agent with
# TARGET=cloudflared) containing TEXT. Captured first: `grep -q` in a pipeline under pipefail
# would turn an early match into a SIGPIPE failure.
journal_has_cloudflared_line() {
  local entries
  entries=$(journalctl -u "$UNIT" -o json --no-pager | grep '"TARGET":"cloudflared"')
  [[ $entries == *"$1"* ]]
}

finish() {
  journalctl -u "$UNIT" --no-pager -o short-precise >"$OUT/journal-tunnel-agent.txt" 2>&1
  journalctl -u "$UNIT" --no-pager -o json >"$OUT/journal-tunnel-agent.json" 2>&1
  journalctl -b --no-pager -o short-precise >"$OUT/journal-boot.txt" 2>&1
  say "done: $(grep -c '^PASS' "$RESULTS") passed, $(grep -c '^FAIL' "$RESULTS") failed"
  echo done >"$OUT/finished"
}
