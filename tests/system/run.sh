#!/usr/bin/env bash
# System test under real systemd.
#
#  1. builds the .deb (cargo-deb, release build) plus a "-2" revision for the upgrade check, and
#     checks it on the host: lintian, systemd-analyze verify on the unpacked package; packages
#     cloudflared twice (a real one named by CLOUDFLARED_BIN, when set, and
#     tests/fakes/cloudflared as 0.0.0+systemtest) and builds a signed apt repository of all
#     four with apt-ftparchive and a throwaway gpg key, the way a fleet's repository is built;
#  2. creates, once, a minimal Debian bookworm rootfs with debootstrap (minbase + systemd,
#     systemd-sysv, dbus, curl; then cloud-init --no-install-recommends) from the Debian mirror
#     this machine's apt uses, cached in tests/system/cache/;
#  3. boots a copy of it three times with `systemd-nspawn -b --register=no --keep-unit
#     --private-network`, the repository at file:/srv/systemtest/apt (the container has no
#     network, so its own Debian mirror is removed from its sources): the "main" scenario
#     installs the package with apt and drives the unit (container/check-main.sh); the
#     "cloud-init" scenario seeds NoCloud with the shipped cloud-init example (apt source, pinned
#     packages, Secret Manager served by tests/system/fakes/fake-gcp) and checks the service came
#     up from cloud-init alone (container/check-cloud-init.sh); the "real-cloudflared" scenario
#     supervises the real cloudflared under the packaged unit (container/check-real.sh). The
#     checks record to a bind-mounted folder and power the container off; an outer timeout
#     bounds each boot;
#  4. prints every result, the journal of any failed scenario, and `N passed, N failed`.
#
# Needs root, systemd-nspawn (systemd-container), debootstrap, lintian, cargo-deb, apt-ftparchive
# (apt-utils), gpg (gnupg), xz (xz-utils) and python3. No real cloudflared ships with the tests:
# without CLOUDFLARED_BIN (a cloudflared binary for linux-amd64) the real-cloudflared scenario is
# skipped with the reason (SKIP in the results). When it
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
for tool in systemd-nspawn debootstrap lintian dpkg-deb systemd-analyze apt-ftparchive gpg xz python3; do
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

# --- 1. the packages ------------------------------------------------------------------------
# tunnel-agent three times, for the upgrade checks: N (this tree); N+1, this tree with another
# version number, so that an in-place upgrade is seen to change the running binary, and with
# one setting added to the unit, which its postinst must report; and a broken N+2 (below).
# N+1 is built first, from a copy, with the same target directory: only the crate rebuilds,
# and N's build then puts N's binary back at target/release/tunnel-agent for what uses it next.
crate_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
next_crate_version=$crate_version+upgrade1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
t0=$(date +%s)
say "building N+1 ($next_crate_version) from a copy of the tree (release build)"
next_tree=$work/next-tree
mkdir -p "$next_tree"
tar -C "$repo" --exclude=./.git --exclude=./target --exclude=./tests/system/cache --exclude=./fuzz/target \
  --exclude=./bench/out -cf - . | tar -C "$next_tree" -xf -
sed -i "0,/^version = \"$crate_version\"\$/s//version = \"$next_crate_version\"/" "$next_tree/Cargo.toml"
sed -i "/^name = \"tunnel-agent\"\$/{n;s/^version = .*/version = \"$next_crate_version\"/}" "$next_tree/Cargo.lock"
sed -i 's/^\[Service\]$/[Service]\nX-SystemTest=N+1 changed the unit, so its postinst says a restart applies it/' \
  "$next_tree/systemd/tunnel-agent.service"
# Outside a git checkout build.rs says "unknown": the same commit as N, named explicitly.
(cd "$next_tree" && TUNNEL_AGENT_COMMIT=$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo unknown) \
  cargo deb --locked --quiet --output "$work/debs/" -- --quiet >/dev/null)
rm -rf "$next_tree"
t_next=$(($(date +%s) - t0))
t0=$(date +%s)
say "building N (release build)"
cargo deb --locked --quiet --output "$work/debs/" -- --quiet >/dev/null
deb1=$(ls "$work"/debs/tunnel-agent_"$crate_version"-1_*.deb)
deb2=$(ls "$work"/debs/tunnel-agent_"$next_crate_version"-1_*.deb)
say "built $(basename "$deb1") in $(($(date +%s) - t0)) s, $(basename "$deb2") in $t_next s"

# N+2: N+1's package with a /usr/bin/tunnel-agent that passes every check but breaks the hand-over
# (tests/system/fakes/tunnel-agent-broken-handover), over N's binary at
# /usr/lib/tunnel-agent/tunnel-agent-real: the upgrade to it must roll back to N+1.
broken_version=$crate_version+upgrade2-1
broken_root=$work/broken-root
dpkg-deb -R "$deb2" "$broken_root"
install -d "$broken_root/usr/lib/tunnel-agent"
dpkg-deb --fsys-tarfile "$deb1" | tar -xOf - ./usr/bin/tunnel-agent >"$broken_root/usr/lib/tunnel-agent/tunnel-agent-real"
chmod 0755 "$broken_root/usr/lib/tunnel-agent/tunnel-agent-real"
install -m 0755 tests/system/fakes/tunnel-agent-broken-handover "$broken_root/usr/bin/tunnel-agent"
sed -i "s/^Version: .*/Version: $broken_version/" "$broken_root/DEBIAN/control"
deb3=$work/debs/tunnel-agent_${broken_version}_$(dpkg-deb -f "$deb2" Architecture).deb
dpkg-deb --root-owner-group --build "$broken_root" "$deb3" >/dev/null
rm -rf "$broken_root"

# Each package holds the binary it is meant to: N's and N+1's report their own versions.
packaged_version() { # DEB: the first line of its /usr/bin/tunnel-agent --version
  local bin=$work/packaged-tunnel-agent
  dpkg-deb --fsys-tarfile "$1" | tar -xOf - ./usr/bin/tunnel-agent >"$bin"
  chmod 0755 "$bin"
  "$bin" --version | head -n1
  rm -f "$bin"
}
v1=$(packaged_version "$deb1")
v2=$(packaged_version "$deb2")
if [[ $v1 == "tunnel-agent $crate_version ("* && $v2 == "tunnel-agent $next_crate_version ("* ]]; then
  host_pass packages-hold-their-versions
else
  host_fail packages-hold-their-versions "N's binary says '$v1', N+1's '$v2'"
fi

# cloudflared as packages, the way the fleet's repository holds them next to tunnel-agent.
# cf_deb NAME VERSION ARCH BINARY DEPENDS DESCRIPTION
cf_deb() {
  local root=$work/cf-$1
  mkdir -p "$root/DEBIAN" "$root/usr/bin"
  install -m 0755 "$4" "$root/usr/bin/cloudflared"
  {
    echo "Package: cloudflared"
    echo "Version: $2"
    echo "Architecture: $3"
    echo "Maintainer: tunnel-agent system test <tunnel-agent@example.invalid>"
    [ -z "$5" ] || echo "Depends: $5"
    echo "Description: $6"
    echo " Packaged by tests/system/run.sh for the system test's apt repository."
  } >"$root/DEBIAN/control"
  dpkg-deb --root-owner-group --build "$root" "$work/debs/cloudflared_$2_$3.deb" >/dev/null
  rm -rf "$root"
}
cf_deb fake 0.0.0+systemtest all tests/fakes/cloudflared python3 \
  "fake cloudflared (tests/fakes/cloudflared: its CLI shape, /ready and SIGTERM semantics)"
real_cf_version=
real_cf_skip=
if [ -n "${CLOUDFLARED_BIN:-}" ] && [ -f "$CLOUDFLARED_BIN" ]; then
  install -m 0755 "$CLOUDFLARED_BIN" "$work/cloudflared-real"
  real_cf_version=$("$work/cloudflared-real" --version | awk '{ print $3; exit }')
  cf_deb real "$real_cf_version" amd64 "$work/cloudflared-real" "" "cloudflared $real_cf_version (the real binary)"
  say "packaged the real cloudflared $real_cf_version from $CLOUDFLARED_BIN"
else
  real_cf_skip="no real cloudflared: set CLOUDFLARED_BIN to a linux-amd64 cloudflared binary (none ships with the tests)"
  say "real cloudflared: $real_cf_skip"
fi

# The signed apt repository: pool/, dists/stable/main/binary-amd64/Packages, a Release with
# every index's checksums, signed (InRelease, Release.gpg) by a throwaway key made here.
apt_repo=$work/apt
export GNUPGHOME=$work/gnupg
install -d -m 0700 "$GNUPGHOME"
printf 'quiet\ntrust-model always\n' >"$GNUPGHOME/gpg.conf"
gpg --batch --quiet --passphrase '' --quick-gen-key 'tunnel-agent system test <systemtest@example.invalid>' \
  ed25519 sign 1d 2>/dev/null
install -d "$apt_repo/pool/main" "$apt_repo/dists/stable/main/binary-amd64"
cp "$work"/debs/*.deb "$apt_repo/pool/main/"
(
  cd "$apt_repo"
  apt-ftparchive packages pool >dists/stable/main/binary-amd64/Packages
  gzip -9nk dists/stable/main/binary-amd64/Packages
  apt-ftparchive -o APT::FTPArchive::Release::Origin=tunnel-agent-systemtest \
    -o APT::FTPArchive::Release::Suite=stable -o APT::FTPArchive::Release::Codename=stable \
    -o APT::FTPArchive::Release::Architectures=amd64 -o APT::FTPArchive::Release::Components=main \
    release dists/stable >"$work/Release"
  mv "$work/Release" dists/stable/Release
  gpg --batch --yes --clearsign -o dists/stable/InRelease dists/stable/Release
  gpg --batch --yes -abs -o dists/stable/Release.gpg dists/stable/Release
)
gpg --batch --armor --export >"$work/repo-key.asc"
gpg --batch --export >"$work/repo-key.gpg"
chmod -R a+rX "$apt_repo" "$work/repo-key.asc" "$work/repo-key.gpg"
say "apt repository: $(grep -c '^Package:' "$apt_repo/dists/stable/main/binary-amd64/Packages") packages, signed by $(gpg --batch --with-colons --list-keys | awk -F: '$1 == "fpr" { print $10; exit }')"

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
# prepare_root SCENARIO CHECK_SCRIPT: a fresh copy of the cached rootfs with the checks and the
# apt repository installed. The container has no network: its Debian mirror is removed from the
# apt sources, so `apt-get update` reads the test's repository only.
prepare_root() {
  local root=$cache/run-$1
  rm -rf "$root"
  cp -a --reflink=auto "$rootfs" "$root"
  install -d -m 0755 "$root/srv/systemtest"
  install -m 0644 tests/system/container/lib.sh "$root/srv/systemtest/lib.sh"
  install -m 0644 tests/system/container/upgrade.sh "$root/srv/systemtest/upgrade.sh"
  install -m 0755 "tests/system/container/$2" "$root/srv/systemtest/check.sh"
  install -m 0755 tests/system/fakes/fake-gcp "$root/srv/systemtest/fake-gcp"
  install -m 0644 tests/system/container/systemtest.service "$root/etc/systemd/system/systemtest.service"
  ln -sf /etc/systemd/system/systemtest.service "$root/etc/systemd/system/multi-user.target.wants/systemtest.service"
  cp -a "$apt_repo" "$root/srv/systemtest/apt"
  rm -f "$root/etc/apt/sources.list" "$root"/etc/apt/sources.list.d/*
  echo "$root"
}

# add_apt_source ROOT: the repository as an operator adds it by hand (key in /etc/apt/keyrings,
# signed-by in the source), for the scenarios that do not go through cloud-init.
add_apt_source() {
  install -D -m 0644 "$work/repo-key.gpg" "$1/etc/apt/keyrings/tunnel-agent.gpg"
  echo "deb [signed-by=/etc/apt/keyrings/tunnel-agent.gpg] file:/srv/systemtest/apt stable main" \
    >"$1/etc/apt/sources.list.d/tunnel-agent.list"
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

pkg_version=$(dpkg-deb -f "$deb1" Version)
pkg_version2=$(dpkg-deb -f "$deb2" Version)

root=$(prepare_root main check-main.sh)
add_apt_source "$root"
printf 'OLD_VERSION=%s\nNEW_VERSION=%s\nBROKEN_VERSION=%s\nOLD_AGENT_VERSION=%s\nNEW_AGENT_VERSION=%s\n' \
  "$pkg_version" "$pkg_version2" "$broken_version" "$crate_version" "$next_crate_version" \
  >"$root/srv/systemtest/versions.env"
boot main "$root"

root=$(prepare_root cloud-init check-cloud-init.sh)
internal_token=system-test-internal-token-c1d0
# Shaped like a connector token (base64 of {"a","t","s"}): cloudflared, and the fake that keeps
# its contract, refuse anything else (exit 255).
tunnel_token=eyJhIjoiMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYiLCJ0IjoiNmZmNDJhZTItNzY1ZC00YWRmLTgxMTItMzFjNTVjMTU1MWVmIiwicyI6ImMzbHpkR1Z0TFhSbGMzUXRkSFZ1Ym1Wc0xYUnZhMlZ1TFRjM1pUTXVMaTQ9In0=
printf 'INTERNAL_TOKEN=%s\nTUNNEL_TOKEN=%s\nPKG_VERSION=%s\n' "$internal_token" "$tunnel_token" "$pkg_version" \
  >"$root/srv/systemtest/cloud-init.env"
# Secret Manager (and the metadata server's access token) for the example's two secrets, from
# boot on: the agent, started by the package install, reads them at once.
install -d "$root/srv/systemtest/gcp/secrets"
printf '%s' "$internal_token" >"$root/srv/systemtest/gcp/secrets/internal-token"
printf '%s' "$tunnel_token" >"$root/srv/systemtest/gcp/secrets/tunnel-token"
{
  echo "[Unit]"
  echo "Description=fake GCE metadata server and Secret Manager (tests/system/fakes/fake-gcp)"
  echo "Before=cloud-config.service"
  echo "[Service]"
  echo "ExecStart=/srv/systemtest/fake-gcp --listen 127.0.0.1:8930 --control /srv/systemtest/gcp"
  echo "[Install]"
  echo "WantedBy=multi-user.target"
} >"$root/etc/systemd/system/fake-gcp.service"
ln -sf /etc/systemd/system/fake-gcp.service "$root/etc/systemd/system/multi-user.target.wants/fake-gcp.service"
printf '[gcp]\nmetadata_url = "http://127.0.0.1:8930"\nsecret_manager_endpoint = "http://127.0.0.1:8930"\n\n' \
  >"$work/gcp.toml"
install -d "$root/var/lib/cloud/seed/nocloud"
# The shipped example, only its template variables filled in, and the agent pointed at the fake
# metadata server (the one addition to the example).
tests/system/render-user-data packaging/examples/cloud-init.yaml "$root/var/lib/cloud/seed/nocloud/user-data" \
  apt_repo_url=file:/srv/systemtest/apt apt_suite=stable apt_repo_key=@"$work/repo-key.asc" \
  cloudflared_version=0.0.0+systemtest tunnel_agent_version="$pkg_version" \
  internal_token_secret=projects/system-test/secrets/internal-token/versions/latest \
  tunnel_token_secret=projects/system-test/secrets/tunnel-token/versions/latest \
  --prepend /etc/tunnel-agent/agent.toml=@"$work/gcp.toml"
# The inline-secret variant, rendered with tokens full of YAML's special characters; the
# container checks it against cloud-init's schema and that each file decodes to the exact token.
nasty_internal='a: b # c "d" '"'"'e'"'"' {f} [g] & *h | >i %j @k `l'
nasty_tunnel='- --- ? !tag %YAML: ${x}'
printf '%s' "$nasty_internal" >"$root/srv/systemtest/inline-internal-token"
printf '%s' "$nasty_tunnel" >"$root/srv/systemtest/inline-tunnel-token"
tests/system/render-user-data packaging/examples/cloud-init-inline-secrets.yaml "$root/srv/systemtest/inline-user-data" \
  apt_repo_url=file:/srv/systemtest/apt apt_suite=stable apt_repo_key=@"$work/repo-key.asc" \
  cloudflared_version=0.0.0+systemtest tunnel_agent_version="$pkg_version" \
  internal_token_b64="$(printf '%s' "$nasty_internal" | base64 -w0)" \
  tunnel_token_b64="$(printf '%s' "$nasty_tunnel" | base64 -w0)"
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

if [ -n "$real_cf_version" ]; then
  root=$(prepare_root real-cloudflared check-real.sh)
  add_apt_source "$root"
  printf 'CF_VERSION=%s\nPKG_VERSION=%s\n' "$real_cf_version" "$pkg_version" >"$root/srv/systemtest/versions.env"
  boot real-cloudflared "$root"
else
  mkdir -p "$work/real-cloudflared"
  echo "SKIP real-cloudflared: $real_cf_skip" >"$work/real-cloudflared/results.txt"
fi

# --- 4. results -----------------------------------------------------------------------------
passed=0
failed=0
skipped=0
echo
for f in "$host_results" "$work"/main/results.txt "$work"/cloud-init/results.txt "$work"/real-cloudflared/results.txt; do
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
