//! Device tests on the real /dev/kvm: the probe guest's own polling virtio drivers
//! (`probe=rng`, `probe=blk`, `probe=net-echo`, `probe=count` with `probe.log=blk` and
//! `probe.net=echo`; resources/guests/probe/README.md) against Ledge's virtio-rng, virtio-blk
//! and virtio-net, with the host checking the other side: the disk image byte for byte (or
//! record by record), the frames echoed back through a TAP.
//!
//! Every device must be there: a probe report without the expected virtio device fails the
//! test. The net test needs root (it creates a TAP) and prints `SKIPPED` otherwise. Times are
//! printed, never asserted.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::probe_io::*;
use common::{ledge, require_kvm, scratch, Guest, Output};

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

// --- the count log (probe=count probe.log=blk) ---------------------------------------------

/// The printed `count: N` lines of a run: they must be 0, 1, 2, ... in order.
fn printed_counts(seen: &[String]) -> Vec<u64> {
    let counts: Vec<u64> = seen
        .iter()
        .filter_map(|l| l.strip_prefix("count: "))
        .map(|n| n.parse().unwrap())
        .collect();
    for (i, &n) in counts.iter().enumerate() {
        assert_eq!(n, i as u64, "count lines out of order: {counts:?}");
    }
    counts
}

/// Checks the log on the host after the VMM is gone: every printed count N has its record
/// (this run's id, sequence N or a later one of the same sector, at most the one after the
/// last printed count, which may have been in flight) in sector N mod capacity; sectors no
/// printed count reached hold either what was there before or that in-flight record.
fn check_log(img: &Path, before: &[u8], run: u64, counts: &[u64]) {
    let data = fs::read(img).unwrap();
    assert_eq!(data.len(), before.len(), "the image changed size");
    let cap = (data.len() / SECTOR) as u64;
    let last = *counts.last().expect("no count line printed");
    for s in 0..cap {
        let sec = &data[s as usize * SECTOR..][..SECTOR];
        // The newest printed count that lands here, if any.
        let newest = (s <= last).then(|| s + (last - s) / cap * cap);
        match parse_record(sec) {
            Some(r) => {
                assert_eq!(r.run, run, "sector {s}: record of another run: {r:?}");
                assert_eq!(
                    r.sector, s,
                    "sector {s}: record names another sector: {r:?}"
                );
                assert_eq!(r.seq % cap, s, "sector {s}: wrong sector for {r:?}");
                assert!(
                    r.seq <= last + 1,
                    "sector {s}: record {} but the last count printed was {last}",
                    r.seq
                );
                if let Some(n) = newest {
                    assert!(
                        r.seq >= n,
                        "sector {s}: count {n} was printed but the record is {}",
                        r.seq
                    );
                }
            }
            None => {
                assert!(
                    newest.is_none(),
                    "sector {s}: count {} was printed but its record is missing or corrupt",
                    newest.unwrap()
                );
                assert!(
                    sec == &before[s as usize * SECTOR..][..SECTOR],
                    "sector {s}: neither a record nor the original content"
                );
            }
        }
    }
    println!(
        "count log: {} counts printed (last {last}), {cap} sectors, every printed record intact",
        counts.len()
    );
}

/// The `run=` of the `log: dev=0 ... ready` line.
fn wait_log_ready(guest: &mut Guest, cap: u64) -> u64 {
    let Some(l) = guest.wait_line(&["log: "], Duration::from_secs(60)) else {
        panic!("the guest never opened its log: {:?}", guest.seen);
    };
    assert!(l.starts_with("log: dev=0 ") && l.ends_with(" ready"), "{l}");
    assert_eq!(num(&l, "capacity"), cap, "{l}");
    num(&l, "run")
}

/// Counts with the disk log on a small disk (the log wraps around it twice): after the VMM is
/// SIGKILLed, every count the guest printed has its record on the host file.
#[test]
fn probe_count_logs_every_count_to_disk() {
    let test = "probe_count_logs_every_count_to_disk";
    if !require_kvm(test) {
        return;
    }
    let dir = scratch(test);
    let img = dir.join("log.img");
    let len = 64 << 10; // 128 sectors
    let before = junk_image(&img, len, 8);
    let disk = format!("path={}", img.display());
    let mut guest = Guest::spawn(&[
        "run",
        "--console",
        "stdio",
        "--disk",
        &disk,
        "--cmdline",
        "probe=count probe.log=blk",
    ]);
    let run = wait_log_ready(&mut guest, (len / SECTOR) as u64);
    let t0 = Instant::now();
    let want = 2 * (len / SECTOR) as u64 + 20;
    let Some(_) = guest.wait_line(&[&format!("count: {want}")], Duration::from_secs(120)) else {
        panic!("count {want} not reached: {:?}", guest.seen.last());
    };
    let dt = t0.elapsed().as_secs_f64();
    guest.kill_and_drain();
    let counts = printed_counts(&guest.seen);
    println!(
        "{want} logged counts in {dt:.2} s = {:.0} counts/s (each a write + FLUSH)",
        want as f64 / dt
    );
    check_log(&img, &before, run, &counts);
    let _ = fs::remove_dir_all(dir);
}

// --- virtio-net ----------------------------------------------------------------------------

const FRAMES: u32 = 10_000;
/// Frames in flight at once: well below the guest's 256 receive buffers.
const WINDOW: u32 = 64;
#[test]
fn probe_net_echoes_frames_through_a_tap() {
    let test = "probe_net_echoes_frames_through_a_tap";
    if !require_tap_test(test) {
        return;
    }
    let name = format!("lpd{}", std::process::id() % 1_000_000);
    let tap = Tap::create(&name);
    let net = format!("tap={},mac={}", tap.0, guest_mac());
    let (mut guest, ready) = spawn_net_echo(&net, &[]);
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
    let t0 = Instant::now();
    let bytes = echo_frames(&sock, FRAMES, WINDOW, None);
    let dt = t0.elapsed().as_secs_f64();
    let done = stop_net_echo(&mut guest, &sock);
    assert!(num(&done, "echoed") >= u64::from(FRAMES), "{done}");
    println!(
        "net echo: {FRAMES} frames ({bytes} bytes each way) in {dt:.3} s = {:.0} frames/s, {:.1} MB/s each way (window {WINDOW})",
        f64::from(FRAMES) / dt,
        bytes as f64 / dt / 1e6
    );
    drop(guest);
    drop(tap);
}

/// Counting with the disk log and the net echo at once: frames come back unchanged while the
/// counter runs (a STOP frame does not end it), and the log is intact afterwards.
#[test]
fn probe_count_with_log_and_net_echo() {
    let test = "probe_count_with_log_and_net_echo";
    if !require_tap_test(test) {
        return;
    }
    let dir = scratch(test);
    let img = dir.join("log.img");
    let len = 1 << 20;
    let before = junk_image(&img, len, 9);
    let disk = format!("path={}", img.display());
    let name = format!("lpc{}", std::process::id() % 1_000_000);
    let tap = Tap::create(&name);
    let mac = guest_mac();
    let net = format!("tap={},mac={mac}", tap.0);
    let mut guest = Guest::spawn(&[
        "run",
        "--console",
        "stdio",
        "--disk",
        &disk,
        "--net",
        &net,
        "--cmdline",
        "probe=count probe.log=blk probe.net=echo",
    ]);
    let run = wait_log_ready(&mut guest, (len / SECTOR) as u64);
    let Some(ready) = guest.wait_line(&["net: "], Duration::from_secs(60)) else {
        panic!(
            "the guest never brought up its net device: {:?}",
            guest.seen
        );
    };
    assert!(
        ready.starts_with("net: dev=0 ") && ready.ends_with(" ready"),
        "{ready}"
    );
    assert_eq!(field(&ready, "mac"), mac, "{ready}");
    let Some(first) = guest.wait_line(&["count: "], Duration::from_secs(30)) else {
        panic!("no count line: {:?}", guest.seen);
    };

    const N: u32 = 2000;
    const WIN: u32 = 16;
    let sock = RawSocket::bind(&tap.0);
    let mut buf = vec![0u8; 65536];
    let t0 = Instant::now();
    // A STOP frame halfway: not echoed, and the counter goes on.
    echo_frames(&sock, N, WIN, Some(N / 2));
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "count + echo: {N} frames echoed in {dt:.3} s = {:.0} frames/s while counting",
        f64::from(N) / dt
    );
    // The counter kept going during and after the echoes.
    let n0: u64 = first.strip_prefix("count: ").unwrap().parse().unwrap();
    let later = format!("count: {}", n0 + 20);
    assert!(
        guest
            .wait_line(&[&later], Duration::from_secs(60))
            .is_some(),
        "the counter stopped: {:?}",
        guest.seen.last()
    );
    assert!(
        sock.recv(&mut buf, Duration::from_millis(300)).is_none(),
        "something came back after the last echo (the STOP frame?)"
    );
    guest.kill_and_drain();
    assert!(
        !guest.seen.iter().any(|l| l.starts_with("net: echoed=")),
        "STOP must not end the count mode"
    );
    let counts = printed_counts(&guest.seen);
    check_log(&img, &before, run, &counts);
    drop(guest);
    drop(tap);
    let _ = fs::remove_dir_all(dir);
}
