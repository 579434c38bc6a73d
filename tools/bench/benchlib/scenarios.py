"""The benchmark scenarios. Each takes the Context, measures every VMM present the same way,
interleaved (A/B/A/B), and records samples with ctx.add; what it cannot do it reports with
ctx.skip and a reason instead of a number."""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from .common import (
    BenchError,
    RawHTTP,
    Run,
    Skip,
    UnixHTTP,
    mem_available_kib,
    percentile,
    process_tree_memory,
    smaps_memory,
    tsc_hz,
    wait_api,
)
from .vmms import PROBE_MARKER, PROBE_START, ProbeConfig

BOOT_TIMEOUT = 60


def probe_boot(vmm, cfg, workdir, timeout=BOOT_TIMEOUT):
    """Boots the probe to its stop; the finished Run (checked: exit status and report)."""
    run = Run(vmm.probe_argv(cfg, workdir), markers=[PROBE_START, PROBE_MARKER])
    code = run.finish(timeout)
    if code not in vmm.ok_codes or PROBE_MARKER.encode() not in run.marks:
        raise BenchError(f"{vmm.name}: probe run failed (exit {code}): {run.describe()}")
    return run


def field(line, key):
    for word in line.split():
        if word.startswith(key + "="):
            return word[len(key) + 1:]
    raise BenchError(f"{key}= missing in {line!r}")


def out_line(run, prefix):
    for line in run.out.decode(errors="replace").splitlines():
        if line.startswith(prefix):
            return line
    raise BenchError(f"no line starting {prefix!r}: {run.describe()}")


# --- 1. boot, probe guest --------------------------------------------------------------


def boot_probe(ctx):
    sc = "boot-probe"
    work = ctx.scratch(sc)
    for vcpus in (1, 4):
        cfg = ProbeConfig("probe=hello", vcpus=vcpus, mem_mib=128)
        for vmm in ctx.vmms:  # warm the page cache; not counted
            probe_boot(vmm, cfg, work)
        for _, vmm in ctx.interleaved(ctx.runs()):
            r = probe_boot(vmm, cfg, work)
            online = field(out_line(r, "cpus:"), "online")
            if online != str(vcpus):
                raise BenchError(f"{vmm.name}: {online} of {vcpus} vCPUs came up")
            k = f"boot.probe.{vcpus}vcpu"
            # The probe's first line, not the first stdout byte: a VMM may log there too.
            ctx.add(f"{k}.first_output", sc, f"probe {vcpus} vCPU: launch → first serial line",
                    vmm.name, "ms", r.marks[PROBE_START.encode()] * 1000)
            ctx.add(f"{k}.report_done", sc, f"probe {vcpus} vCPU: launch → report complete",
                    vmm.name, "ms", r.marks[PROBE_MARKER.encode()] * 1000)
            ctx.add(f"{k}.exit", sc, f"probe {vcpus} vCPU: launch → process exit",
                    vmm.name, "ms", r.exit * 1000)


# --- 3. API --------------------------------------------------------------------------------


def api_vmms(ctx, sc):
    out = []
    for vmm in ctx.vmms:
        if vmm.has_http_api:
            out.append(vmm)
        else:
            ctx.skip(sc, vmm.name, "no Firecracker-style HTTP API to compare (QEMU speaks QMP)")
    return out


def start_api(vmm, sock):
    """Launches `vmm` serving its API on `sock`; (Run, seconds from launch to answering)."""
    if os.path.exists(sock):
        os.unlink(sock)
    run = Run(vmm.api_argv(sock))
    return run, wait_api(run, sock)


def stop_api(run):
    run.kill(signal.SIGTERM)


def boot_over_api(conn, kernel, cmdline, vcpus=1, mem_mib=128, dirty_tracking=False):
    """Configures and starts the probe over the API. With `dirty_tracking`, asks for
    track_dirty_pages (Diff snapshots need it) and returns whether the VMM accepted it."""
    mc = {"vcpu_count": vcpus, "mem_size_mib": mem_mib}
    tracking = False
    if dirty_tracking:
        status, _ = conn.call("PUT", "/machine-config", dict(mc, track_dirty_pages=True))
        tracking = status == 204
    if not tracking:
        conn.expect("PUT", "/machine-config", mc, 204)
    conn.expect("PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": cmdline}, 204)
    conn.expect("PUT", "/actions", {"action_type": "InstanceStart"}, 204)
    return tracking


def timed_calls(conn, calls):
    """A function timing one pass over `calls` ((method, path, body, status), sent in order
    on the RawHTTP `conn`), in microseconds."""
    reqs = [(RawHTTP.build(method, path, body), status, path) for method, path, body, status
            in calls]

    def once():
        t0 = time.perf_counter_ns()
        for req, want, path in reqs:
            got = conn.send(req)
            if got != want:
                raise BenchError(f"{path}: expected {want}, got {got}")
        return (time.perf_counter_ns() - t0) / 1000.0
    return once


def api(ctx):
    sc = "api"
    work = ctx.scratch(sc)
    n_get = ctx.pick(500, 50)
    n_pairs = ctx.pick(200, 20)
    vmms = api_vmms(ctx, sc)
    for _, vmm in ctx.interleaved(ctx.runs(), vmms):
        sock = os.path.join(work, f"{vmm.name}.sock")
        run, t_sock = start_api(vmm, sock)
        try:
            ctx.add("api.launch_to_socket", sc, "launch → API socket answers `GET /`",
                    vmm.name, "ms", t_sock * 1000)
            conn = UnixHTTP(sock)
            boot_over_api(conn, ctx.probe_elf, "probe=count")
            run.wait_for("count: 1", BOOT_TIMEOUT)
            conn.close()
            conn = RawHTTP(sock)
            get = timed_calls(conn, [("GET", "/", None, 200)])
            pair = timed_calls(conn, [("PATCH", "/vm", {"state": "Paused"}, 204),
                                      ("PATCH", "/vm", {"state": "Resumed"}, 204)])
            for _ in range(10):  # warm-up
                get()
                pair()
            gets = [get() for _ in range(n_get)]
            pairs = [pair() for _ in range(n_pairs)]
            conn.close()
            for name, xs, what in (("get", gets, "`GET /`, guest running"),
                                   ("pause_resume", pairs, "`PATCH /vm` Paused + Resumed")):
                for q in (50, 99):
                    ctx.add(f"api.{name}_p{q}", sc, f"{what}, p{q} of {len(xs)}", vmm.name,
                            "µs", percentile(xs, q))
        finally:
            stop_api(run)


# --- 4. memory ----------------------------------------------------------------------------


def stripped_size(path, work):
    """Bytes of a stripped copy of `path`; Skip if it cannot be stripped (not an ELF)."""
    copy = os.path.join(work, os.path.basename(path) + ".stripped")
    shutil.copyfile(path, copy)
    p = subprocess.run(["strip", copy], capture_output=True, text=True)
    size = os.path.getsize(copy)
    os.unlink(copy)
    if p.returncode != 0:
        raise Skip(f"strip {path}: {p.stderr.strip()}")
    return size


def memory(ctx):
    sc = "memory"
    work = ctx.scratch(sc)
    mem_mib = 128
    count = ProbeConfig("probe=count", vcpus=1, mem_mib=mem_mib)
    for _, vmm in ctx.interleaved(ctx.runs()):
        run = Run(vmm.probe_argv(count, work))
        try:
            run.wait_for("count: 3", BOOT_TIMEOUT)
            m = smaps_memory(run.pid, mem_mib)
        finally:
            run.kill()
        # VmHWM, not wait4's maxrss: that one also counts the forked Python before exec.
        ctx.add("mem.peak_rss", sc, "peak RSS of the process after boot (VmHWM), probe "
                "128 MiB", vmm.name, "MiB", m["hwm_kib"] / 1024,
                note="guest memory touched included")
        ctx.add("mem.vmm_rss", sc, "RSS after boot − guest memory touched", vmm.name, "MiB",
                m["vmm_rss_kib"] / 1024)
        ctx.add("mem.vmm_pss", sc, "PSS after boot − guest memory touched", vmm.name, "MiB",
                m["vmm_pss_kib"] / 1024)
        ctx.add("mem.guest_touched", sc, "guest memory touched (resident)", vmm.name, "MiB",
                m["guest_rss_kib"] / 1024, note="not a VMM cost: what the guest wrote")
    for vmm in ctx.vmms:
        try:
            size = stripped_size(vmm.binary, work)
        except Skip as e:
            ctx.skip(sc, vmm.name, f"binary size: {e}")
            continue
        ctx.add("mem.binary", sc, "binary size, stripped copy", vmm.name, "MiB", size / (1 << 20),
                note="QEMU's shared libraries not counted" if vmm.name == "qemu" else "")


# --- 5. snapshots ---------------------------------------------------------------------------


class SnapshotsUnsupported(Exception):
    pass


def snap_create(conn, path, mem, kind):
    """Microseconds for PUT /snapshot/create of a paused VM."""
    t0 = time.perf_counter()
    status, body = conn.call("PUT", "/snapshot/create",
                             {"snapshot_path": path, "mem_file_path": mem,
                              "snapshot_type": kind})
    dt = time.perf_counter() - t0
    if status in (400, 404):
        raise SnapshotsUnsupported(f"{status} {body.decode(errors='replace')}")
    if status != 204:
        raise BenchError(f"PUT /snapshot/create {kind}: {status} {body!r}")
    return dt


def snap_restore(vmm, sock, path, mem):
    """A new VMM process restores `path`+`mem` and resumes; (Run, seconds from launch to the
    204 of PUT /snapshot/load)."""
    if os.path.exists(sock):
        os.unlink(sock)
    run = Run(vmm.api_argv(sock))
    wait_api(run, sock)
    conn = UnixHTTP(sock)
    conn.expect("PUT", "/snapshot/load",
                {"snapshot_path": path,
                 "mem_backend": {"backend_type": "File", "backend_path": mem},
                 "resume_vm": True}, 204)
    t = time.perf_counter() - run.t0
    conn.close()
    return run, t


def allocated_mib(path):
    """What a (sparse) file really occupies on disk."""
    return os.stat(path).st_blocks * 512 / (1 << 20)


def snapshot(ctx):
    sc = "snapshot"
    work = ctx.scratch(sc)
    sizes = (128, 1024)
    clone_counts = ctx.pick((10, 50, 100), (10,))
    for vmm in ctx.vmms:
        if not vmm.has_http_api:
            ctx.skip(sc, vmm.name, "snapshots are driven through the Firecracker-style API, "
                                   "which this VMM does not have")
    vmms = [v for v in ctx.vmms if v.has_http_api]
    unsupported = {}
    for i, vmm in ctx.interleaved(ctx.runs(), vmms):
        if vmm.name in unsupported:
            continue
        try:
            for mib in sizes:
                snapshot_once(ctx, vmm, work, mib, clones=clone_counts if i == 0 and
                              mib == 128 else ())
        except SnapshotsUnsupported as e:
            unsupported[vmm.name] = True
            ctx.skip(sc, vmm.name, f"snapshots not supported by this build ({e})")


def snapshot_once(ctx, vmm, work, mib, clones=()):
    sc = "snapshot"
    sock = os.path.join(work, f"{vmm.name}.sock")
    snap, mem = os.path.join(work, f"{vmm.name}-{mib}.snap"), os.path.join(work,
                                                                          f"{vmm.name}-{mib}.mem")
    diff = os.path.join(work, f"{vmm.name}-{mib}.diff")
    run, _ = start_api(vmm, sock)
    try:
        conn = UnixHTTP(sock)
        diff_ok = boot_over_api(conn, ctx.probe_elf, "probe=count", mem_mib=mib,
                                dirty_tracking=True)
        run.wait_for("count: 1", BOOT_TIMEOUT)
        conn.expect("PATCH", "/vm", {"state": "Paused"}, 204)
        t_full = snap_create(conn, snap, mem, "Full")
        ctx.add(f"snap.create_full.{mib}", sc, f"create Full snapshot, {mib} MiB guest",
                vmm.name, "ms", t_full * 1000)
        ctx.add(f"snap.size_full.{mib}", sc, f"Full snapshot memory file on disk, {mib} MiB guest",
                vmm.name, "MiB", allocated_mib(mem))
        if diff_ok:
            conn.expect("PATCH", "/vm", {"state": "Resumed"}, 204)
            run.wait_for("count: 3", BOOT_TIMEOUT)
            conn.expect("PATCH", "/vm", {"state": "Paused"}, 204)
            try:
                t_diff = snap_create(conn, diff + ".state", diff, "Diff")
                ctx.add(f"snap.create_diff.{mib}", sc, f"create Diff snapshot, {mib} MiB guest",
                        vmm.name, "ms", t_diff * 1000)
                ctx.add(f"snap.size_diff.{mib}", sc,
                        f"Diff snapshot memory file on disk, {mib} MiB guest", vmm.name, "MiB",
                        allocated_mib(diff))
            except SnapshotsUnsupported as e:
                ctx.skip(sc, vmm.name, f"Diff snapshots refused: {e}")
        else:
            ctx.skip(sc, vmm.name, "Diff snapshot: track_dirty_pages refused by this build")
        conn.close()
    finally:
        stop_api(run)

    restored, t = snap_restore(vmm, os.path.join(work, f"{vmm.name}-r.sock"), snap, mem)
    restored.kill()
    ctx.add(f"snap.restore.{mib}", sc, f"restore: launch → `/snapshot/load` 204, {mib} MiB",
            vmm.name, "ms", t * 1000)

    for n in clones:
        runs = []
        try:
            for k in range(n):
                r, _ = snap_restore(vmm, os.path.join(work, f"{vmm.name}-c{k}.sock"), snap, mem)
                runs.append(r)
                # Stopped once restored, as in the density scenario: memory is what counts.
                time.sleep(0.05)
                os.kill(r.pid, signal.SIGSTOP)
            rss = sum(process_tree_memory(r.pid)[0] for r in runs)
            pss = sum(process_tree_memory(r.pid)[1] for r in runs)
        finally:
            for r in runs:
                r.kill()
        ctx.add(f"snap.clones{n}.rss", sc, f"{n} clones of a {mib} MiB guest: host RSS total",
                vmm.name, "MiB", rss / 1024)
        ctx.add(f"snap.clones{n}.pss", sc, f"{n} clones of a {mib} MiB guest: host PSS total",
                vmm.name, "MiB", pss / 1024)
    for f in (snap, mem, diff, diff + ".state"):
        if os.path.exists(f):
            os.unlink(f)


# --- 6. I/O ----------------------------------------------------------------------------------


PATTERN_CHUNK = 256 * 1024


def host_seq_rw(path, size):
    """The host doing what probe=blk does to the same file: write it sequentially in 256 KiB
    requests, fdatasync, read it all back; seconds. Bytes = 2 * size, as the probe counts."""
    chunk = bytes(range(256)) * (PATTERN_CHUNK // 256)
    fd = os.open(path, os.O_RDWR)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, PATTERN_CHUNK):
            os.pwrite(fd, chunk, off)
        os.fdatasync(fd)
        for off in range(0, size, PATTERN_CHUNK):
            if len(os.pread(fd, PATTERN_CHUNK, off)) != PATTERN_CHUNK:
                raise BenchError("short read on the host")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def io_blk(ctx):
    sc = "io"
    work = ctx.scratch(sc)
    mib = ctx.pick(64, 16)
    img = os.path.join(work, "disk.img")
    with open(img, "wb") as f:
        f.write(os.urandom(1 << 20) * mib)
    try:
        hz = tsc_hz()
    except Skip as e:
        ctx.skip(sc, None, f"virtio-blk: {e}")
        return
    ctx.skip(sc, None, "virtio-blk 4 KiB random read/write: probe=blk only does sequential "
                       "I/O (pattern write, flush, read-back of the whole disk); random I/O "
                       "needs a new probe mode")
    cfg = ProbeConfig("probe=blk blk_seed=7", vcpus=1, mem_mib=128, disk=img)
    for _, vmm in ctx.interleaved(ctx.runs()):
        r = probe_boot(vmm, cfg, work, timeout=300)
        line = out_line(r, "blk: dev=")
        for key in ("write", "flush", "read"):
            if field(line, key) != "ok":
                raise BenchError(f"{vmm.name}: probe=blk {key}={field(line, key)}: {line}")
        secs = int(field(line, "cycles")) / hz
        ctx.add("io.blk_seq", sc, f"virtio-blk sequential write + flush + read, {mib} MiB "
                "(guest's own TSC count)", vmm.name, "MB/s",
                int(field(line, "bytes")) / secs / 1e6, better="higher",
                note="includes the probe's pattern fill and check")
        host = host_seq_rw(img, mib << 20)
        ctx.add("io.blk_seq", sc, "", "host", "MB/s", 2 * (mib << 20) / host / 1e6,
                better="higher", note="the same file, 256 KiB pwrite + fdatasync + pread")


ETHERTYPE = 0x88B5
GUEST_MAC = "06:00:ac:10:00:02"
HOST_MAC = bytes([0x06, 0x00, 0xAC, 0x10, 0x00, 0x01])


def test_frame(seq):
    """Frame `seq`: 60..1514 bytes to the guest, EtherType 0x88b5, seq in the payload."""
    length = 60 + (seq * 7919) % (1514 - 60 + 1)
    head = bytes.fromhex(GUEST_MAC.replace(":", "")) + HOST_MAC + ETHERTYPE.to_bytes(2, "big")
    body = seq.to_bytes(4, "little") + bytes((seq + k) & 0xFF for k in range(length - 18))
    return head + body


def make_tap(name):
    subprocess.run(["ip", "link", "del", name], capture_output=True)
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True,
                   capture_output=True)
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
    subprocess.run(["ip", "link", "set", name, "up"], check=True, capture_output=True)


def net_echo_once(vmm, tap, frames, window, work):
    cfg = ProbeConfig("probe=net-echo net_frames=100000000", tap=tap, mac=GUEST_MAC)
    run = Run(vmm.probe_argv(cfg, work))
    try:
        run.wait_for(" ready", BOOT_TIMEOUT)
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        s.bind((tap, ETHERTYPE))
        s.settimeout(10)
        pool = [test_frame(k) for k in range(256)]
        sent = got = nbytes = 0
        t0 = time.perf_counter()
        while got < frames:
            while sent < frames and sent - got < window:
                s.send(pool[sent % 256])
                sent += 1
            data, addr = s.recvfrom(65536)
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            if data[14:18] != (got % 256).to_bytes(4, "little"):
                raise BenchError(f"{vmm.name}: echo {got} came back out of order or changed")
            got += 1
            nbytes += len(data)
        dt = time.perf_counter() - t0
        stop = bytes.fromhex(GUEST_MAC.replace(":", "")) + HOST_MAC + \
            ETHERTYPE.to_bytes(2, "big") + b"STOP" + bytes(42)
        s.send(stop)
        s.close()
        run.wait_for("net: echoed=", 30)
        code = run.finish(30)
        if code not in vmm.ok_codes:
            raise BenchError(f"{vmm.name}: exit {code} after net-echo: {run.describe()}")
        return frames / dt, nbytes / dt / 1e6
    finally:
        run.kill()


def io_net(ctx):
    sc = "io"
    if os.geteuid() != 0 or not shutil.which("ip"):
        ctx.skip(sc, None, "virtio-net echo: needs root and `ip` to create a TAP")
        return
    work = ctx.scratch(sc)
    frames = ctx.pick(20000, 1000)
    tap = f"lbench{os.getpid() % 100000}"
    make_tap(tap)
    try:
        for _, vmm in ctx.interleaved(ctx.runs()):
            fps, mbps = net_echo_once(vmm, tap, frames, 16, work)
            note = "host side: Python AF_PACKET on the TAP, 16 frames in flight, 60-1514 B"
            ctx.add("io.net_fps", sc, f"virtio-net echo, {frames} frames: frames/s", vmm.name,
                    "frames/s", fps, better="higher", note=note)
            ctx.add("io.net_mbps", sc, "virtio-net echo: throughput each way", vmm.name, "MB/s",
                    mbps, better="higher", note=note)
    finally:
        subprocess.run(["ip", "link", "del", tap], capture_output=True)


def io(ctx):
    io_blk(ctx)
    io_net(ctx)


# --- 7. density --------------------------------------------------------------------------


def density(ctx):
    sc = "density"
    work = ctx.scratch(sc)
    n = ctx.pick(16, 4)
    cfg = ProbeConfig("probe=hello", vcpus=1, mem_mib=128)
    for _, vmm in ctx.interleaved(ctx.runs(5)):
        t0 = time.perf_counter()
        runs = [Run(vmm.probe_argv(cfg, work), markers=[PROBE_MARKER]) for _ in range(n)]
        try:
            for r in runs:
                r.wait_for(PROBE_MARKER, BOOT_TIMEOUT)
            dt = time.perf_counter() - t0
        finally:
            for r in runs:
                r.kill()
        ctx.add("density.vms_per_s", sc, f"{n} probe VMs launched at once → all reported: "
                "VMs/s", vmm.name, "VMs/s", n / dt, better="higher")

    limit = ctx.args.density_max or ctx.pick(100, 6)
    reserve_kib = 2 << 20
    count = ProbeConfig("probe=count", vcpus=1, mem_mib=128)
    for vmm in ctx.vmms:
        runs, why = [], f"the limit of {limit}"
        try:
            while len(runs) < limit:
                if mem_available_kib() < reserve_kib:
                    why = "host MemAvailable below 2 GiB"
                    break
                r = Run(vmm.probe_argv(count, work))
                runs.append(r)
                r.wait_for("count: 0", BOOT_TIMEOUT)
                # Booted VMs are stopped (SIGSTOP) so that a hundred spinning probes do not
                # starve the next one's boot; memory is what this measures.
                os.kill(r.pid, signal.SIGSTOP)
            rss = pss = 0
            for r in runs:
                a, b = process_tree_memory(r.pid)
                rss, pss = rss + a, pss + b
        finally:
            for r in runs:
                r.kill()
        ctx.log(f"density: {vmm.name}: {len(runs)} VMs of 128 MiB running ({why})")
        ctx.add("density.fit", sc, "128 MiB probe VMs running at once (stopped at "
                f"{limit} or 2 GiB free)", vmm.name, "VMs", len(runs), better="higher")
        ctx.add("density.rss_total", sc, "… their host RSS total", vmm.name, "MiB", rss / 1024)
        ctx.add("density.pss_per_vm", sc, "… PSS per VM", vmm.name, "MiB",
                pss / 1024 / max(1, len(runs)))


def tmpdir():
    return tempfile.mkdtemp(prefix="ledge-bench-")


# --- 2. boot, Linux guest (in the KVM lab, or directly on hardware KVM) ---------------------


def stage_qemu_for_lab(dest):
    """QEMU for the lab's L1, which has no QEMU of its own: the binary, its shared libraries
    by soname (found through LD_LIBRARY_PATH there) and microvm's firmware (for -L)."""
    qemu = shutil.which("qemu-system-x86_64")
    for sub in ("bin", "lib", "share"):
        os.makedirs(os.path.join(dest, sub), exist_ok=True)
    shutil.copy(qemu, os.path.join(dest, "bin"))
    ldd = subprocess.run(["ldd", qemu], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
            shutil.copyfile(parts[2], os.path.join(dest, "lib", parts[0]))
    for fw in ("qboot.rom", "bios-microvm.bin"):
        src = os.path.join("/usr/share/qemu", fw)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(dest, "share", fw))


def boot_linux(ctx):
    sc = "boot-linux"
    if ctx.args.no_lab:
        raise Skip("--no-lab")
    guest = os.environ.get("LEDGE_GUEST_DIR", os.path.expanduser("~/.cache/ledge/guest"))
    for f in ("vmlinux", "initramfs.cpio.gz"):
        if not os.path.exists(os.path.join(guest, f)):
            raise Skip(f"no {guest}/{f}: build the guest with tools/build-guest.sh")
    mode = os.environ.get("LEDGE_LAB_MODE", "auto")  # as tools/kvm-lab.sh decides
    in_lab = mode == "lab" or (mode == "auto" and os.path.exists("/sys/module/kvm_pvm"))
    runs = ctx.args.lab_runs or ctx.pick(5, 1)
    names = [v.name for v in ctx.vmms]
    lab_cmd = [os.path.join(ctx.repo, "tools/kvm-lab.sh")]
    qemu_dir, fc = "-", "-"
    if "qemu" in names and in_lab:
        qemu_dir = ctx.scratch("qemu-l1")
        stage_qemu_for_lab(qemu_dir)
        lab_cmd += ["--copy", qemu_dir]
    for v in ctx.vmms:
        if v.name == "firecracker":
            fc = v.binary
            if in_lab:
                lab_cmd += ["--copy", fc]
    lab_cmd += ["--script", os.path.join(ctx.repo, "tools/bench/lab_boot.sh"), str(runs), qemu_dir,
                fc] + names
    env = dict(os.environ, LEDGE_BIN=ctx.vmms[0].binary, LEDGE_GUEST_DIR=guest)
    env.setdefault("LEDGE_LAB_TIMEOUT", str(600 + 120 * runs * len(names)))
    ctx.log(f"{sc}: {'KVM lab' if in_lab else 'direct'}, {runs} run(s) of {', '.join(names)} "
            "(slow: the lab's L1 runs under TCG)")
    log_path = os.path.join(ctx.workdir, "lab.log")
    lines = []
    with open(log_path, "w", buffering=1) as log:
        p = subprocess.Popen(lab_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, stdin=subprocess.DEVNULL)
        for line in p.stdout:
            log.write(line)
            if line.startswith("BENCH-LAB"):
                ctx.log(f"{sc}: {line.strip()}")
                if line.startswith("BENCH-LAB "):
                    lines.append(line)
        code = p.wait()
    ctx.lab = "KVM lab (nested kvm-amd in an L1 under QEMU TCG)" if in_lab else "hardware KVM"
    # What came out is recorded even when the lab failed later (a hung L1 takes the rest).
    failed = [] if code == 0 and lines else [f"the lab run failed (exit {code})"]
    for line in lines:
        kv = dict(w.split("=", 1) for w in line.split()[1:])
        vmm, console = kv["vmm"], kv["console"]
        if kv["rc"] != "0":
            failed.append(f"{vmm}, console {console}, run {kv['run']}: rc={kv['rc']}")
            continue
        k = f"boot.linux.{console}"
        what = f"Linux 1 vCPU 128 MiB, console {console}"
        ctx.add(f"{k}.marker", sc, f"{what}: launch → LEDGE-GUEST-READY", vmm, "ms",
                float(kv["marker_ms"]))
        ctx.add(f"{k}.exit", sc, f"{what}: launch → exit", vmm, "ms", float(kv["exit_ms"]))
        ctx.add(f"{k}.uptime", sc, f"{what}: guest uptime at init", vmm, "ms",
                float(kv["uptime_s"]) * 1000, note="the guest kernel's own clock")
    if failed:
        with open(log_path) as f:
            tail = f.read()[-1500:]
        raise BenchError("; ".join(failed) + f"; lab log tail:\n{tail}")
