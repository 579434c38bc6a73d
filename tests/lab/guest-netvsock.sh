#!/bin/sh
# Runs inside the Linux guest (busybox sh), put into the initramfs by tests/linux_devices.rs:
#   sh /lab/guest-netvsock.sh PORTBASE
# net: eth0 172.16.0.2/24, ping the host 172.16.0.1, NET_MIB up (host listens on PORTBASE) and
# NET_MIB down (host serves on PORTBASE+1) with busybox nc; rng: RNG_KIB from /dev/hwrng;
# vsock: an echo server on port PORTBASE+2 for the host's 8 connections, then 8 concurrent
# connections to host port PORTBASE+3. Every result is a "G ..." line; times are /proc/uptime.
B=${1:?port base}
MIB=${NET_MIB:-64}
RNG_BYTES=$((${RNG_KIB:-1024} * 1024))
up() { read -r u _ </proc/uptime; echo "$u"; }
echo "G nproc=$(nproc)"

# --- net
ip addr add 172.16.0.2/24 dev eth0 && ip link set eth0 up
echo "G eth0 features=$(cat /sys/class/net/eth0/device/features 2>/dev/null) mac=$(cat /sys/class/net/eth0/address)"
ping -c 3 -W 10 172.16.0.1
echo "G ping rc=$?"
dd if=/dev/urandom of=/tmp/up.bin bs=1M count="$MIB" 2>/dev/null
echo "G up_sha=$(sha256sum </tmp/up.bin | cut -d' ' -f1) bytes=$(wc -c </tmp/up.bin)"
t0=$(up)
timeout 600 nc 172.16.0.1 "$B" </tmp/up.bin
rc=$?
echo "G up rc=$rc t0=$t0 t1=$(up)"
rm -f /tmp/up.bin
t0=$(up)
# nc half-closes when its stdin ends and would make the host stop sending: keep stdin open
# (the background sleep holds the pipe) and let nc end on the host's EOF.
(sleep 900 &) | timeout 600 nc 172.16.0.1 $((B + 1)) >/tmp/down.bin
rc=$?
echo "G down rc=$rc t0=$t0 t1=$(up) bytes=$(wc -c </tmp/down.bin)"
echo "G down_sha=$(sha256sum </tmp/down.bin | cut -d' ' -f1)"
rm -f /tmp/down.bin
cat /proc/net/dev | grep eth0

# --- rng
echo "G rng_current=$(cat /sys/class/misc/hw_random/rng_current) available=$(cat /sys/class/misc/hw_random/rng_available | tr ' ' ,)"
t0=$(up)
head -c "$RNG_BYTES" /dev/hwrng >/tmp/rng.bin
rc=$?
echo "G rng rc=$rc t0=$t0 t1=$(up) bytes=$(wc -c </tmp/rng.bin) gz=$(gzip -c </tmp/rng.bin | wc -c) sha=$(sha256sum </tmp/rng.bin | cut -d' ' -f1)"

# --- vsock, host -> guest: the host starts its 8 clients when it sees the marker
ledge-lab-tool listen $((B + 2)) 8 >/tmp/vlisten.log 2>&1 &
lp=$!
sleep 1
echo "G vsock-listening"
t0=$(up)
wait $lp
rc=$?
echo "G vsock-h2g-server rc=$rc t0=$t0 t1=$(up)"
sed 's/^/G h2g /' /tmp/vlisten.log
# --- vsock, guest -> host
t0=$(up)
pids=""
for i in 1 2 3 4 5 6 7 8; do
    ledge-lab-tool bulk vsock 2 $((B + 3)) 2097152 $((100 + i)) >/tmp/vbulk$i.log 2>&1 &
    pids="$pids $!"
done
fails=0
for p in $pids; do wait "$p" || fails=$((fails + 1)); done
echo "G vsock-g2h fails=$fails t0=$t0 t1=$(up)"
cat /tmp/vbulk*.log | sed 's/^/G g2h /'
echo "G done"
