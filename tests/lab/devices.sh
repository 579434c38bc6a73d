#!/bin/bash
# The KVM-lab half of tests/linux_devices.rs: runs inside the L1 (tools/kvm-lab.sh --script),
# boots Linux guests under `ledge run` with block, net, vsock, rng and balloon devices, and
# prints what the guest and the host saw; the test asserts on it.
#
# Output: "=== CASE <name>" ... "=== END <name> rc=<ledge exit status>"; in between the guest
# console ("G key=value ..." lines from the guest scripts) and the host's findings as
# "R <name> key=value ...". Times are seconds (EPOCHREALTIME on the host, /proc/uptime in the
# guest); the test computes throughput.
#
# Environment: LEDGE_GUEST_DIR (vmlinux, bzImage, rootfs.ext4), LEDGE_DEVLAB_TOOL (static
# ledge-lab-tool), LEDGE_DEVLAB_INITRD (initramfs with the tool and the guest scripts),
# LEDGE_DEVLAB_E2FS (debugfs and e2fsck, their libraries in lib/; default: from PATH),
# LEDGE_DEVLAB_SNAP_SCRIPT (tests/lab/guest-snap.sh, put into the snap case's root image),
# LEDGE_DEVLAB_CRASH_SCRIPT (tests/lab/guest-crash.sh, for the crash case's root image),
# LEDGE_DEVLAB_CRASH_KILLS (5), LEDGE_DEVLAB_CASES (optional subset: blk net1 net2 snap crash
# balloon), LEDGE_DEVLAB_NET_MIB (64),
# LEDGE_DEVLAB_RNG_KIB (1024).
#
# In the lab, every case ends with "R <name> l1_trouble=N": how many lines of the L1 kernel's
# log say that the L1 itself broke (a lockup, a stall, an oops), each also printed as
# "R <name> l1-dmesg ...". The test retries a case in a fresh L1 only when the L1 broke and
# the guest did not get to the end of its script.
# shellcheck disable=SC2016,SC2046  # guest commands are literal; values have no spaces
set -u
G="$LEDGE_GUEST_DIR"
T="$LEDGE_DEVLAB_TOOL"
I="$LEDGE_DEVLAB_INITRD"
CASES="${LEDGE_DEVLAB_CASES:-blk net1 snap crash balloon}"
NET_MIB="${LEDGE_DEVLAB_NET_MIB:-64}"
RNG_KIB="${LEDGE_DEVLAB_RNG_KIB:-1024}"
W=/tmp/devlab
mkdir -p "$W"
cd "$W" || exit 1
# Keep the L1 kernel's messages off the console so that they do not split result lines.
[[ "${LEDGE_KVM_KIND:-}" == kvm-amd-nested-lab ]] && dmesg -n 1 2>/dev/null
C="console=ttyS0 reboot=k panic=1 quiet"

r() { echo "R $*"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
# waitfor FILE REGEX SECONDS PID: 0 once FILE has a line matching REGEX; 1 on timeout or when
# PID (the VMM) ended first.
waitfor() {
    local i
    for ((i = 0; i < $3 * 5; i++)); do
        grep -qE "$2" "$1" 2>/dev/null && return 0
        kill -0 "$4" 2>/dev/null || { grep -qE "$2" "$1" 2>/dev/null; return; }
        sleep 0.2
    done
    return 1
}
rss_kb() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status" 2>/dev/null; }
# follow LOG: streams LOG's complete lines (the guest console and the VMM's log) to our
# stdout as they come, so that a hang or crash shows where it happened. LOG is created here
# if the VMM's shell has not opened it yet: `tail -f` on a missing file exits at once, and
# the case would then lose every guest line (it happened in CI on a slow L1). Appending
# creates the same inode the VMM's `>` then opens, so tail follows the right file.
FOLLOW=""
follow() {
    : >>"$1"
    (tail -n +1 -f "$1" & echo $! >"$1.tail"; wait) | while IFS= read -r l || [[ -n "$l" ]]; do
        printf '%s\n' "${l%$'\r'}"
    done &
    FOLLOW=$!
}
end_case() { # NAME LOG RC (LOG: the one follow streamed, if any)
    if [[ -f "$2.tail" ]]; then
        sleep 0.5
        kill "$(cat "$2.tail")" 2>/dev/null
        wait "$FOLLOW" 2>/dev/null
    fi
    echo "=== END $1 rc=$3"
}
has() { [[ " $CASES " == *" $1 "* ]]; }
# l1_health NAME: the L1 kernel's own failures so far (lab only: elsewhere dmesg is the host's).
L1_TROUBLE='soft lockup|hard LOCKUP|rcu.*(stall|self-detected)|blocked for more than|BUG:|Oops|general protection fault|stack guard page|double fault|Kernel panic'
l1_health() {
    [[ "${LEDGE_KVM_KIND:-}" == kvm-amd-nested-lab ]] || return 0
    local lines
    lines=$(dmesg 2>/dev/null | grep -E "$L1_TROUBLE")
    if [[ -n "$lines" ]]; then
        r "$1" l1_trouble=$(printf '%s\n' "$lines" | wc -l)
        printf '%s\n' "$lines" | head -n 20 | sed "s/^/R $1 l1-dmesg /"
    else
        r "$1" l1_trouble=0
    fi
}

echo "R lab kvm=${LEDGE_KVM_KIND:-?} nproc=$(nproc) memtotal_kb=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo) uptime=$(cut -d' ' -f1 /proc/uptime)"
E2="${LEDGE_DEVLAB_E2FS:-}"
debugfs() { if [[ -n "$E2" ]]; then LD_LIBRARY_PATH="$E2/lib" "$E2/debugfs" "$@"; else command debugfs "$@"; fi; }
e2fsck() { if [[ -n "$E2" ]]; then LD_LIBRARY_PATH="$E2/lib" "$E2/e2fsck" "$@"; else command e2fsck "$@"; fi; }
debugfs -V >/dev/null 2>&1 || r lab warning=debugfs-does-not-run

# --- block -----------------------------------------------------------------------------------
if has blk; then
    echo "=== CASE blk"
    t_case=$EPOCHREALTIME
    cp "$G/rootfs.ext4" root.img
    dd if=/dev/urandom of=data.img bs=1M count=64 2>/dev/null
    head -c 1048576 data.img >payload.bin
    dd if=/dev/urandom of=ro.img bs=1M count=4 2>/dev/null
    r blk data_sha=$(sha data.img) payload_sha=$(sha payload.bin) ro_sha_before=$(sha ro.img) \
        zero64_sha=$(head -c 67108864 /dev/zero | sha256sum | cut -d' ' -f1)
    # The guest finds its disks by serial (GET_ID), copies the first MiB of the data disk into
    # a file on the root filesystem, measures direct I/O on the data disk, tries to write the
    # read-only disk, syncs and waits to be killed.
    GC='dev() { for d in /sys/block/vd*; do [ $(cat $d/serial) = $1 ] && echo /dev/${d##*/}; done; };'
    GC+=' up() { read -r u _ </proc/uptime; echo $u; };'
    GC+=' for d in /sys/block/vd*; do echo G disk=${d##*/} serial=$(cat $d/serial) ro=$(cat $d/ro) sectors=$(cat $d/size); done;'
    GC+=' D=$(dev ledge-data); R=$(dev ledge-ro); echo G data=$D ro_dev=$R;'
    GC+=" echo G rootdev=\$(stat -c %d /) vda=\$(cat /sys/block/vda/dev) rootfs=\$(grep -E '^[^ ]+ / ' /proc/mounts | cut -d' ' -f3,4 | tr ' ' ,);"
    GC+=' echo G data_sha=$(sha256sum <$D | cut -d\  -f1);'
    GC+=' dd if=$D of=/ledge-payload.bin bs=64k count=16 2>/dev/null; echo G payload_sha=$(sha256sum </ledge-payload.bin | cut -d\  -f1);'
    GC+=' t0=$(up); dd if=$D of=/dev/null bs=1M iflag=direct 2>/dev/null; echo G read_direct rc=$? t0=$t0 t1=$(up) bytes=67108864;'
    GC+=' t0=$(up); dd if=/dev/zero of=$D bs=1M count=64 oflag=direct conv=fsync 2>/dev/null; echo G write_direct rc=$? t0=$t0 t1=$(up) bytes=67108864;'
    GC+=' t0=$(up); dd if=$D of=/dev/null bs=1M 2>/dev/null; echo G read_cached rc=$? t0=$t0 t1=$(up) bytes=67108864;'
    GC+=' dd if=/dev/zero of=$R bs=4k count=1 conv=fsync 2>/tmp/ro.err; echo G ro_write rc=$? err=$(tr \  _ </tmp/ro.err | head -n 1);'
    GC+=' echo G ro_sha=$(sha256sum <$R | cut -d\  -f1);'
    GC+=' sync; echo G sync-returned; sleep 600'
    B="$W/blk.sock"
    rm -f "$B"
    ledge run --log-level info --kernel "$G/bzImage" --mem-mib 256 --api-sock "$B" \
        --disk path="$W/root.img",root,id=ledge-root \
        --disk path="$W/data.img",id=ledge-data \
        --disk path="$W/ro.img",ro,id=ledge-ro \
        --cmdline "$C ledge_cmd=\"$GC\"" >blk.log 2>&1 &
    lp=$!
    follow blk.log
    if waitfor blk.log '^G sync-returned' 600 $lp; then
        # Pause first, so no vCPU thread is inside KVM_RUN when the SIGKILL lands: killing one
        # there sometimes soft-locks the lab's nested kvm_amd (under TCG) for good. A pause
        # flushes nothing: the VMM still gets no chance to write anything on its way out.
        r blk pause="$("$T" http "$B" PATCH /vm '{"state":"Paused"}' | tr ' ' _)"
        kill -KILL $lp
        r blk killed=1
    else
        r blk killed=0 timeout=1
        kill -KILL $lp 2>/dev/null
    fi
    wait $lp
    rc=$?
    r blk data_sha_after=$(sha data.img) ro_sha_after=$(sha ro.img)
    if debugfs -R "cat /ledge-payload.bin" root.img >raw.bin 2>debugfs-raw.err; then :; fi
    r blk debugfs_raw_bytes=$(wc -c <raw.bin) debugfs_raw_sha=$(sha raw.bin)
    cp root.img root.fsck
    e2fsck -fy root.fsck >e2fsck.log 2>&1
    r blk e2fsck_rc=$? e2fsck_summary=$(tail -n 1 e2fsck.log | tr ' ' _)
    debugfs -R "cat /ledge-payload.bin" root.fsck >got.bin 2>debugfs.err
    r blk debugfs_rc=$? debugfs_bytes=$(wc -c <got.bin) debugfs_sha=$(sha got.bin)
    cmp -s got.bin payload.bin && r blk payload_match=1 || r blk payload_match=0
    head -c 300 debugfs-raw.err debugfs.err
    # The L1's own dd on the same file (tmpfs: page cache speed).
    t0=$EPOCHREALTIME
    dd if=data.img of=/dev/null bs=1M 2>/dev/null
    t1=$EPOCHREALTIME
    dd if=/dev/zero of=data.img bs=1M count=64 conv=fsync 2>/dev/null
    t2=$EPOCHREALTIME
    r blk host_read t0=$t0 t1=$t1 bytes=67108864
    r blk host_write t0=$t1 t1=$t2 bytes=67108864
    r blk case_secs_t0=$t_case case_secs_t1=$EPOCHREALTIME
    l1_health blk
    end_case blk blk.log $rc
    rm -f root.fsck raw.bin got.bin data.img
fi

# --- net + rng + vsock ------------------------------------------------------------------------
TAP_OK=0
setup_tap() {
    { busybox tunctl -t tap0 >/dev/null || ip tuntap add dev tap0 mode tap; } &&
        ip addr add 172.16.0.1/24 dev tap0 && ip link set tap0 up && TAP_OK=1
    r tap ok=$TAP_OK
}

# netvsock NAME VCPUS PORTBASE
netvsock() {
    local name=$1 vcpus=$2 b=$3 u="$W/$1.vsock" lp rc i pids fails t0 t1 rx0 tx0 p
    echo "=== CASE $name"
    ((TAP_OK)) || setup_tap
    dd if=/dev/urandom of=down.bin bs=1M count="$NET_MIB" 2>/dev/null
    r "$name" down_sha=$(sha down.bin) bytes=$(wc -c <down.bin)
    rm -f up.recv "$u" "${u}_$((b + 3))"
    # Guest -> host: the host's nc must not half-close (its stdin stays open: a pipe from a
    # sleep) or the guest's nc would stop sending; it ends when the guest closes.
    timeout 900 nc -l -p "$b" >up.recv < <(sleep 900) &
    local upl=$!
    timeout 900 nc -l -p $((b + 1)) <down.bin &
    local dnl=$!
    "$T" uds-echo "${u}_$((b + 3))" 8 >"$name.uds-echo.log" 2>&1 &
    local ep=$!
    rx0=$(cat /sys/class/net/tap0/statistics/rx_bytes)
    tx0=$(cat /sys/class/net/tap0/statistics/tx_bytes)
    ledge run --log-level debug --kernel "$G/bzImage" --initrd "$I" --vcpus "$vcpus" --mem-mib 512 \
        --net tap=tap0 --vsock cid=3,uds="$u" --rng \
        --cmdline "$C ledge_cmd=\"NET_MIB=$NET_MIB RNG_KIB=$RNG_KIB sh /lab/guest-netvsock.sh $b\"" >"$name.log" 2>&1 &
    lp=$!
    follow "$name.log"
    if waitfor "$name.log" '^G vsock-listening' 900 $lp; then
        t0=$EPOCHREALTIME
        pids=()
        for i in 1 2 3 4 5 6 7 8; do
            "$T" bulk uds "$u" $((b + 2)) 2097152 $i >"$name.bulk$i.log" 2>&1 &
            pids+=($!)
        done
        fails=0
        for p in "${pids[@]}"; do wait "$p" || fails=$((fails + 1)); done
        t1=$EPOCHREALTIME
        r "$name" vsock_h2g fails=$fails t0=$t0 t1=$t1
        sed "s/^/R $name h2g /" "$name".bulk*.log
    else
        r "$name" vsock_h2g never-listening=1
    fi
    waitfor "$name.log" '^G done' 600 $lp || r "$name" guest_done=0
    # The guest reboots after its script; give it a moment, then make sure it is gone.
    for ((i = 0; i < 100; i++)); do kill -0 $lp 2>/dev/null || break; sleep 0.2; done
    kill -0 $lp 2>/dev/null && { r "$name" ledge_still_running=1; kill -KILL $lp; }
    wait $lp
    rc=$?
    # Listeners still waiting (a failed transfer) must not linger: give them 5 s.
    for p in $upl $dnl $ep; do
        for ((i = 0; i < 25; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$p" 2>/dev/null && { r "$name" listener_killed=$p; kill "$p"; }
    done
    wait $upl; r "$name" up_listener_rc=$?
    wait $dnl; r "$name" down_listener_rc=$?
    wait $ep; r "$name" host_echo_rc=$?
    sed "s/^/R $name host-echo /" "$name.uds-echo.log"
    r "$name" up_recv_sha=$(sha up.recv) up_recv_bytes=$(wc -c <up.recv)
    r "$name" tap_rx=$(($(cat /sys/class/net/tap0/statistics/rx_bytes) - rx0)) tap_tx=$(($(cat /sys/class/net/tap0/statistics/tx_bytes) - tx0))
    if ((rc != 0)); then
        r "$name" failed=1
        dmesg | tail -n 30 | sed "s/^/R $name l1-dmesg-tail /"
    fi
    l1_health "$name"
    end_case "$name" "$name.log" $rc
    rm -f up.recv down.bin
}

if has net1; then netvsock net1 1 5000; fi
if has net2; then netvsock net2 2 5100; fi

# --- snapshot ---------------------------------------------------------------------------------
# A Linux guest with a data disk, net and vsock is paused, snapshotted and SIGKILLed; a new
# process restores it with another TAP and another vsock socket. The host reports the ticks
# around the restore, what the data disk holds, ping and vsock echo before and after.
# complete_lines FILE: FILE without \r and without a last line that has no newline yet (the
# console of a VM paused in the middle of printing it).
complete_lines() {
    if [[ -n "$(tail -c 1 "$1")" ]]; then sed '$d' "$1"; else cat "$1"; fi | tr -d '\r'
}

if has snap; then
    echo "=== CASE snap"
    ((TAP_OK)) || setup_tap
    SP=6000
    rm -f snap1.sock snap2.sock snap1.vsock snap2.vsock snap.state snap.mem
    dd if=/dev/zero of=snap-data.img bs=1M count=4 2>/dev/null
    # The root filesystem on virtio-blk, with the helper and the guest script put in by debugfs.
    cp "$G/rootfs.ext4" snap-root.img
    printf 'mkdir /lab\nwrite %s /lab/ledge-lab-tool\nwrite %s /lab/guest-snap.sh\nsif /lab/ledge-lab-tool mode 0100755\n' \
        "$T" "$LEDGE_DEVLAB_SNAP_SCRIPT" >snap-debugfs.cmd
    debugfs -w -f snap-debugfs.cmd snap-root.img >snap-debugfs.log 2>&1
    r snap root_prepared_rc=$?
    cat >snap.json <<JSON
{"machine": {"vcpus": 1, "mem_mib": 256},
 "boot": {"kernel": "$G/bzImage",
          "cmdline": "$C ledge_cmd=\"sh /lab/guest-snap.sh $SP /dev/vdb\""},
 "disks": [{"path": "$W/snap-root.img", "id": "root", "root": true},
           {"path": "$W/snap-data.img", "id": "data"}],
 "nets": [{"tap": "tap0", "id": "eth0"}],
 "vsock": {"cid": 3, "uds": "$W/snap1.vsock"},
 "console": "stdio"}
JSON
    ledge --api-sock "$W/snap1.sock" --config-file snap.json >snap1.log 2>&1 &
    lp=$!
    follow snap1.log
    f1=$FOLLOW
    rc=1
    if waitfor snap1.log '^G tick=5[[:space:]]' 900 $lp; then
        r snap ping_before_rc="$(ping -c 2 -W 5 172.16.0.2 >/dev/null 2>&1; echo $?)"
        "$T" bulk uds "$W/snap1.vsock" $SP 65536 1 >snap-v1.log 2>&1
        r snap vsock_before_rc=$?
        sed 's/^/R snap vsock-before /' snap-v1.log
        r snap pause="$("$T" http "$W/snap1.sock" PATCH /vm '{"state":"Paused"}' | tr ' ' _)"
        t0=$EPOCHREALTIME
        ledge snapshot create --api-sock "$W/snap1.sock" --snapshot snap.state --mem snap.mem
        r snap create_rc=$? t0=$t0 t1=$EPOCHREALTIME \
            mem_bytes=$(stat -c %s snap.mem) mem_alloc_kb=$(du -k snap.mem | cut -f1) \
            state_bytes=$(stat -c %s snap.state)
        sleep 0.5
        kill -KILL $lp
        wait $lp
        kill "$(cat snap1.log.tail)" 2>/dev/null
        wait "$f1" 2>/dev/null
        last1=$(complete_lines snap1.log | sed -n 's/^G tick=\([0-9]*\)$/\1/p' | tail -n 1)
        r snap last_tick_before=$last1
        # The new process gets another TAP, with the host's address moved over to it.
        ip link del tap0
        TAP_OK=0
        { busybox tunctl -t tap1 >/dev/null || ip tuntap add dev tap1 mode tap; } &&
            ip addr add 172.16.0.1/24 dev tap1 && ip link set tap1 up
        r snap tap1_rc=$?
        t0=$EPOCHREALTIME
        ledge restore --snapshot snap.state --mem snap.mem --api-sock "$W/snap2.sock" \
            --net-override eth0=tap1 --vsock-override "$W/snap2.vsock" >snap2.log 2>&1 &
        lp=$!
        follow snap2.log
        if waitfor snap2.log '^G tick=' 300 $lp; then
            r snap restored t0=$t0 t1=$EPOCHREALTIME
            first2=$(complete_lines snap2.log | sed -n 's/^G tick=\([0-9]*\)$/\1/p' | head -n 1)
            r snap first_tick_after=$first2
            r snap ping_after_rc="$(ping -c 3 -W 10 172.16.0.2 >/dev/null 2>&1; echo $?)"
            "$T" bulk uds "$W/snap2.vsock" $SP 65536 2 >snap-v2.log 2>&1
            r snap vsock_after_rc=$?
            sed 's/^/R snap vsock-after /' snap-v2.log
            waitfor snap2.log "^G tick=$((first2 + 5))[[:space:]]" 300 $lp
            r snap state_after="$("$T" http "$W/snap2.sock" GET / | tr ' ' _ | cut -c1-120)"
            rc=0
        else
            r snap never-resumed=1
        fi
        kill -KILL $lp
        wait $lp
        last2=$(complete_lines snap2.log | sed -n 's/^G tick=\([0-9]*\)$/\1/p' | tail -n 1)
        r snap last_tick_after=$last2 checked=1
        # Every printed tick is in its sector of the data disk.
        missing=0
        for ((i = 1; i <= ${last2:-0}; i++)); do
            got=$(dd if=snap-data.img bs=512 skip=$i count=1 2>/dev/null | head -c 16 | tr -d '\0 \n')
            [[ "$got" == "TICK$i" ]] || missing=$((missing + 1))
        done
        r snap disk_missing=$missing
        # The root filesystem after a SIGKILL: journal replay, no damage, the marker there.
        e2fsck -fy snap-root.img >snap-e2fsck.log 2>&1
        r snap root_fsck_rc=$? marker="$(debugfs -R 'cat /snap-marker' snap-root.img 2>/dev/null | tr ' ' _)"
        ip link del tap1 2>/dev/null
    else
        r snap never-ready=1
        kill -KILL $lp 2>/dev/null
        wait $lp
    fi
    l1_health snap
    end_case snap snap2.log $rc
    rm -f snap.mem snap.state snap-data.img snap-root.img
fi

# --- crash ------------------------------------------------------------------------------------
# kill -9 of the VMM while a Linux guest writes and fsyncs files on its ext4 root, several times,
# each boot on the image the last kill left. After each kill, on a copy of the image: e2fsck
# replays the journal and repairs nothing (rc 0 or 1), a second e2fsck finds it clean (rc 0),
# and every file whose fsync the guest saw return is there with its contents.
if has crash; then
    echo "=== CASE crash"
    KILLS="${LEDGE_DEVLAB_CRASH_KILLS:-5}"
    rm -f crash-acked.txt
    cp "$G/rootfs.ext4" crash-root.img
    printf 'mkdir /lab\nwrite %s /lab/guest-crash.sh\n' "$LEDGE_DEVLAB_CRASH_SCRIPT" >crash-debugfs.cmd
    debugfs -w -f crash-debugfs.cmd crash-root.img >crash-debugfs.log 2>&1
    r crash root_prepared_rc=$?
    rc=0
    for ((k = 1; k <= KILLS; k++)); do
        ledge run --kernel "$G/bzImage" --mem-mib 128 --disk path="$W/crash-root.img,root" \
            --cmdline "$C ledge_cmd=\"sh /lab/guest-crash.sh $k\"" >crash-$k.log 2>&1 &
        lp=$!
        # Kill after a random number of records (5..24), then a random 0..0.3 s later.
        n=$((5 + RANDOM % 20))
        if waitfor crash-$k.log "^G crash-rec=$k-$n[[:space:]]" 600 $lp; then
            sleep "$(printf '0.%03d' $((RANDOM % 300)))"
            kill -KILL $lp
            wait $lp
        else
            r crash kill=$k never-wrote=1
            kill -KILL $lp 2>/dev/null
            wait $lp
            tail -n 20 crash-$k.log | sed 's/^/R crash console /'
            rc=1
            break
        fi
        complete_lines crash-$k.log | grep -E '^G crash-ready|EXT4-fs|I/O error' | head -n 5 |
            sed "s/^/R crash console-$k /"
        acked=$(complete_lines crash-$k.log | sed -n "s/^G crash-rec=$k-\([0-9]*\)\$/\1/p" | tail -n 1)
        echo "$k ${acked:-0}" >>crash-acked.txt
        cp crash-root.img crash-check.img
        e2fsck -fy crash-check.img >crash-fsck1.log 2>&1
        f1=$?
        e2fsck -fn crash-check.img >crash-fsck2.log 2>&1
        f2=$?
        rm -rf crash-out && mkdir crash-out
        debugfs -R 'rdump /crash crash-out' crash-check.img >/dev/null 2>&1
        missing=0 wrong=0 total=0
        while read -r run count; do
            for ((i = 1; i <= count; i++)); do
                total=$((total + 1))
                f=crash-out/crash/r$run-$i
                if [[ ! -f "$f" ]]; then missing=$((missing + 1))
                elif [[ "$(cat "$f")" != "run $run record $i" ]]; then wrong=$((wrong + 1)); fi
            done
        done <crash-acked.txt
        r crash kill=$k acked=${acked:-0} fsck_replay_rc=$f1 fsck_check_rc=$f2 \
            records_checked=$total missing=$missing wrong=$wrong
        ((f2 == 0)) || sed 's/^/R crash fsck /' crash-fsck2.log | head -n 20
    done
    r crash checked=1
    l1_health crash
    end_case crash crash-1.log $rc
    rm -rf crash-root.img crash-check.img crash-out crash-acked.txt crash-*.log
fi

# --- balloon ----------------------------------------------------------------------------------
if has balloon; then
    echo "=== CASE balloon"
    A="$W/api.sock"
    rm -f "$A"
    # 256 MiB guest; the guest fills 200 MiB, the host inflates by 128 MiB (half), then deflates.
    ledge run --log-level info --kernel "$G/bzImage" --initrd "$I" --mem-mib 256 \
        --balloon mib=0,stats=1 --api-sock "$A" \
        --cmdline "$C ledge_cmd=\"sh /lab/guest-balloon.sh 200 100000\"" >balloon.log 2>&1 &
    lp=$!
    follow balloon.log
    api() { "$T" http "$A" "$@"; }
    # actual_mib N SECONDS: waits until the device reports that the guest holds N MiB.
    actual_mib() {
        local i s
        for ((i = 0; i < $2 * 2; i++)); do
            s=$(api GET /balloon/statistics)
            [[ "$s" == *"\"actual_mib\":$1,"* ]] && { echo "$s"; return 0; }
            sleep 0.5
        done
        echo "$s"
        return 1
    }
    if waitfor balloon.log '^G touched-1' 600 $lp; then
        sleep 2
        r balloon rss_before_kb=$(rss_kb $lp)
        r balloon patch_inflate="$(api PATCH /balloon '{"amount_mib":128}' | tr ' ' _)"
        t0=$EPOCHREALTIME
        s=$(actual_mib 128 300) && r balloon inflated=1 || r balloon inflated=0
        t1=$EPOCHREALTIME
        r balloon stats_inflated="$(echo "$s" | tr ' ' _)" inflate_t0=$t0 inflate_t1=$t1
        waitfor balloon.log '^G inflated' 120 $lp
        sleep 2
        r balloon rss_inflated_kb=$(rss_kb $lp)
        r balloon patch_deflate="$(api PATCH /balloon '{"amount_mib":0}' | tr ' ' _)"
        t0=$EPOCHREALTIME
        s=$(actual_mib 0 300) && r balloon deflated=1 || r balloon deflated=0
        t1=$EPOCHREALTIME
        r balloon stats_deflated="$(echo "$s" | tr ' ' _)" deflate_t0=$t0 deflate_t1=$t1
        r balloon rss_deflated_kb=$(rss_kb $lp)
        if waitfor balloon.log '^G touched-2' 300 $lp; then
            sleep 2
            r balloon rss_touched_kb=$(rss_kb $lp)
        fi
    fi
    kill -TERM $lp 2>/dev/null
    for ((i = 0; i < 50; i++)); do kill -0 $lp 2>/dev/null || break; sleep 0.2; done
    kill -KILL $lp 2>/dev/null
    wait $lp
    rc=$?
    l1_health balloon
    end_case balloon balloon.log $rc
fi
echo "R lab done=1"
