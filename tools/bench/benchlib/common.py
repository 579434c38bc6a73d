"""Shared pieces: process timing, /proc memory accounting, statistics, HTTP over a Unix
socket, and what this machine is."""
import ctypes
import http.client
import json
import mmap
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import time


class BenchError(Exception):
    """A scenario could not measure what it set out to (a crash, a timeout, bad output)."""


class Skip(Exception):
    """A scenario, or one VMM in it, cannot run here; the message says why."""


# --- the machine -------------------------------------------------------------------------


def kvm_kind():
    """kvm-pvm (software nested), kvm-amd / kvm-intel (hardware), or none."""
    if not os.path.exists("/dev/kvm"):
        return "none"
    for mod, name in (("kvm_pvm", "kvm-pvm"), ("kvm_amd", "kvm-amd"), ("kvm_intel", "kvm-intel")):
        if os.path.exists(f"/sys/module/{mod}"):
            return name
    return "kvm-unknown"


def kvm_description(kind):
    return {
        "kvm-pvm": "kvm-pvm (software nested virtualization: guest ring 0 emulated)",
        "kvm-amd": "hardware KVM (AMD SVM)",
        "kvm-intel": "hardware KVM (Intel VMX)",
    }.get(kind, kind)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    kind = kvm_kind()
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "kvm": kind,
        "kvm_description": kvm_description(kind),
        "loadavg_at_start": os.getloadavg(),
    }


def mem_available_kib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


def tsc_hz():
    """Host TSC ticks per second, measured against the monotonic clock. KVM runs the guest's
    TSC at the host's rate here, so the probe's `cycles=` convert with it."""
    with open("/proc/cpuinfo") as f:
        flags = next((line for line in f if line.startswith("flags")), "")
    if " constant_tsc" not in flags:
        raise Skip("the host TSC is not constant: guest cycle counts cannot be converted")
    # Python cannot read the TSC itself: a 10-byte function in an executable page does
    # rdtsc; shl $32, %rdx; or %rdx, %rax; ret.
    code = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)
    c0, t0 = rdtsc(), time.perf_counter()
    time.sleep(0.2)
    c1, t1 = rdtsc(), time.perf_counter()
    del rdtsc
    return (c1 - c0) / (t1 - t0)


# --- statistics --------------------------------------------------------------------------


def summary(values):
    """median/min/max (and n) of a list of numbers."""
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def percentile(values, q):
    """The q-th percentile (0-100), nearest rank."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


# --- processes ---------------------------------------------------------------------------


class Run:
    """One VMM process from launch to exit, its stdout read as it arrives.

    Times are seconds from just before the fork (time.perf_counter), the same way for every
    VMM: `first` = first stdout byte, `marks[m]` = the read that completed marker m, `exit` =
    the process was reaped."""

    def __init__(self, argv, markers=(), stdin=subprocess.DEVNULL, env=None, cwd=None):
        self.argv = argv
        self.markers = [m.encode() if isinstance(m, str) else m for m in markers]
        self.out = bytearray()
        self.first = None
        self.marks = {}
        self.exit = None
        self.code = None
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=cwd,
        )
        self.pid = self.proc.pid
        self._fd = self.proc.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._eof = False

    def _pump(self, timeout):
        """Reads what is there (waiting up to `timeout` s); False at end of file."""
        if self._eof:
            return False
        r, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        if not r:
            return True
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return True
        now = time.perf_counter() - self.t0
        if not chunk:
            self._eof = True
            return False
        if self.first is None:
            self.first = now
        start = max(0, len(self.out) - 128)
        self.out += chunk
        for m in self.markers:
            if m not in self.marks and m in self.out[start:]:
                self.marks[m] = now
        return True

    def wait_for(self, marker, timeout):
        """Seconds from launch to `marker` on stdout; BenchError if it does not come."""
        m = marker.encode() if isinstance(marker, str) else marker
        if m not in self.markers:
            self.markers.append(m)
            if m in self.out:
                self.marks[m] = time.perf_counter() - self.t0
        deadline = time.perf_counter() + timeout
        while m not in self.marks:
            left = deadline - time.perf_counter()
            if left <= 0:
                what = self.describe()
                self.kill()
                raise BenchError(f"no {marker!r} within {timeout} s from {what}")
            if not self._pump(min(left, 0.5)) and not self.alive():
                self.finish(1)
                raise BenchError(f"exited ({self.code}) before {marker!r}: {self.describe()}")
        return self.marks[m]

    def finish(self, timeout):
        """Reads to end of file and reaps the process; returns its exit code."""
        deadline = time.perf_counter() + timeout
        while self._pump(max(0.0, min(0.5, deadline - time.perf_counter()))):
            if time.perf_counter() > deadline:
                what = self.describe()
                self.kill()
                raise BenchError(f"still running after {timeout} s: {what}")
        self._reap(deadline)
        return self.code

    def alive(self):
        """False once the process has exited (it is then reaped, and exit and code set)."""
        if self.code is not None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid != self.pid:
            return True
        self.exit = time.perf_counter() - self.t0
        self.code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.code
        return False

    def _reap(self, deadline):
        while self.alive():
            if time.perf_counter() > deadline:
                what = self.describe()
                self.kill()
                raise BenchError(f"did not exit in time: {what}")
            time.sleep(0.0002)

    def stderr(self):
        try:
            os.set_blocking(self.proc.stderr.fileno(), False)
            return (self.proc.stderr.read() or b"").decode(errors="replace")
        except (OSError, ValueError, TypeError):
            return ""

    def kill(self, sig=signal.SIGKILL):
        """Sends `sig` (SIGKILL after 10 s if the process is still there) and reaps it."""
        for s, grace in ((sig, 10), (signal.SIGKILL, 30)):
            if not self.alive():
                break
            try:
                os.kill(self.pid, s)
            except ProcessLookupError:
                pass
            deadline = time.perf_counter() + grace
            while self.alive() and time.perf_counter() < deadline:
                time.sleep(0.001)
        self.close()

    def close(self):
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()

    def describe(self):
        tail = self.out[-600:].decode(errors="replace")
        cmd = " ".join(map(str, self.argv))
        return f"{cmd}\n--- stdout (tail)\n{tail}\n--- stderr\n{self.stderr()[-600:]}"


def smaps_memory(pid, guest_mib):
    """The process's Rss and Pss (smaps_rollup), peak RSS (VmHWM), and the resident part of
    the guest's RAM: the anonymous or file mappings in smaps whose size is the guest size
    (up to 4 MiB over it: a VMM may align it, or the kernel merge it with a neighbour)."""
    roll = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                roll[parts[0][:-1]] = int(parts[1])
    guest_rss = guest_pss = 0
    size = None
    lo_bound, hi_bound = guest_mib << 20, (guest_mib + 4) << 20
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and ":" not in parts[0] and len(parts) >= 5:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                size = hi - lo
            elif parts[0] == "Rss:" and size is not None and lo_bound <= size <= hi_bound:
                guest_rss += int(parts[1])
            elif parts[0] == "Pss:" and size is not None and lo_bound <= size <= hi_bound:
                guest_pss += int(parts[1])
    hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return {
        "rss_kib": roll.get("Rss", 0),
        "pss_kib": roll.get("Pss", 0),
        "guest_rss_kib": guest_rss,
        "guest_pss_kib": guest_pss,
        "vmm_rss_kib": roll.get("Rss", 0) - guest_rss,
        "vmm_pss_kib": roll.get("Pss", 0) - guest_pss,
        "hwm_kib": hwm,
    }


def process_tree_memory(pid):
    """Rss and Pss (KiB) of a process from smaps_rollup; zeros if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            vals = {}
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] in ("Rss:", "Pss:"):
                    vals[parts[0][:-1]] = int(parts[1])
        return vals.get("Rss", 0), vals.get("Pss", 0)
    except OSError:
        return 0, 0


# --- HTTP over a Unix socket (the Firecracker-style API) ----------------------------------


class UnixHTTP(http.client.HTTPConnection):
    """A keep-alive HTTP/1.1 connection over a Unix socket."""

    def __init__(self, path, timeout=30.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s

    def call(self, method, path, body=None):
        """One request; (status, body bytes)."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.request(method, path, body=data, headers=headers)
        r = self.getresponse()
        return r.status, r.read()

    def expect(self, method, path, body, status):
        got, data = self.call(method, path, body)
        if got != status:
            raise BenchError(f"{method} {path} {body}: expected {status}, got {got} {data!r}")
        return data


class RawHTTP:
    """A keep-alive HTTP/1.1 client over a Unix socket for the timed loops: requests are
    prebuilt bytes and responses are read with the least parsing (status, Content-Length),
    so the client adds as little as it can to the latency measured."""

    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    @staticmethod
    def build(method, path, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        return head.encode() + b"\r\n" + data

    def send(self, request):
        """Sends a prebuilt request; returns the response's status code."""
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            self.buf = rest
            self._recv()
            rest = self.buf
        self.buf = rest[length:]
        return status

    def _recv(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise BenchError("the API closed the connection")
        self.buf += chunk

    def close(self):
        self.sock.close()


def wait_api(run, sock, timeout=30.0):
    """Polls until `GET /` on `sock` answers 200; returns seconds since `run` launched."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            c = UnixHTTP(sock, timeout=timeout)
            status, _ = c.call("GET", "/")
            c.close()
            if status == 200:
                return time.perf_counter() - run.t0
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            pass
        if not run.alive():
            raise BenchError(f"exited before serving its API: {run.describe()}")
        if time.perf_counter() > deadline:
            run.kill()
            raise BenchError(f"{sock} did not answer within {timeout} s")
        time.sleep(0.0001)
