#!/usr/bin/env bash
# Linux guest boot, every VMM given, interleaved: runs inside the KVM lab's L1 (or directly on
# a host with hardware KVM), started by tools/bench/run through tools/kvm-lab.sh --script:
#
#   lab_boot.sh RUNS QEMU_DIR|- FIRECRACKER|- VMM...
#
# VMM is ledge, qemu or firecracker. QEMU_DIR holds bin/qemu-system-x86_64, lib/ (its shared
# libraries by soname) and share/ (firmware), as staged by the host; "-" means the host's
# own QEMU (direct mode). FIRECRACKER is its binary's path, "-" if none. Every VMM boots the
# same vmlinux (PVH) and initramfs with 1 vCPU and 128 MiB, console on (the kernel's log on
# the serial port) and off (`quiet`: only /init's lines). One line per boot:
#   BENCH-LAB vmm=V console=on|off run=N rc=RC marker_ms=M exit_ms=E uptime_s=U
# times from just before the VMM is started; uptime is the guest's own at /init. A boot that
# has not ended after 120 s (they take seconds) is killed and reported with rc=124. The guest
# reboots with `reboot=k` (i8042 reset) on every VMM, so QEMU's microvm gets an i8042
# (-device i8042) and -no-reboot: without one, Linux's reset hangs there.
set -uo pipefail
runs="$1" qemu_dir="$2" fc="$3"
shift 3
vmms=("$@")
G="${LEDGE_GUEST_DIR:?LEDGE_GUEST_DIR is not set}"
KERNEL="$G/vmlinux"
INITRD="$G/initramfs.cpio.gz"
MEM=128
TMP="$(mktemp -d)"
now_us() { local t="${EPOCHREALTIME}"; echo "${t/./}"; }

cmdline() {
    if [[ "$1" == on ]]; then
        echo "console=ttyS0 reboot=k panic=1"
    else
        echo "console=ttyS0 reboot=k panic=1 quiet"
    fi
}

vmm_cmd() {
    local vmm="$1" args
    args="$(cmdline "$2")"
    case "$vmm" in
        ledge)
            timeout 120 ledge run --kernel "$KERNEL" --initrd "$INITRD" --vcpus 1 --mem-mib "$MEM" \
                --console stdio --cmdline "$args"
            ;;
        qemu)
            local q=qemu-system-x86_64 extra=()
            if [[ "$qemu_dir" != - ]]; then
                q="$qemu_dir/bin/qemu-system-x86_64"
                extra=(-L "$qemu_dir/share")
                export LD_LIBRARY_PATH="$qemu_dir/lib"
            fi
            # From QEMU 8: option ROMs on, ACPI off (see Qemu.machine in benchlib/vmms.py).
            local m=microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off
            [[ "$("$q" --version | sed -n 's/.*version \([0-9]*\).*/\1/p' | head -n 1)" -ge 8 ]] &&
                m=microvm,pit=off,pic=off,isa-serial=on,rtc=off,acpi=off
            timeout 120 "$q" "${extra[@]}" -device i8042 \
                -M "$m" \
                -enable-kvm -cpu host,-arch-capabilities -m "$MEM" -smp 1 \
                -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
                -kernel "$KERNEL" -initrd "$INITRD" -append "$args"
            ;;
        firecracker)
            cat >"$TMP/fc.json" <<EOF
{"boot-source": {"kernel_image_path": "$KERNEL", "initrd_path": "$INITRD",
                 "boot_args": "$args"},
 "machine-config": {"vcpu_count": 1, "mem_size_mib": $MEM}}
EOF
            timeout 120 "$fc" --no-api --config-file "$TMP/fc.json" --level Error
            ;;
    esac
}

one_boot() {
    local vmm="$1" console="$2" run="$3" start marker="" up="" rc=- line end
    start=$(now_us)
    while IFS= read -r line; do
        if [[ -z "$marker" && "$line" == *LEDGE-GUEST-READY* ]]; then
            marker=$(now_us)
            up="${line##*uptime=}"
            up="${up%%[^0-9.]*}"
        elif [[ "$line" == BENCH-RC* ]]; then
            rc="${line#BENCH-RC }"
        fi
    done < <(vmm_cmd "$vmm" "$console" 2>/dev/null </dev/null; echo "BENCH-RC $?")
    end=$(now_us)
    [[ -n "$marker" ]] || { marker=$start; up=-; rc="no-marker:$rc"; }
    echo "BENCH-LAB vmm=$vmm console=$console run=$run rc=$rc" \
        "marker_ms=$(((marker - start) / 1000)).$(((marker - start) % 1000 / 100))" \
        "exit_ms=$(((end - start) / 1000)).$(((end - start) % 1000 / 100)) uptime_s=$up"
}

echo "BENCH-LAB-KVM kind=${LEDGE_KVM_KIND:-direct} cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
n=${#vmms[@]}
for ((i = 0; i < runs; i++)); do
    for ((j = 0; j < n; j++)); do
        vmm="${vmms[$(((i + j) % n))]}"
        for console in off on; do
            one_boot "$vmm" "$console" "$((i + 1))"
        done
    done
done
rm -rf "$TMP"
