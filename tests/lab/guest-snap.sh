#!/bin/sh
# Runs inside the Linux guest (busybox sh) for the snapshot case of tests/lab/devices.sh:
#   sh /lab/guest-snap.sh PORT DISK
# The root filesystem is ext4 on virtio-blk (/dev/vda): this writes /snap-marker on it and
# syncs. eth0 172.16.0.2/24; a vsock echo server on PORT that serves connection after
# connection (one made before the snapshot, more after the restore, when Ledge has reset the
# transport); then a tick every 0.2 s: tick N is written to sector N of DISK (the raw data
# disk) with an fsync before "G tick=N" is printed, so every printed tick is on the host's file.
P=${1:?port}
D=${2:?data disk}
TOOL=ledge-lab-tool
[ -x /lab/ledge-lab-tool ] && TOOL=/lab/ledge-lab-tool
echo "written before the snapshot" >/snap-marker && sync
echo "G snap-marker rc=$?"
ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up
echo "G snap-net rc=$?"
(while true; do "$TOOL" listen "$P" 1 >/dev/null 2>&1 || sleep 0.2; done) &
sleep 1
echo "G snap-ready"
i=0
while true; do
    i=$((i + 1))
    printf 'TICK %-10d\n' "$i" | dd of="$D" bs=512 seek="$i" count=1 conv=notrunc,sync,fsync 2>/dev/null
    echo "G tick=$i"
    sleep 0.2
done
