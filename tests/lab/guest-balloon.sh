#!/bin/sh
# Runs inside the Linux guest (busybox sh), put into the initramfs by tests/linux_devices.rs:
#   sh /lab/guest-balloon.sh FILL_MIB DROP_KB
# Touches FILL_MIB of memory (a tmpfs file), says so, waits until the host's balloon took
# DROP_KB out of MemTotal, then until it gave it back, touches the memory again, says so and
# idles until the host ends the VMM. Every result is a "G ..." line.
FILL=${1:?fill MiB}
DROP=${2:?MemTotal drop in kB}
memtotal() { sed -n 's/^MemTotal: *\([0-9]*\) kB/\1/p' /proc/meminfo; }
mount -o remount,size=$((FILL + 16))m /tmp
full=$(memtotal)
echo "G memtotal=$full"
dd if=/dev/zero of=/tmp/fill bs=1M count="$FILL" 2>/dev/null
echo "G touch1 rc=$? free=$(sed -n 's/^MemFree: *//p' /proc/meminfo | tr -d ' ')"
rm -f /tmp/fill
echo "G touched-1"
i=0
while [ "$(memtotal)" -gt $((full - DROP)) ]; do
    i=$((i + 1)); [ $i -gt 1200 ] && { echo "G inflate-timeout memtotal=$(memtotal)"; exit 1; }
    sleep 0.5
done
echo "G inflated memtotal=$(memtotal)"
i=0
while [ "$(memtotal)" -lt $((full - 1024)) ]; do
    i=$((i + 1)); [ $i -gt 1200 ] && { echo "G deflate-timeout memtotal=$(memtotal)"; exit 1; }
    sleep 0.5
done
echo "G deflated memtotal=$(memtotal)"
dd if=/dev/zero of=/tmp/fill bs=1M count="$FILL" 2>/dev/null
echo "G touch2 rc=$?"
echo "G touched-2"
sleep 600
