#!/usr/bin/env python3
"""Boot timing and memory overhead of `ledge run` with the built-in probe guest.

Measures, over N runs (default 20): process launch -> first serial byte, -> probe report
complete ("LEDGE-PROBE done"), -> process exit; and once, the VMM's own memory: process RSS
and PSS after boot minus the guest memory the guest touched (the Rss of the guest RAM
mappings in /proc/PID/smaps). Prints a Markdown table and writes JSON with --json.
Standard library only. The full peer-vs-peer benchmark grows from this (tools/bench).

usage: tools/bench/probe_boot.py [--ledge PATH] [--runs N] [--vcpus N] [--json FILE]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def kvm_kind():
    if not os.path.exists("/dev/kvm"):
        return "none"
    for mod, name in (("kvm_pvm", "kvm-pvm"), ("kvm_amd", "kvm-amd"), ("kvm_intel", "kvm-intel")):
        if os.path.exists(f"/sys/module/{mod}"):
            return name
    return "kvm-unknown"


def one_boot(ledge, vcpus):
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [ledge, "run", "--vcpus", str(vcpus), "--cmdline", "probe=hello"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    first = done = None
    buf = b""
    fd = p.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        now = time.perf_counter() - t0
        if first is None:
            first = now
        buf += chunk
        if done is None and b"LEDGE-PROBE done" in buf:
            done = now
    rc = p.wait()
    end = time.perf_counter() - t0
    if rc != 0 or first is None or done is None:
        sys.exit(f"probe boot failed: rc={rc}, output:\n{buf.decode(errors='replace')}")
    return first, done, end


def smaps_totals(pid, guest_bytes):
    """(rss_kib, pss_kib, guest_rss_kib): guest RAM mappings are the anonymous ones whose size
    matches a guest RAM region (the probe VM here has one region below the gap)."""
    rss = pss = guest = 0
    size = None
    cur_rss = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and len(parts) >= 5 and ":" not in parts[0]:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
            elif parts[0] == "Rss:":
                cur_rss = int(parts[1])
                rss += cur_rss
                if size == guest_bytes:
                    guest += cur_rss
            elif parts[0] == "Pss:":
                pss += int(parts[1])
    return rss, pss, guest


def memory(ledge, mem_mib):
    p = subprocess.Popen(
        [ledge, "run", "--mem-mib", str(mem_mib), "--cmdline", "probe=count"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    buf = b""
    try:
        while b"count: 5\n" not in buf:
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                sys.exit("probe=count ended early")
            buf += chunk
        rss, pss, guest = smaps_totals(p.pid, mem_mib << 20)
    finally:
        p.kill()
        p.wait()
    return {"rss_kib": rss, "pss_kib": pss, "guest_touched_kib": guest,
            "vmm_overhead_rss_kib": rss - guest, "vmm_overhead_pss_kib": pss - guest}


def stats(xs):
    ms = [x * 1000 for x in xs]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--ledge", default=os.path.join(here, "../../target/release/ledge"))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.access(a.ledge, os.X_OK):
        sys.exit(f"{a.ledge} not found: cargo build --release first, or pass --ledge")
    one_boot(a.ledge, a.vcpus)  # warm the page cache
    runs = [one_boot(a.ledge, a.vcpus) for _ in range(a.runs)]
    res = {
        "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
        "kvm": kvm_kind(), "runs": a.runs, "vcpus": a.vcpus,
        "launch_to_first_byte": stats([r[0] for r in runs]),
        "launch_to_report_done": stats([r[1] for r in runs]),
        "launch_to_exit": stats([r[2] for r in runs]),
        "memory_128mib": memory(a.ledge, 128),
        "binary_bytes": os.path.getsize(a.ledge),
    }
    print(f"probe guest, {a.vcpus} vCPU, {a.runs} runs, KVM: {res['kvm']}\n")
    print("| metric | median | min | max |\n|---|---|---|---|")
    for k in ("launch_to_first_byte", "launch_to_report_done", "launch_to_exit"):
        s = res[k]
        print(f"| {k} | {s['median_ms']:.1f} ms | {s['min_ms']:.1f} ms | {s['max_ms']:.1f} ms |")
    m = res["memory_128mib"]
    print(f"\nmemory (128 MiB guest): RSS {m['rss_kib']} KiB, PSS {m['pss_kib']} KiB, guest touched "
          f"{m['guest_touched_kib']} KiB -> VMM overhead RSS {m['vmm_overhead_rss_kib']} KiB, "
          f"PSS {m['vmm_overhead_pss_kib']} KiB; binary {res['binary_bytes']} bytes")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
