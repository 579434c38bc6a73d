#!/bin/sh
# Runs inside the Linux guest (busybox sh) for the snapshot case of tests/lab/devices.sh:
#   sh /lab/guest-snap.sh PORT
# eth0 172.16.0.2/24; a vsock echo server on PORT that serves connection after connection
# (one made before the snapshot, more after the restore, when Ledge has reset the transport);
# then a tick every 0.2 s: tick N is written to sector N of the data disk (/dev/vda) with
# O_SYNC before "G tick=N" is printed, so every printed tick is on the host's file.
P=${1:?port}
ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up
echo "G snap-net rc=$?"
(while true; do ledge-lab-tool listen "$P" 1 >/dev/null 2>&1 || sleep 0.2; done) &
sleep 1
echo "G snap-ready"
i=0
while true; do
    i=$((i + 1))
    printf 'TICK %-10d\n' "$i" | dd of=/dev/vda bs=512 seek="$i" count=1 conv=notrunc,sync,fsync 2>/dev/null
    echo "G tick=$i"
    sleep 0.2
done
