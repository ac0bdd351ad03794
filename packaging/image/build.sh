#!/usr/bin/env bash
# Builds the tunnel-agent OCI image, offline, with buildah: no base image and no registry pull.
# The image is `FROM scratch` plus a root filesystem made here from this build and the build
# host's Debian files:
#
#   /usr/bin/tunnel-agent           the release binary (cargo build --release --locked)
#   /lib/..., /lib64/...            the shared libraries `ldd` names for it (glibc, libgcc_s, libm)
#                                   and the dynamic loader, from the build host (Debian 12)
#   /etc/passwd, /etc/group         root and `tunnel-agent`, uid/gid 65532: the image runs as 65532
#   /etc/ssl/certs/ca-certificates.crt
#                                   the host's Debian CA bundle: for `proxy.trust = "system"` and
#                                   for the cloudflared users add (its Go TLS reads this file);
#                                   the default trust (webpki) is compiled into the binary
#   /etc/nsswitch.conf              hosts from /etc/hosts, then DNS (glibc's own resolver)
#   /etc/tunnel-agent/              empty: mount the config file at agent.toml here (the default
#                                   path `tunnel-agent run` reads, with `args: ["run"]`)
#   /usr/local/bin/cloudflared      NOT shipped: layer the official cloudflared in at this path
#                                   (PATH puts /usr/local/bin first, `cloudflared.path` finds it)
#   /run/tunnel-agent, /var/lib/tunnel-agent, /tmp
#                                   owned by 65532; with a read-only root, mount a tmpfs/emptyDir
#                                   at /run/tunnel-agent (podman --read-only mounts one at /run)
#                                   and a volume at /var/lib/tunnel-agent (a pushed table persists)
#
# The agent is PID 1 (entry point /usr/bin/tunnel-agent): as PID 1 it reaps orphaned processes
# (agent/reaper.rs) and handles SIGTERM itself. The command is `run --from-env`: with no args, as
# the gateway controller's chart runs its proxy pods (no command, no args, uid 65534, a read-only
# root, no volume), the image reads that controller's variables, and keeps its files beneath
# /dev/shm when the directories below cannot be written. A pod with a config file at
# /etc/tunnel-agent/agent.toml passes `args: ["run"]` (packaging/kubernetes/active-standby.yaml);
# a file there that the default command does not read is said as a warning. It logs to stdout, where a
# container's logs are expected, one JSON object per line, as the controller's proxy does: the
# image sets TUNNEL_AGENT_LOG_STREAM=stdout and TUNNEL_AGENT_LOG_FORMAT=json, the defaults of
# `agent.log_stream` and `agent.log_format` when the config file does not set them (with a file
# or without one); only a panic, or an error before the config is read, is on stderr.
#
# Needs: cargo, buildah, ldd (libc-bin), python3, the ca-certificates package. Run as root or as a user
# buildah can run rootless for. Prints the image id and its size.
#
# Environment:
#   IMAGE_NAME=NAME      image name (default localhost/tunnel-agent); tagged with the version
#   SKIP_CARGO_BUILD=1   use the release binary as it is (a caller built it)
#   CARGO_TARGET_DIR     honoured as cargo does: the binary is read from, and the root filesystem
#                        and OCI layout written to, $CARGO_TARGET_DIR (default target/)
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
target=${CARGO_TARGET_DIR:-$repo/target}

name=${IMAGE_NAME:-localhost/tunnel-agent}
version=$(awk -F'"' '/^version *=/ { print $2; exit }' Cargo.toml)
uid=65532
ca_bundle=/etc/ssl/certs/ca-certificates.crt
for tool in buildah ldd python3; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool not found" >&2; exit 1; }
done
[ -f "$ca_bundle" ] || { echo "build.sh: $ca_bundle missing: install ca-certificates" >&2; exit 1; }

# 1. The binary.
if [ "${SKIP_CARGO_BUILD:-}" != 1 ]; then
  cargo build --release --locked --quiet
fi
bin=$target/release/tunnel-agent
[ -x "$bin" ] || { echo "build.sh: $bin missing (build it, or unset SKIP_CARGO_BUILD)" >&2; exit 1; }

# 2. The root filesystem.
rootfs=$target/image/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs"/{usr/bin,usr/local/bin,etc/tunnel-agent,etc/ssl/certs,run/tunnel-agent,var/lib/tunnel-agent,tmp}
install -m 0755 "$bin" "$rootfs/usr/bin/tunnel-agent"

# Every library ldd resolves, and the loader, at the path the binary asks for (cp -L: the file,
# not the symlink).
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u |
  while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done

cat >"$rootfs/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/sbin/nologin
tunnel-agent:x:$uid:$uid:tunnel-agent:/var/lib/tunnel-agent:/sbin/nologin
PASSWD
cat >"$rootfs/etc/group" <<GROUP
root:x:0:
tunnel-agent:x:$uid:
GROUP
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
install -m 0644 "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$rootfs/tmp"
chown "$uid:$uid" "$rootfs/run/tunnel-agent" "$rootfs/var/lib/tunnel-agent"
chmod 0750 "$rootfs/run/tunnel-agent" "$rootfs/var/lib/tunnel-agent"

# 3. The image: scratch + the rootfs, and its configuration. The image that had this tag before
# is removed once the tag moves (unless something still uses it), so rebuilds do not pile up.
previous=$(buildah images --quiet --no-trunc "$name:$version" 2>/dev/null || true)
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
# As a tar archive, which `buildah add` unpacks keeping its owners (`buildah copy` would make
# every file root's, the agent's directories included).
tar -C "$rootfs" --numeric-owner --sort=name -cf "$target/image/rootfs.tar" .
buildah add --quiet "$ctr" "$target/image/rootfs.tar" / >/dev/null
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
cargo_field() { awk -F'"' -v key="$1" '$1 ~ "^" key " *= *$" { print $2; exit }' Cargo.toml; }
oci() { echo "--annotation=org.opencontainers.image.$1=$2 --label=org.opencontainers.image.$1=$2"; }
# shellcheck disable=SC2046 # oci prints two words without spaces inside them
buildah config \
  --entrypoint '["/usr/bin/tunnel-agent"]' --cmd '["run", "--from-env"]' \
  --user "$uid:$uid" --workingdir /var/lib/tunnel-agent \
  --env PATH=/usr/local/bin:/usr/bin:/bin --env TUNNEL_AGENT_LOG_STREAM=stdout \
  --env TUNNEL_AGENT_LOG_FORMAT=json --stop-signal SIGTERM \
  --volume /var/lib/tunnel-agent \
  $(oci title tunnel-agent) $(oci version "$version") $(oci revision "$commit") \
  $(oci source "$(cargo_field repository)") $(oci licenses "$(cargo_field license)") \
  "$ctr"
id=$(buildah commit --quiet --format oci --rm "$ctr" "$name:$version")
trap - EXIT
buildah tag "$id" "$name:latest"
for old in $previous; do
  [ "$old" = "$id" ] || [ "$old" = "sha256:$id" ] || buildah rmi "$old" >/dev/null 2>&1 || true
done

# The sizes: uncompressed as buildah stores it, and compressed as a registry would hold it (the
# image written, gzip-compressed, to an OCI layout directory: what `skopeo copy oci:...` pushes).
oci_dir=$target/image/oci
rm -rf "$oci_dir"
buildah push --quiet --compression-format gzip "$id" "oci:$oci_dir:$version" >/dev/null
compressed=$(python3 - "$oci_dir" <<'PY'
import json, os, sys
root = sys.argv[1]
blob = lambda d: os.path.join(root, "blobs", *d.split(":"))
index = json.load(open(os.path.join(root, "index.json")))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
print(sum(l["size"] for l in manifest["layers"]) + manifest["config"]["size"])
PY
)
echo "image $name:$version"
echo "id    $id"
echo "size  $(du -sb "$rootfs" | cut -f1) bytes uncompressed (the root filesystem), $compressed bytes compressed (gzip layer + config, $oci_dir)"
