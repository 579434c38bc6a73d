#!/bin/sh
# Runs inside the Linux guest (busybox sh) for the crash case of tests/lab/devices.sh:
#   sh /lab/guest-crash.sh RUN
# The root filesystem is ext4 on virtio-blk (/dev/vda). Record after record, as fast as the
# disk allows: /crash/r<RUN>-<N> is created, written and fsync'd (dd conv=fsync), and only
# then "G crash-rec=<RUN>-<N>" is printed. The host kills the VMM at a random moment; every
# record printed must be in the filesystem afterwards, with its contents.
R=${1:?run}
mkdir -p /crash && sync
echo "G crash-ready run=$R"
i=0
while true; do
    i=$((i + 1))
    printf 'run %s record %s\n' "$R" "$i" | dd of="/crash/r$R-$i" bs=64 conv=fsync 2>/dev/null ||
        { echo "G crash-write-failed=$R-$i"; exit 1; }
    echo "G crash-rec=$R-$i"
done
