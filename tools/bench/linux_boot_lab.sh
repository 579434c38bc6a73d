#!/usr/bin/env bash
# Linux guest boot time under `ledge run`: launch -> LEDGE-GUEST-READY and launch -> exit,
# N runs (default 10), with the guest's own uptime at the marker so VMM time and kernel time
# can be told apart. Runs wherever `ledge` and $LEDGE_GUEST_DIR are: inside the KVM lab via
#   tools/kvm-lab.sh --script tools/bench/linux_boot_lab.sh [RUNS] [KERNEL]
# or directly on a host with hardware KVM. Prints one line per run and the medians.
set -euo pipefail
runs="${1:-10}"
kernel="${2:-bzImage}"
G="${LEDGE_GUEST_DIR:?LEDGE_GUEST_DIR is not set}"
now_us() { local t="${EPOCHREALTIME}"; echo "${t/./}"; }
median() { sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
marker_ms=() exit_ms=() uptime_s=()
for i in $(seq "$runs"); do
    start=$(now_us)
    marker=""
    while IFS= read -r line; do
        if [[ -z "$marker" && "$line" == LEDGE-GUEST-READY* ]]; then
            marker=$(now_us)
            up="${line#*uptime=}"
        fi
    done < <(ledge run --kernel "$G/$kernel" --initrd "$G/initramfs.cpio.gz" --console stdio \
                 --cmdline "console=ttyS0 reboot=k panic=1 quiet" 2>/dev/null)
    end=$(now_us)
    [[ -n "$marker" ]] || { echo "run $i: no marker" >&2; exit 1; }
    m=$(( (marker - start) / 1000 )); e=$(( (end - start) / 1000 ))
    echo "run $i: launch->marker ${m} ms, launch->exit ${e} ms, guest uptime at marker ${up} s"
    marker_ms+=("$m"); exit_ms+=("$e"); uptime_s+=("$up")
done
echo "kernel=$kernel runs=$runs kvm=${LEDGE_KVM_KIND:-direct}"
echo "median launch->marker: $(printf '%s\n' "${marker_ms[@]}" | median) ms"
echo "median launch->exit: $(printf '%s\n' "${exit_ms[@]}" | median) ms"
echo "median guest uptime at marker: $(printf '%s\n' "${uptime_s[@]}" | median) s"
