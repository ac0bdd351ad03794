#!/usr/bin/env bash
# Runs every test: unit and integration tests (cargo), then the system test under real systemd
# when this machine can run it (tests/system/run.sh says why when it cannot), then the OCI image
# test with podman (tests/image/run.sh skips, saying why, where podman cannot run it). The
# Kubernetes manifests are validated right after cargo's tests, whose build of the agent they
# run (tests/kubernetes/validate.sh skips, saying why, where the validator is not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --locked --all-targets
tests/kubernetes/validate.sh
if [ -x tests/system/run.sh ]; then
  tests/system/run.sh
fi
tests/image/run.sh
