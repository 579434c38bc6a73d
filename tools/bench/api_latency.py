#!/usr/bin/env python3
"""Control-API latency and memory of `ledge --api-sock`, with the probe guest.

Measures:
  - process launch -> the socket answers a request (`GET /` returns 200): median, min and max
    over --launches runs (default 20) of `ledge --api-sock`, each stopped with SIGTERM;
  - `GET /` latency, p50 and p99 over --calls calls (default 1000) on one keep-alive
    connection: before boot, and with the probe guest running;
  - `PATCH /vm` Paused + `PATCH /vm` Resumed, as one pair, p50 and p99 over --pairs pairs
    (default 1000) with the probe guest running `probe=count` (console to /dev/null);
  - the VMM's memory (Rss, Pss from /proc/PID/smaps_rollup; the guest RAM's resident part from
    /proc/PID/smaps) with the API thread serving: idle before boot, and with the probe running.

Prints a Markdown table and, with --json FILE, writes the numbers as JSON. Standard library
only: http.client over AF_UNIX through a small HTTPConnection subclass.

usage: tools/bench/api_latency.py [--ledge PATH] [--launches N] [--calls N] [--pairs N]
                                  [--mem-mib N] [--json FILE]
"""
import argparse
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection (keep-alive) over a Unix socket."""

    def __init__(self, unix_path, timeout=30.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = unix_path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def request(conn, method, path, body=None):
    """One request on `conn`; returns (status, body bytes)."""
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    return r.status, r.read()


def expect(conn, method, path, body, status):
    got, data = request(conn, method, path, body)
    if got != status:
        sys.exit(f"{method} {path} {body}: expected {status}, got {got} {data!r}")
    return data


def kvm_kind():
    if not os.path.exists("/dev/kvm"):
        return "none"
    for mod, name in (("kvm_pvm", "kvm-pvm"), ("kvm_amd", "kvm-amd"), ("kvm_intel", "kvm-intel")):
        if os.path.exists(f"/sys/module/{mod}"):
            return name
    return "kvm-unknown"


def spawn(ledge, sock, stdout=subprocess.DEVNULL):
    return subprocess.Popen(
        [ledge, "--api-sock", sock, "--id", "bench"],
        stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
    )


def wait_accepting(p, sock, limit=30.0):
    """Polls until `GET /` on `sock` answers 200; returns the time it happened."""
    start = time.perf_counter()
    while True:
        try:
            c = UnixHTTPConnection(sock, timeout=limit)
            status, _ = request(c, "GET", "/")
            c.close()
            if status == 200:
                return time.perf_counter()
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        if p.poll() is not None:
            sys.exit(f"ledge exited ({p.returncode}) before serving: {p.stderr.read().decode()}")
        if time.perf_counter() - start > limit:
            sys.exit(f"{sock} did not answer within {limit} s")
        time.sleep(0.0002)


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        sys.exit("ledge did not exit after SIGTERM")
    if rc != 0:
        sys.exit(f"ledge exit status {rc} after SIGTERM: {p.stderr.read().decode()}")


def launches(ledge, n, tmp):
    times = []
    for i in range(n):
        sock = os.path.join(tmp, f"launch{i}.sock")
        t0 = time.perf_counter()
        p = spawn(ledge, sock)
        t1 = wait_accepting(p, sock)
        times.append((t1 - t0) * 1000.0)
        stop(p)
    return times


def pct(xs, q):
    """The q-th percentile (0-100) of xs, nearest rank."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def get_latency(sock, n):
    conn = UnixHTTPConnection(sock)
    out = []
    for _ in range(20):  # warm-up
        expect(conn, "GET", "/", None, 200)
    for _ in range(n):
        t0 = time.perf_counter_ns()
        conn.request("GET", "/", headers={"Accept": "application/json"})
        r = conn.getresponse()
        r.read()
        t1 = time.perf_counter_ns()
        if r.status != 200:
            sys.exit(f"GET / answered {r.status}")
        out.append((t1 - t0) / 1000.0)
    conn.close()
    return out


def pause_resume_latency(sock, n):
    conn = UnixHTTPConnection(sock)
    paused = json.dumps({"state": "Paused"}).encode()
    resumed = json.dumps({"state": "Resumed"}).encode()
    hdr = {"Content-Type": "application/json", "Accept": "application/json"}
    out = []
    for i in range(n + 10):
        t0 = time.perf_counter_ns()
        for body in (paused, resumed):
            conn.request("PATCH", "/vm", body=body, headers=hdr)
            r = conn.getresponse()
            data = r.read()
            if r.status != 204:
                sys.exit(f"PATCH /vm {body!r}: {r.status} {data!r}")
        t1 = time.perf_counter_ns()
        if i >= 10:  # the first ten are warm-up
            out.append((t1 - t0) / 1000.0)
    conn.close()
    return out


def memory(pid, mem_mib):
    """Rss/Pss of the whole process (smaps_rollup), the guest RAM's resident part, and the
    thread count. Guest RAM is the anonymous mapping in /proc/PID/smaps of the guest's size;
    the kernel may merge it with an adjacent anonymous mapping (a malloc arena), so sizes up
    to 4 MiB larger count too (the neighbour's few resident KiB then count as guest RAM)."""
    roll = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                roll[parts[0][:-1]] = int(parts[1])
    guest = 0
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and ":" not in parts[0] and len(parts) >= 5:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo if len(parts) == 5 else None  # anonymous only
            elif parts[0] == "Rss:" and size is not None and \
                    mem_mib << 20 <= size <= (mem_mib + 4) << 20:
                guest += int(parts[1])
    threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {
        "rss_kib": roll.get("Rss", 0),
        "pss_kib": roll.get("Pss", 0),
        "guest_ram_rss_kib": guest,
        "vmm_rss_kib": roll.get("Rss", 0) - guest,
        "threads": threads,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ledge", default="target/release/ledge")
    ap.add_argument("--launches", type=int, default=20)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--mem-mib", type=int, default=128)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    ledge = os.path.abspath(a.ledge)
    if not os.access(ledge, os.X_OK):
        sys.exit(f"{ledge}: not an executable (build it: cargo build --release)")
    kind = kvm_kind()
    tmp = tempfile.mkdtemp(prefix="ledge-api-bench-")
    probe = os.path.join(tmp, "probe.elf")
    subprocess.run([ledge, "export-probe", probe], check=True)

    launch = launches(ledge, a.launches, tmp)

    sock = os.path.join(tmp, "api.sock")
    p = spawn(ledge, sock)
    wait_accepting(p, sock)
    time.sleep(0.2)
    mem_idle = memory(p.pid, a.mem_mib)
    get_idle = get_latency(sock, a.calls)
    conn = UnixHTTPConnection(sock)
    expect(conn, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": a.mem_mib}, 204)
    expect(conn, "PUT", "/boot-source",
           {"kernel_image_path": probe, "boot_args": "probe=count"}, 204)
    expect(conn, "PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    state = json.loads(expect(conn, "GET", "/", None, 200))["state"]
    if state != "Running":
        sys.exit(f"state after InstanceStart: {state}")
    conn.close()
    time.sleep(1.0)
    mem_running = memory(p.pid, a.mem_mib)
    get_running = get_latency(sock, a.calls)
    pairs = pause_resume_latency(sock, a.pairs)
    mem_after = memory(p.pid, a.mem_mib)
    stop(p)

    def summary(xs):
        return {"n": len(xs), "p50": pct(xs, 50), "p99": pct(xs, 99),
                "min": min(xs), "max": max(xs), "mean": statistics.fmean(xs)}

    result = {
        "kvm": kind,
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "loadavg": os.getloadavg()},
        "ledge": ledge,
        "launch_to_accepting_ms": {"n": len(launch), "median": statistics.median(launch),
                                   "min": min(launch), "max": max(launch)},
        "get_root_us": {"pre_boot": summary(get_idle), "probe_running": summary(get_running)},
        "pause_resume_pair_us": summary(pairs),
        "memory_kib": {"idle_pre_boot": mem_idle, "probe_running": mem_running,
                       "after_pause_resume_pairs": mem_after},
        "guest_mem_mib": a.mem_mib,
    }

    l = result["launch_to_accepting_ms"]
    g0, g1 = result["get_root_us"]["pre_boot"], result["get_root_us"]["probe_running"]
    pr = result["pause_resume_pair_us"]
    print(f"## Ledge control API on {kind} ({os.cpu_count()} CPUs, "
          f"load {result['host']['loadavg'][0]:.2f}, kernel {platform.release()})\n")
    print("| measure | n | p50 / median | p99 | min | max |")
    print("|---|---|---|---|---|---|")
    print(f"| launch → socket answers `GET /` (ms) | {l['n']} | {l['median']:.2f} | – "
          f"| {l['min']:.2f} | {l['max']:.2f} |")
    for name, s in (("`GET /`, keep-alive, pre-boot (µs)", g0),
                    ("`GET /`, keep-alive, probe running (µs)", g1),
                    ("`PATCH /vm` Paused + Resumed pair, probe running (µs)", pr)):
        print(f"| {name} | {s['n']} | {s['p50']:.0f} | {s['p99']:.0f} | {s['min']:.0f} "
              f"| {s['max']:.0f} |")
    print()
    print("| VMM memory (KiB) | Rss | Pss | guest RAM resident | Rss − guest RAM | threads |")
    print("|---|---|---|---|---|---|")
    for name, m in (("idle, pre-boot, API thread serving", mem_idle),
                    (f"probe running ({a.mem_mib} MiB guest)", mem_running),
                    ("after the pause/resume pairs", mem_after)):
        print(f"| {name} | {m['rss_kib']} | {m['pss_kib']} | {m['guest_ram_rss_kib']} "
              f"| {m['vmm_rss_kib']} | {m['threads']} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nJSON written to {a.json}")
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)


if __name__ == "__main__":
    main()
