#!/usr/bin/env bash
# The whole Ledge test suite, from a fresh Debian machine with root and /dev/kvm:
# installs what it needs, builds the guest artifacts (cached), checks formatting and lints,
# then runs every tier: unit and device tests, probe-guest tests on this /dev/kvm (load and
# fault tests among them), the Linux-guest tests in the KVM lab (or directly on hardware KVM),
# and a short run of every fuzz target (tools/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

# Debian packages the tests use directly (build-guest.sh and kvm-lab.sh install their own).
need=()
for p in util-linux e2fsprogs cpio curl python3-venv iproute2; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# QEMU for the KVM lab and the benchmarks' peer: 10 or newer (bookworm-backports on bookworm;
# tools/kvm-lab.sh says why).
log "QEMU"
bash tools/kvm-lab.sh --prepare
qemu-system-x86_64 --version | head -n 1

if [ -e /sys/module/kvm_pvm ]; then kind=kvm-pvm
elif [ -e /dev/kvm ]; then kind="hardware KVM"
else kind="no KVM"; fi
log "KVM on this host: $kind"

export LEDGE_GUEST_DIR="${LEDGE_GUEST_DIR:-$HOME/.cache/ledge/guest}"
log "guest artifacts in $LEDGE_GUEST_DIR"
bash tools/build-guest.sh "$LEDGE_GUEST_DIR"

log "format and lints"
cargo fmt --check
cargo clippy --all-targets --quiet -- -D warnings

log "tests (unit, device, probe guest on $kind, Linux guests in the KVM lab)"
set +e
cargo test --all-targets --no-fail-fast -- --nocapture 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e
if [ "$status" -eq 0 ]; then
    log "the embedding example (examples/agent.rs)"
    set +e
    cargo run --quiet --example agent 2>&1 | tee -a target/test-output.log
    status=${PIPESTATUS[0]}
    set -e
fi
log "fuzzing: every target in fuzz/ for ${LEDGE_FUZZ_SECONDS:-20} s on its seed corpus"
set +e
bash tools/fuzz.sh 2>&1 | tee target/fuzz-output.log
fuzz_status=${PIPESTATUS[0]}
set -e
[ "$status" -ne 0 ] || status=$fuzz_status
grep -E '^test result:' target/test-output.log | awk '
    { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
    END { printf "\n%d passed, %d failed\n", p, f }'
exit "$status"
