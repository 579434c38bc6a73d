//! Device tests on the real /dev/kvm: the probe guest's own polling virtio drivers
//! (`probe=rng`, `probe=blk`, `probe=net-echo`; resources/guests/probe/README.md) against
//! Ledge's virtio-rng, virtio-blk and virtio-net, with the host checking the other side: the
//! disk image byte for byte, the frames echoed back through a TAP.
//!
//! Every device must be there: a probe report without the expected virtio device fails the
//! test. The net test needs root (it creates a TAP) and prints `SKIPPED` otherwise. Times are
//! printed, never asserted.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{ledge, ledge_bin, require_kvm, scratch, Output};

const LIMIT: Duration = Duration::from_secs(180);

const TYPE_NET: u64 = 1;
const TYPE_BLOCK: u64 = 2;
const TYPE_RNG: u64 = 4;

fn boot(args: &[&str]) -> Output {
    let mut v = vec!["run", "--console", "stdio"];
    v.extend_from_slice(args);
    let out = ledge(&v, LIMIT);
    println!("--- ledge {v:?}\n{}--- stderr\n{}", out.stdout, out.stderr);
    out
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("{key}= missing in {line:?}"))
}

fn num(line: &str, key: &str) -> u64 {
    let v = field(line, key);
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => v.parse().unwrap(),
    }
}

/// True if the probe found a virtio device of `id`; a missing device fails the test.
fn device_present(test: &str, stdout: &str, id: u64, what: &str) -> bool {
    let found = stdout
        .lines()
        .filter(|l| l.starts_with("virtio: addr="))
        .any(|l| num(l, "device_id") == id);
    assert!(
        found,
        "[{test}] the probe lists no virtio device id {id} ({what}):\n{stdout}"
    );
    true
}

/// Host TSC ticks per second, measured here; KVM runs the guest TSC at the host's rate
/// (no TSC scaling on this host), so guest `cycles=` convert with it.
fn tsc_hz() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no side effects.
        let t = || unsafe { core::arch::x86_64::_rdtsc() };
        let (c0, i0) = (t(), Instant::now());
        std::thread::sleep(Duration::from_millis(200));
        let (c1, dt) = (t(), i0.elapsed());
        (c1 - c0) as f64 / dt.as_secs_f64()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        1e9
    }
}

// --- virtio-rng ----------------------------------------------------------------------------

#[test]
fn probe_rng_reads_entropy() {
    let test = "probe_rng_reads_entropy";
    if !require_kvm(test) {
        return;
    }
    let out = boot(&["--rng", "--cmdline", "probe=rng"]);
    if !device_present(test, &out.stdout, TYPE_RNG, "virtio-rng") {
        return;
    }
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let l = out.line("rng:");
    assert_eq!(num(&l, "bytes"), 64 * 1024, "{l}");
    assert_eq!(
        num(&l, "zero_runs"),
        0,
        "64 KiB of entropy has no 8-byte zero run: {l}"
    );
}

// --- virtio-blk ----------------------------------------------------------------------------

const SECTOR: usize = 512;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// What `probe=blk` writes: word i of sector s (see blk.rs).
fn pattern_sector(s: u64, seed: u64) -> [u8; SECTOR] {
    let mut b = [0u8; SECTOR];
    for (i, w) in b.chunks_exact_mut(8).enumerate() {
        let v = ((s << 6) | i as u64) ^ seed.wrapping_mul(GOLDEN);
        w.copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// The probe's `sum=` over the first `sectors` sectors of `data`.
fn probe_sum(data: &[u8], sectors: usize) -> u64 {
    let mut sum = 0u64;
    for (s, sec) in data.chunks_exact(SECTOR).take(sectors).enumerate() {
        let mut h = FNV_BASIS ^ s as u64;
        for w in sec.chunks_exact(8) {
            h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(FNV_PRIME);
        }
        sum = sum.wrapping_add(h ^ (h >> 32));
    }
    sum
}

/// An image of `len` bytes of deterministic non-zero, non-pattern junk.
fn junk_image(path: &Path, len: usize, salt: u64) -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64 ^ salt;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    fs::write(path, &data).unwrap();
    data
}

/// Checks the image byte for byte: the pattern over the first `sectors`, `before` after.
fn assert_pattern(path: &Path, before: &[u8], sectors: usize, seed: u64) {
    let after = fs::read(path).unwrap();
    assert_eq!(after.len(), before.len(), "{} changed size", path.display());
    for (s, sec) in after.chunks(SECTOR).enumerate() {
        let want: &[u8] = if s < sectors {
            &pattern_sector(s as u64, seed)
        } else {
            &before[s * SECTOR..(s * SECTOR + sec.len())]
        };
        assert!(
            sec == want,
            "{}: sector {s} is not what the guest wrote (pattern over {sectors} sectors, seed {seed})",
            path.display()
        );
    }
}

fn blk_lines(out: &Output) -> Vec<String> {
    out.lines_with("blk: dev=").map(str::to_string).collect()
}

fn print_blk_rate(line: &str, hz: f64) {
    let (bytes, cycles) = (num(line, "bytes"), num(line, "cycles"));
    let secs = cycles as f64 / hz;
    println!(
        "blk dev={}: {bytes} bytes in {cycles} TSC cycles = {:.3} s at {:.3} GHz (host TSC) = {:.1} MB/s (write + read, pattern fill and check included)",
        field(line, "dev"),
        secs,
        hz / 1e9,
        bytes as f64 / secs / 1e6
    );
}

/// A rw disk: the guest writes the pattern everywhere, flushes, reads it back; the host then
/// finds the pattern in the file byte for byte.
#[test]
fn probe_blk_writes_pattern_the_host_reads_back() {
    let test = "probe_blk_writes_pattern_the_host_reads_back";
    if !require_kvm(test) {
        return;
    }
    let dir = scratch(test);
    let img = dir.join("disk.img");
    let len = 16 << 20;
    let before = junk_image(&img, len, 1);
    let disk = format!("path={},id=probe-disk", img.display());
    let out = boot(&["--disk", &disk, "--cmdline", "probe=blk blk_seed=42"]);
    if !device_present(test, &out.stdout, TYPE_BLOCK, "virtio-blk") {
        return;
    }
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let lines = blk_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    let sectors = len / SECTOR;
    assert_eq!(num(l, "capacity"), sectors as u64, "{l}");
    assert_eq!(field(l, "ro"), "0");
    assert_eq!(field(l, "id"), "probe-disk");
    assert_eq!(field(l, "write"), "ok", "{l}");
    assert_eq!(field(l, "flush"), "ok", "{l}");
    assert_eq!(field(l, "read"), "ok", "{l}");
    assert_eq!(field(l, "past_end"), "ioerr", "{l}");
    assert_eq!(num(l, "bytes"), 2 * len as u64, "{l}");
    let expect: Vec<u8> = (0..sectors as u64)
        .flat_map(|s| pattern_sector(s, 42))
        .collect();
    assert_eq!(num(l, "sum"), probe_sum(&expect, sectors), "{l}");
    assert_pattern(&img, &before, sectors, 42);
    print_blk_rate(l, tsc_hz());
    let _ = fs::remove_dir_all(dir);
}

/// A read-only disk: writes fail with IOERR, reads return the file's content, and the file is
/// unchanged afterwards.
#[test]
fn probe_blk_read_only_disk_refuses_writes() {
    let test = "probe_blk_read_only_disk_refuses_writes";
    if !require_kvm(test) {
        return;
    }
    let dir = scratch(test);
    let img = dir.join("ro.img");
    let len = 4 << 20;
    let before = junk_image(&img, len, 2);
    let disk = format!("path={},ro", img.display());
    let out = boot(&["--disk", &disk, "--cmdline", "probe=blk"]);
    if !device_present(test, &out.stdout, TYPE_BLOCK, "virtio-blk") {
        return;
    }
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let l = out.line("blk: dev=0");
    assert_eq!(field(&l, "ro"), "1", "VIRTIO_BLK_F_RO must be offered: {l}");
    assert_eq!(field(&l, "write"), "ioerr", "{l}");
    assert_eq!(field(&l, "read"), "ok", "{l}");
    assert_eq!(field(&l, "past_end"), "ioerr", "{l}");
    assert_eq!(
        num(&l, "sum"),
        probe_sum(&before, len / SECTOR),
        "the guest must read the file's content: {l}"
    );
    let after = fs::read(&img).unwrap();
    assert!(after == before, "a read-only image changed");
    let _ = fs::remove_dir_all(dir);
}

/// A disk whose last sector is odd: everything up to the last sector is written, one sector
/// further is refused, a request straddling the end too.
#[test]
fn probe_blk_past_the_end_is_refused() {
    let test = "probe_blk_past_the_end_is_refused";
    if !require_kvm(test) {
        return;
    }
    let dir = scratch(test);
    let img = dir.join("odd.img");
    let len = (1 << 20) + 3 * SECTOR; // 2051 sectors: not a multiple of any request size
    let before = junk_image(&img, len, 3);
    let disk = format!("path={}", img.display());
    let out = boot(&["--disk", &disk, "--cmdline", "probe=blk blk_seed=9"]);
    if !device_present(test, &out.stdout, TYPE_BLOCK, "virtio-blk") {
        return;
    }
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let l = out.line("blk: dev=0");
    assert_eq!(num(&l, "capacity"), (len / SECTOR) as u64, "{l}");
    assert_eq!(field(&l, "write"), "ok", "{l}");
    assert_eq!(field(&l, "read"), "ok", "{l}");
    assert_eq!(field(&l, "past_end"), "ioerr", "{l}");
    assert_pattern(&img, &before, len / SECTOR, 9);
    let _ = fs::remove_dir_all(dir);
}

/// Two disks at once, one rw (partly covered with blk_mib=) and one ro: each gets its own
/// result and only the rw one changes, only where the guest wrote. Two rounds: both disks live
/// together, then after a reset each one re-initialised and used alone, in reverse order.
#[test]
fn probe_blk_two_disks_at_once() {
    let test = "probe_blk_two_disks_at_once";
    if !require_kvm(test) {
        return;
    }
    let dir = scratch(test);
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let (alen, blen) = (12 << 20, 3 << 20);
    let a_before = junk_image(&a, alen, 4);
    let b_before = junk_image(&b, blen, 5);
    let da = format!("path={},id=first", a.display());
    let db = format!("path={},ro,id=second", b.display());
    let out = boot(&[
        "--disk",
        &da,
        "--disk",
        &db,
        "--cmdline",
        "probe=blk blk_seed=5 blk_mib=8 blk_rounds=2",
    ]);
    if !device_present(test, &out.stdout, TYPE_BLOCK, "virtio-blk") {
        return;
    }
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.line("blk: devices="), "blk: devices=2");
    let lines = blk_lines(&out);
    assert_eq!(lines.len(), 4, "{lines:?}");
    for l in &lines {
        match field(l, "dev") {
            "0" => {
                assert_eq!(field(l, "id"), "first");
                assert_eq!(field(l, "ro"), "0");
                assert_eq!(field(l, "write"), "ok", "{l}");
                assert_eq!(field(l, "read"), "ok", "{l}");
                assert_eq!(num(l, "sectors"), (8 << 20) / SECTOR as u64, "{l}");
            }
            "1" => {
                assert_eq!(field(l, "id"), "second");
                assert_eq!(field(l, "ro"), "1");
                assert_eq!(field(l, "write"), "ioerr", "{l}");
                assert_eq!(field(l, "read"), "ok", "{l}");
                assert_eq!(num(l, "sum"), probe_sum(&b_before, blen / SECTOR), "{l}");
            }
            other => panic!("unexpected dev={other}: {l}"),
        }
        assert_eq!(field(l, "past_end"), "ioerr", "{l}");
    }
    assert_pattern(&a, &a_before, (8 << 20) / SECTOR, 5);
    assert!(
        fs::read(&b).unwrap() == b_before,
        "the read-only image changed"
    );
    let _ = fs::remove_dir_all(dir);
}

/// One disk brought up, used and reset, then the next one brought up for the first time
/// (`blk_serial=1`): the second device must not lose its queue notifications.
///
/// Regression test: queue eventfds used to be dup()ed at activation and closed at reset while
/// still registered with the event loop, so the next device activated could reuse the fd number
/// and never be watched (`blk: dev=0 error=timeout`). They are shared (`Arc`) now.
#[test]
fn probe_blk_disk_after_another_was_reset() {
    let test = "probe_blk_disk_after_another_was_reset";
    if !require_kvm(test) {
        return;
    }
    let dir = scratch(test);
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let a_before = junk_image(&a, 2 << 20, 6);
    let b_before = junk_image(&b, 2 << 20, 7);
    let da = format!("path={}", a.display());
    let db = format!("path={}", b.display());
    let out = boot(&[
        "--disk",
        &da,
        "--disk",
        &db,
        "--cmdline",
        "probe=blk blk_seed=11 blk_serial=1",
    ]);
    if !device_present(test, &out.stdout, TYPE_BLOCK, "virtio-blk") {
        return;
    }
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let lines = blk_lines(&out);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert_eq!(field(l, "write"), "ok", "{l}");
        assert_eq!(field(l, "read"), "ok", "{l}");
    }
    assert_pattern(&a, &a_before, (2 << 20) / SECTOR, 11);
    assert_pattern(&b, &b_before, (2 << 20) / SECTOR, 11);
    let _ = fs::remove_dir_all(dir);
}

// --- virtio-net ----------------------------------------------------------------------------

const ETHERTYPE: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0x4c, 0x45, 0x44, 0x47, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x4c, 0x45, 0x44, 0x47, 0x02];
const FRAMES: u32 = 10_000;
/// Frames in flight at once: well below the guest's 256 receive buffers.
const WINDOW: u32 = 64;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A TAP interface created for one test and deleted when dropped.
struct Tap(String);

impl Tap {
    fn create(name: &str) -> Tap {
        let _ = ip(&["link", "del", name]);
        assert!(
            ip(&["tuntap", "add", "dev", name, "mode", "tap"]),
            "ip tuntap add {name}"
        );
        let tap = Tap(name.to_string());
        // No IPv6 chatter from the host kernel: the guest would echo it too.
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        assert!(ip(&["link", "set", name, "up"]), "ip link set {name} up");
        tap
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.0]);
    }
}

/// A `ledge run` whose console lines arrive as they are printed.
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Guest {
    fn spawn(args: &[&str]) -> Guest {
        let mut child = Command::new(ledge_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ledge");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("guest| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The first line starting with one of `prefixes`, within `limit`.
    fn wait_line(&mut self, prefixes: &[&str], limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if prefixes.iter().any(|p| line.starts_with(p)) {
                return Some(line);
            }
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An AF_PACKET socket bound to one interface, for EtherType 0x88b5 only.
struct RawSocket {
    fd: libc::c_int,
    ifindex: libc::c_int,
}

impl RawSocket {
    fn bind(ifname: &str) -> RawSocket {
        let proto = ETHERTYPE.to_be();
        // SAFETY: plain socket(2) call; the fd is owned by RawSocket.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: name is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
        assert!(ifindex > 0, "no interface {ifname}");
        let s = RawSocket { fd, ifindex };
        let addr = s.addr();
        // SAFETY: addr is a valid sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            r,
            0,
            "bind to {ifname}: {}",
            std::io::Error::last_os_error()
        );
        s
    }

    fn addr(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        a.sll_family = libc::AF_PACKET as u16;
        a.sll_protocol = ETHERTYPE.to_be();
        a.sll_ifindex = self.ifindex;
        a
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: frame is a valid buffer of frame.len() bytes.
        let n = unsafe { libc::send(self.fd, frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame that came in on the interface (not one sent from this host), within
    /// `limit`; None on timeout.
    fn recv(&self, buf: &mut [u8], limit: Duration) -> Option<usize> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            if r <= 0 {
                if r < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return None;
            }
            // SAFETY: as in addr().
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut flen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buf and from are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut flen,
                )
            };
            assert!(n >= 0, "recvfrom: {}", std::io::Error::last_os_error());
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Some(n as usize);
        }
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: fd is ours.
        unsafe { libc::close(self.fd) };
    }
}

/// Frame `seq`: 60..=1514 bytes, to the guest, EtherType 0x88b5, payload = seq, length,
/// filler from seq, and an FNV-1a-32 of all that at the end.
fn test_frame(seq: u32) -> Vec<u8> {
    let len = 60 + (seq as usize * 7919) % (1514 - 60 + 1);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&(len as u16).to_le_bytes());
    let mut x = seq.wrapping_mul(2_654_435_761) | 1;
    while f.len() < len - 4 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    let sum = f[14..].iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    f.extend_from_slice(&sum.to_le_bytes());
    f
}

fn stop_frame() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(b"STOP");
    f.resize(60, 0);
    f
}

/// Describes what came back instead of frame `seq`.
fn describe(got: &[u8]) -> String {
    if got.len() >= 20 && got[12..14] == ETHERTYPE.to_be_bytes() {
        let seq = u32::from_le_bytes(got[14..18].try_into().unwrap());
        format!("{} bytes claiming seq {seq}", got.len())
    } else {
        format!("{} bytes, not a test frame", got.len())
    }
}

#[test]
fn probe_net_echoes_frames_through_a_tap() {
    let test = "probe_net_echoes_frames_through_a_tap";
    if !require_kvm(test) {
        return;
    }
    if !is_root() {
        println!("[{test}] SKIPPED: needs root to create a TAP interface and an AF_PACKET socket");
        return;
    }
    let name = format!("lpd{}", std::process::id() % 1_000_000);
    let tap = Tap::create(&name);
    let net = format!(
        "tap={},mac={}",
        tap.0,
        GUEST_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    );
    let mut guest = Guest::spawn(&[
        "run",
        "--console",
        "stdio",
        "--net",
        &net,
        "--cmdline",
        "probe=net-echo net_frames=100000000",
    ]);
    let Some(ready) = guest.wait_line(&["net: dev=0", "net: error="], Duration::from_secs(60))
    else {
        panic!("the guest never said it was ready: {:?}", guest.seen);
    };
    let seen = guest.seen.join("\n");
    if !device_present(test, &seen, TYPE_NET, "virtio-net") {
        return;
    }
    assert!(ready.ends_with(" ready"), "{ready}");
    assert_eq!(
        field(&ready, "mac"),
        net.split("mac=").nth(1).unwrap(),
        "{ready}"
    );

    let sock = RawSocket::bind(&tap.0);
    let mut buf = vec![0u8; 65536];
    let (mut sent, mut got, mut bytes) = (0u32, 0u32, 0u64);
    let t0 = Instant::now();
    while got < FRAMES {
        while sent < FRAMES && sent - got < WINDOW {
            sock.send(&test_frame(sent));
            sent += 1;
        }
        let Some(n) = sock.recv(&mut buf, Duration::from_secs(10)) else {
            panic!("no echo of frame {got} within 10 s ({sent} sent)");
        };
        let want = test_frame(got);
        assert!(
            buf[..n] == want[..],
            "echo {got}: expected {} bytes unchanged, got {}",
            want.len(),
            describe(&buf[..n])
        );
        got += 1;
        bytes += n as u64;
    }
    let dt = t0.elapsed().as_secs_f64();
    sock.send(&stop_frame());
    let Some(done) = guest.wait_line(&["net: echoed="], Duration::from_secs(30)) else {
        panic!("the guest did not stop on STOP: {:?}", guest.seen);
    };
    assert_eq!(field(&done, "end"), "stop", "{done}");
    assert!(num(&done, "echoed") >= u64::from(FRAMES), "{done}");
    assert_eq!(
        guest.wait_exit(Duration::from_secs(30)),
        Some(0),
        "ledge must exit 0"
    );
    println!(
        "net echo: {FRAMES} frames ({bytes} bytes each way) in {dt:.3} s = {:.0} frames/s, {:.1} MB/s each way (window {WINDOW})",
        f64::from(FRAMES) / dt,
        bytes as f64 / dt / 1e6
    );
    drop(guest);
    drop(tap);
}
