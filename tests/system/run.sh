#!/usr/bin/env bash
# System test under real systemd.
#
#  1. builds the .deb (cargo-deb, release build) plus a "-2" revision for the upgrade check, and
#     checks it on the host: lintian, systemd-analyze verify on the unpacked package;
#  2. creates, once, a minimal Debian bookworm rootfs with debootstrap (minbase + systemd,
#     systemd-sysv, dbus, curl; then cloud-init --no-install-recommends) from the Debian mirror
#     this machine's apt uses, cached in tests/system/cache/;
#  3. boots a copy of it twice with `systemd-nspawn -b --register=no --keep-unit
#     --private-network`: the "main" scenario installs the package with dpkg and drives the unit
#     (container/check-main.sh); the "cloud-init" scenario seeds NoCloud with the shipped
#     cloud-init example and checks the service came up from cloud-init alone
#     (container/check-cloud-init.sh). The checks record to a bind-mounted folder and power the
#     container off; an outer timeout bounds each boot;
#  4. prints every result, the journal of any failed scenario, and `N passed, N failed`.
#
# Needs root, systemd-nspawn (systemd-container), debootstrap, lintian and cargo-deb. When it
# cannot run it says why and fails, unless TUNNEL_AGENT_SKIP_SYSTEM_TEST=1 opts out explicitly.
#
# Environment:
#   TUNNEL_AGENT_SKIP_SYSTEM_TEST=1  skip (prints that it was skipped and why)
#   SYSTEM_TEST_CACHE=DIR            rootfs cache (default tests/system/cache)
#   DEBIAN_MIRROR=URL                mirror for debootstrap (default: from /etc/apt/sources.list*)
#   SYSTEM_TEST_BOOT_TIMEOUT=SECS    outer timeout per boot (default 600)
#   SYSTEM_TEST_KEEP=1               keep the booted rootfs copies for debugging
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
started=$(date +%s)

say() { echo "[system-test] $*"; }

# --- preflight ------------------------------------------------------------------------------
problems=()
[ "$(id -u)" = 0 ] || problems+=("not root (systemd-nspawn and debootstrap need root)")
for tool in systemd-nspawn debootstrap lintian dpkg-deb systemd-analyze; do
  command -v "$tool" >/dev/null || problems+=("$tool not found")
done
cargo deb --version >/dev/null 2>&1 || problems+=("cargo-deb not installed (cargo install --locked cargo-deb)")
if [ "${TUNNEL_AGENT_SKIP_SYSTEM_TEST:-}" = 1 ]; then
  say "SKIPPED: TUNNEL_AGENT_SKIP_SYSTEM_TEST=1${problems:+ (and it could not run anyway: ${problems[*]})}"
  exit 0
fi
if [ ${#problems[@]} -gt 0 ]; then
  say "cannot run the system test:"
  printf '  - %s\n' "${problems[@]}"
  say "set TUNNEL_AGENT_SKIP_SYSTEM_TEST=1 to skip it explicitly"
  exit 1
fi

cache=${SYSTEM_TEST_CACHE:-$repo/tests/system/cache}
work=$repo/target/system-test
boot_timeout=${SYSTEM_TEST_BOOT_TIMEOUT:-600}
rm -rf "$work"
mkdir -p "$cache" "$work"
host_results=$work/host-results.txt
: >"$host_results"
host_pass() { echo "PASS $1" >>"$host_results"; }
host_fail() { echo "FAIL $1: $2" >>"$host_results"; }

# --- 1. the package -------------------------------------------------------------------------
t0=$(date +%s)
say "building the .deb (release build)"
cargo deb --locked --quiet --output "$work/debs/" -- --quiet >/dev/null
cargo deb --locked --quiet --no-build --deb-revision 2 --output "$work/debs/" >/dev/null
deb1=$(ls "$work"/debs/tunnel-agent_*-1_*.deb)
deb2=$(ls "$work"/debs/tunnel-agent_*-2_*.deb)
say "built $(basename "$deb1") and $(basename "$deb2") in $(($(date +%s) - t0)) s"

if lintian --fail-on error,warning --display-info --tag-display-limit 0 "$deb1" >"$work/lintian.txt" 2>&1; then
  host_pass lintian
else
  host_fail lintian "$(tr '\n' ' ' <"$work/lintian.txt")"
fi
sed 's/^/  lintian: /' "$work/lintian.txt"

unpacked=$work/unpacked
dpkg-deb -x "$deb1" "$unpacked"
# --root resolves the unit's Exec*= paths inside the unpacked package, against the host's own
# units (sysinit.target and the like; the package's files win). Man pages are lintian's
# business: the host's man cannot look inside --root.
# The unit's other commands (nsenter, sh) come from essential packages: take the host's.
cp -a -n /usr/lib/systemd/system/. "$unpacked/usr/lib/systemd/system/"
install -D /usr/bin/nsenter "$unpacked/usr/bin/nsenter"
install -D /bin/sh "$unpacked/bin/sh"
if out=$(systemd-analyze verify --man=no --root="$unpacked" tunnel-agent.service 2>&1) && [ -z "$out" ]; then
  host_pass systemd-analyze-verify
else
  host_fail systemd-analyze-verify "$out"
fi
systemd-analyze security --offline=yes --root="$unpacked" --no-pager tunnel-agent.service \
  >"$work/security.txt" 2>&1 || true
say "$(grep 'Overall exposure' "$work/security.txt" || echo 'systemd-analyze security: no verdict')"

# --- 2. the cached rootfs -------------------------------------------------------------------
# The Debian mirror this machine's apt uses for bookworm (one-line *.list or deb822 *.sources).
host_debian_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                       if ($(i + 1) == "bookworm") { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
         { types = uris = suites = ""
           for (j = 1; j <= NF; j++) {
             if ($j ~ /^Types:/) types = $j
             if ($j ~ /^URIs:/) uris = $j
             if ($j ~ /^Suites:/) suites = $j
           }
           if (types ~ /[[:space:]]deb([[:space:]]|$)/ && suites ~ /[[:space:]]bookworm([[:space:]]|$)/) {
             sub(/^URIs:[[:space:]]*/, "", uris); split(uris, u, /[[:space:]]+/); print u[1]; exit } }' "$f"
  done
}

# systemd, systemd-sysv, dbus: to boot. curl: the checks' HTTP client, and the cloud-init example
# fetches the packages with it. cloud-init brings python3, which the fakes use.
include=systemd,systemd-sysv,dbus,curl
extra=cloud-init
recipe_version=1
key=$(echo "bookworm minbase $include $extra $recipe_version" | sha256sum | cut -c1-12)
rootfs=$cache/rootfs-bookworm-$key
if [ ! -f "$rootfs/.complete" ]; then
  t0=$(date +%s)
  mirror=${DEBIAN_MIRROR:-$(host_debian_mirror | head -n1)}
  if [ -z "$mirror" ]; then
    say "no bookworm mirror in /etc/apt/sources.list*; set DEBIAN_MIRROR"
    exit 1
  fi
  say "creating the bookworm rootfs from $mirror (cached afterwards in $rootfs)"
  find "$cache" -maxdepth 1 -name 'rootfs-*' -exec rm -rf {} +
  debootstrap --variant=minbase --include="$include" bookworm "$rootfs.tmp" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    {
      tail -n 30 "$work/debootstrap.log"
      exit 1
    }
  systemd-nspawn -q -D "$rootfs.tmp" --register=no --keep-unit --pipe \
    sh -c "apt-get install -y -q --no-install-recommends $extra && apt-get clean" \
    >"$work/rootfs-extra.log" 2>&1 || {
    tail -n 30 "$work/rootfs-extra.log"
    exit 1
  }
  touch "$rootfs.tmp/.complete"
  mv "$rootfs.tmp" "$rootfs"
  say "rootfs created in $(($(date +%s) - t0)) s"
else
  say "using the cached rootfs $rootfs"
fi

# --- 3. the scenarios -----------------------------------------------------------------------
# A fake cloudflared packaged as a .deb, so the cloud-init example installs it like the real one.
fake_cf=$work/cloudflared-fake
mkdir -p "$fake_cf/DEBIAN" "$fake_cf/usr/bin"
install -m 0755 tests/fakes/cloudflared "$fake_cf/usr/bin/cloudflared"
cat >"$fake_cf/DEBIAN/control" <<EOF
Package: cloudflared
Version: 0.0.0+systemtest
Architecture: all
Maintainer: tunnel-agent system test <tunnel-agent@example.invalid>
Depends: python3
Description: fake cloudflared for tunnel-agent's system test
 tests/fakes/cloudflared: cloudflared's CLI shape, /ready and SIGTERM semantics.
EOF
dpkg-deb --root-owner-group --build "$fake_cf" "$work/cloudflared-fake.deb" >/dev/null

# prepare_root SCENARIO CHECK_SCRIPT: a fresh copy of the cached rootfs with the checks installed.
prepare_root() {
  local root=$cache/run-$1
  rm -rf "$root"
  cp -a --reflink=auto "$rootfs" "$root"
  install -d "$root/srv/systemtest/debs"
  install -m 0644 tests/system/container/lib.sh "$root/srv/systemtest/lib.sh"
  install -m 0755 "tests/system/container/$2" "$root/srv/systemtest/check.sh"
  install -m 0644 tests/system/container/systemtest.service "$root/etc/systemd/system/systemtest.service"
  ln -sf /etc/systemd/system/systemtest.service "$root/etc/systemd/system/multi-user.target.wants/systemtest.service"
  echo "$root"
}

# boot SCENARIO ROOT: boots the container until the checks power it off (or the timeout).
boot() {
  local results=$work/$1 t0 rc=0
  mkdir -p "$results"
  t0=$(date +%s)
  say "booting the $1 scenario"
  timeout -k 30 "$boot_timeout" systemd-nspawn -q -D "$2" -M "ta-$1" -b --register=no --keep-unit \
    --private-network --bind="$results:/results" >"$results/console.log" 2>&1 || rc=$?
  say "$1 scenario: container exited ($rc) after $(($(date +%s) - t0)) s"
  if [ ! -f "$results/finished" ]; then
    echo "FAIL $1-finished: the checks did not finish (container exit $rc; see console.log)" >>"$results/results.txt"
  fi
  [ "${SYSTEM_TEST_KEEP:-}" = 1 ] || rm -rf "$2"
}

root=$(prepare_root main check-main.sh)
install -m 0644 "$deb1" "$deb2" "$root/srv/systemtest/debs/"
install -m 0755 tests/system/fakes/fake-gcp "$root/srv/systemtest/fake-gcp"
install -m 0755 tests/fakes/cloudflared "$root/srv/systemtest/cloudflared"
boot main "$root"

root=$(prepare_root cloud-init check-cloud-init.sh)
install -m 0644 "$deb1" "$root/srv/systemtest/tunnel-agent.deb"
install -m 0644 "$work/cloudflared-fake.deb" "$root/srv/systemtest/cloudflared-fake.deb"
internal_token=system-test-internal-token-c1d0
tunnel_token=system-test-tunnel-token-77e3
printf 'INTERNAL_TOKEN=%s\nTUNNEL_TOKEN=%s\n' "$internal_token" "$tunnel_token" >"$root/srv/systemtest/cloud-init.env"
install -d "$root/var/lib/cloud/seed/nocloud"
# The shipped example, only its template variables filled in.
sed -e "s|\${internal_token}|$internal_token|g" -e "s|\${tunnel_token}|$tunnel_token|g" \
  -e "s|\${cloudflared_deb_url}|file:///srv/systemtest/cloudflared-fake.deb|g" \
  -e "s|\${tunnel_agent_deb_url}|file:///srv/systemtest/tunnel-agent.deb|g" \
  packaging/examples/cloud-init.yaml >"$root/var/lib/cloud/seed/nocloud/user-data"
printf 'instance-id: tunnel-agent-systemtest-%s\nlocal-hostname: systemtest\n' "$(date +%s)" \
  >"$root/var/lib/cloud/seed/nocloud/meta-data"
cat >"$root/etc/cloud/cloud.cfg.d/99-systemtest.cfg" <<'EOF'
# Only the NoCloud seed in /var/lib/cloud/seed/nocloud; the container has no network to configure.
datasource_list: [ NoCloud, None ]
network: {config: disabled}
# A minbase rootfs has no locales package, so cc_locale's update-locale would fail.
locale: false
EOF
boot cloud-init "$root"

# --- 4. results -----------------------------------------------------------------------------
passed=0
failed=0
skipped=0
echo
for f in "$host_results" "$work"/main/results.txt "$work"/cloud-init/results.txt; do
  scenario=$(basename "$(dirname "$f")")
  [ "$f" = "$host_results" ] && scenario=host
  [ -f "$f" ] || {
    echo "FAIL $scenario: no results" && failed=$((failed + 1))
    continue
  }
  while IFS= read -r line; do
    echo "  [$scenario] $line"
    case $line in
    PASS*) passed=$((passed + 1)) ;;
    FAIL*) failed=$((failed + 1)) ;;
    SKIP*) skipped=$((skipped + 1)) ;;
    esac
  done <"$f"
  if [ "$scenario" != host ] && grep -q '^FAIL' "$f"; then
    echo "---- $scenario: journal of tunnel-agent.service ----"
    tail -n 150 "$(dirname "$f")/journal-tunnel-agent.txt" 2>/dev/null || tail -n 80 "$(dirname "$f")/console.log"
    echo "---- end of $scenario journal (all logs in $(dirname "$f")) ----"
  fi
done
say "artefacts in $work; took $(($(date +%s) - started)) s"
[ "$skipped" -eq 0 ] || say "$skipped skipped"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
