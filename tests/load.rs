//! The API under load, end to end on this machine's /dev/kvm: 1,000 clients over 60 s against a
//! real `ledge` process whose probe guest counts and logs every count durably to a disk.
//!
//! Every client opens its own connection and sends a random mix of requests (GETs of every
//! read-only route, pause/resume, requests that must be refused, garbage that closes the
//! connection, requests abandoned half-written), each checked against what the API must answer.
//! At the end: zero wrong answers, no file descriptors and no memory gained by the VMM process,
//! and the guest's counter undisturbed (every count printed once, in order, each with its
//! record on the disk). Durations are printed, never asserted.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::probe_io::CountLog;
use common::vm::*;
use common::Rng;
use serde_json::json;

const CLIENTS: usize = 1000;
const WORKERS: usize = 40;
const SPAN: Duration = Duration::from_secs(60);

/// What the operator clients believe the VM's state is. Pause and resume are sent with this
/// lock held, so each of them has exactly one right answer.
struct Control {
    paused: bool,
    pauses: u64,
    resumes: u64,
    refusals: u64,
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    errors: AtomicU64,
    refused_ok: AtomicU64,
    closed_ok: AtomicU64,
    abandoned: AtomicU64,
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The VMM's VmRSS in KiB (the process is alive whenever this is read).
fn rss_kib(pid: u32) -> u64 {
    common::proc_status(pid, "VmRSS")
        .and_then(|v| common::kib(&v))
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Requests refused with 400: (what, method, path, body, a word the fault message must hold).
type Refused = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
);
const REFUSED: [Refused; 4] = [
    (
        "PUT /machine-config after boot",
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 128}"#),
        "is not allowed while the VM is",
    ),
    (
        "PATCH /vm with broken JSON",
        "PATCH",
        "/vm",
        Some(r#"{"state": "#),
        "not valid JSON",
    ),
    (
        "GET of an unknown path",
        "GET",
        "/no/such/thing",
        None,
        "/no/such/thing",
    ),
    (
        "PUT /drives with a wrong type",
        "PUT",
        "/drives/log",
        Some(r#"{"drive_id": 7}"#),
        "expected a string",
    ),
];

/// Checks one answered request; a description of what was wrong, if anything.
fn check(what: &str, out: Outcome, want: u16, needle: &str) -> Result<Resp, String> {
    match out {
        Outcome::Answered(r) if r.status == want => {
            if want >= 400 {
                let body: serde_json::Value = serde_json::from_str(&r.body).map_err(|e| {
                    format!("{what}: {want} with a non-JSON body {:?}: {e}", r.body)
                })?;
                let fault = body["fault_message"].as_str().unwrap_or("");
                if !fault.contains(needle) {
                    return Err(format!("{what}: fault message {fault:?} lacks {needle:?}"));
                }
            }
            Ok(r)
        }
        Outcome::Answered(r) => Err(format!(
            "{what}: expected {want}, got {} {}",
            r.status, r.body
        )),
        Outcome::Closed(why) => Err(format!("{what}: connection closed ({why})")),
    }
}

/// After an answer that must close the connection: the answer says `Connection: close` and the
/// server then shuts the connection (EOF or reset, nothing more to read). A connection left open
/// is a wrong answer once the read times out (the connection's hang limit, READ_LIMIT).
fn closed_after(what: &str, c: &mut Conn, r: &Resp) -> Result<(), String> {
    use std::io::{ErrorKind, Read};
    if !r
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    {
        return Err(format!("{what}: no `Connection: close` in {:?}", r.head));
    }
    if !c.pending.is_empty() {
        return Err(format!(
            "{what}: {} more bytes after the answer",
            c.pending.len()
        ));
    }
    let mut b = [0u8; 256];
    loop {
        match c.s.read(&mut b) {
            Ok(0) => return Ok(()),
            Ok(n) => return Err(format!("{what}: {n} more bytes after the answer")),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!(
                    "{what}: the server left the connection open ({READ_LIMIT:?} after the answer)"
                ))
            }
            // A reset or the like: closed too.
            Err(_) => return Ok(()),
        }
    }
}

/// One client: a connection, then requests until its time is up. Returns the first wrong
/// answer, if any.
fn client(
    sock: &Path,
    rng: &mut Rng,
    until: Instant,
    control: &Mutex<Control>,
    tally: &Tally,
) -> Result<(), String> {
    let mut c = Conn::open(sock).map_err(|e| format!("connect: {e}"))?;
    loop {
        if Instant::now() >= until {
            return Ok(());
        }
        tally.requests.fetch_add(1, Ordering::Relaxed);
        match rng.below(1000) {
            0..=299 => {
                let r = check("GET /", c.send("GET", "/", None), 200, "")?;
                let v = r.json();
                let st = v["state"].as_str().unwrap_or("");
                if !matches!(st, "Running" | "Paused") || v["id"].as_str().is_none() {
                    return Err(format!("GET /: unexpected {v}"));
                }
            }
            300..=449 => {
                let r = check(
                    "GET /machine-config",
                    c.send("GET", "/machine-config", None),
                    200,
                    "",
                )?;
                let v = r.json();
                if v["vcpu_count"] != 1 || v["mem_size_mib"] != 128 {
                    return Err(format!("GET /machine-config: unexpected {v}"));
                }
            }
            450..=549 => {
                let r = check("GET /vm/config", c.send("GET", "/vm/config", None), 200, "")?;
                let v = r.json();
                if v["drives"][0]["drive_id"] != "log" {
                    return Err(format!("GET /vm/config: unexpected {v}"));
                }
            }
            550..=599 => {
                let r = check("GET /version", c.send("GET", "/version", None), 200, "")?;
                if r.json()["firecracker_version"].as_str().is_none() {
                    return Err(format!("GET /version: unexpected {}", r.body));
                }
            }
            600..=749 => {
                // Pause or resume with the operator lock: exactly one right answer.
                let mut ctl = control.lock().unwrap_or_else(|e| e.into_inner());
                let pause = rng.below(2) == 0;
                let body = if pause {
                    r#"{"state": "Paused"}"#
                } else {
                    r#"{"state": "Resumed"}"#
                };
                let out = c.send("PATCH", "/vm", Some(body));
                if pause == ctl.paused {
                    // Already in that state: refused with the state named.
                    let needle = if pause { "Paused" } else { "Running" };
                    check("PATCH /vm (no change)", out, 400, needle)?;
                    ctl.refusals += 1;
                    tally.refused_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    check("PATCH /vm", out, 204, "")?;
                    ctl.paused = pause;
                    if pause {
                        ctl.pauses += 1;
                    } else {
                        ctl.resumes += 1;
                    }
                }
            }
            r @ 750..=969 => {
                // Requests the API must refuse with a 400 naming the problem.
                let (what, method, path, body, needle) = REFUSED[(r as usize - 750) / 55];
                check(what, c.send(method, path, body), 400, needle)?;
                tally.refused_ok.fetch_add(1, Ordering::Relaxed);
            }
            970..=979 => {
                // Not HTTP at all: answered 400, then the connection is closed.
                let out = c.raw(b"HELLO THERE\r\n\r\n");
                let r = check("garbage request line", out, 400, "")?;
                closed_after("garbage request line", &mut c, &r)?;
                tally.refused_ok.fetch_add(1, Ordering::Relaxed);
                tally.closed_ok.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            980..=989 => {
                // A body larger than the API takes: 413, then the connection is closed.
                let req = "PUT /machine-config HTTP/1.1\r\nContent-Type: application/json\r\n\
                           Content-Length: 60000\r\n\r\n";
                let r = check("oversized body", c.raw(req.as_bytes()), 413, "")?;
                closed_after("oversized body", &mut c, &r)?;
                tally.refused_ok.fetch_add(1, Ordering::Relaxed);
                tally.closed_ok.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            _ => {
                // Half a request, then the client goes away.
                use std::io::Write;
                let _ =
                    c.s.write_all(b"PATCH /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n{\"sta");
                tally.abandoned.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(40)));
    }
}

#[test]
fn a_thousand_clients_for_a_minute() {
    if !common::require_kvm("load") {
        return;
    }
    let dir = common::scratch("load");
    let disk = dir.join("log.img");
    image(&disk, 8 << 20);
    let cfg: PathBuf = dir.join("vm.json");
    std::fs::write(
        &cfg,
        json!({
            "machine": {"vcpus": 1, "mem_mib": 128},
            "boot": {"cmdline": "probe=count probe.log=blk"},
            "disks": [{"path": disk, "id": "log"}],
        })
        .to_string(),
    )
    .unwrap();
    let sock = dir.join("api.sock");
    let mut vm = Ledge::serve(&sock, &["--config-file", cfg.to_str().unwrap()]);
    vm.wait_count_above(Some(3), "before the load");
    let pid = vm.pid();

    // Warm up (the API thread's buffers, the allocator's arenas), then take the baseline.
    for _ in 0..200 {
        call(&sock, "GET", "/", None);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = (fd_count(pid), rss_kib(pid));

    let control = Arc::new(Mutex::new(Control {
        paused: false,
        pauses: 0,
        resumes: 0,
        refusals: 0,
    }));
    let tally = Arc::new(Tally::default());
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let seed0 = common::seed("load", 0x1ed9e_u64 ^ u64::from(std::process::id()));
    println!("[load] {CLIENTS} clients by {WORKERS} workers over {SPAN:?}");
    let start = Instant::now();
    let per_worker = CLIENTS / WORKERS;
    let slot = SPAN / per_worker as u32;
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (sock, control, tally, errors) =
                (sock.clone(), control.clone(), tally.clone(), errors.clone());
            std::thread::Builder::new()
                .name(format!("client-worker{w}"))
                .spawn(move || {
                    let mut rng = Rng(seed0.wrapping_add(w as u64 * 0x9e37_79b9) | 1);
                    for j in 0..per_worker {
                        // Staggered: each worker's clients start at different offsets.
                        let begin = start + slot * j as u32 + slot * w as u32 / WORKERS as u32;
                        if let Some(d) = begin.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                        let until = begin + slot.mul_f64(0.3 + 0.6 * rng.below(100) as f64 / 100.0);
                        if let Err(e) = client(&sock, &mut rng, until, &control, &tally) {
                            tally.errors.fetch_add(1, Ordering::Relaxed);
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("worker {w} client {j}: {e}"));
                        }
                    }
                })
                .unwrap()
        })
        .collect();
    std::thread::sleep(SPAN / 2);
    let rss_mid = rss_kib(pid);
    let fds_mid = fd_count(pid);
    for w in workers {
        w.join().expect("a client worker panicked");
    }
    let took = start.elapsed();

    // Back to running, if the last operator paused.
    {
        let ctl = control.lock().unwrap();
        if ctl.paused {
            ok(&sock, "PATCH", "/vm", r#"{"state": "Resumed"}"#);
        }
    }
    // Abandoned connections are closed by the API's 5 s request deadline.
    let settle = Instant::now();
    let mut fds1 = fd_count(pid);
    while fds1 > fds0 && settle.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(200));
        fds1 = fd_count(pid);
    }
    let rss1 = rss_kib(pid);
    let ctl = control.lock().unwrap();
    let requests = tally.requests.load(Ordering::Relaxed);
    let nerr = tally.errors.load(Ordering::Relaxed);
    println!(
        "[load] KVM {}: {CLIENTS} clients sent {requests} requests in {took:.1?}: {nerr} wrong answers; \
         {} correctly refused, {} connections closed by the server as expected, {} abandoned by the client; \
         {} pauses, {} resumes, {} no-change refusals",
        common::kvm_kind(),
        tally.refused_ok.load(Ordering::Relaxed),
        tally.closed_ok.load(Ordering::Relaxed),
        tally.abandoned.load(Ordering::Relaxed),
        ctl.pauses,
        ctl.resumes,
        ctl.refusals,
    );
    println!(
        "[load] VMM process: fds {fds0} before, {fds_mid} at half time, {fds1} after; \
         VmRSS {rss0} KiB before, {rss_mid} KiB at half time, {rss1} KiB after"
    );
    let errs = errors.lock().unwrap();
    assert!(
        errs.is_empty(),
        "{} wrong answers, first ones:\n{}",
        errs.len(),
        errs.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(
        requests > 5 * CLIENTS as u64,
        "only {requests} requests were sent"
    );
    assert!(ctl.pauses > 10 && ctl.resumes > 10, "too few state changes");
    assert_eq!(
        fds1, fds0,
        "the VMM holds more file descriptors after the load"
    );
    // A leak of even 100 bytes per request would show as megabytes here; what the allocator
    // keeps after the first half's peak of connections must not grow in the second half.
    assert!(
        rss1 <= rss_mid + 256,
        "the VMM's RSS grew from {rss_mid} KiB at half time to {rss1} KiB at the end"
    );
    assert!(
        rss1 <= rss0 + 1024,
        "the VMM's RSS grew from {rss0} KiB to {rss1} KiB over the load"
    );

    // The guest counted through all of it: once per number, in order, each durable.
    let before = vm.last_count().unwrap();
    vm.wait_count_above(Some(before + 3), "after the load");
    vm.kill();
    let counts = vm.counts();
    for (i, c) in counts.iter().enumerate() {
        assert_eq!(*c, i as u64, "the count sequence broke at line {i}");
    }
    let log = CountLog::read(&disk);
    let last = *counts.last().unwrap();
    let run = log.record(0).expect("record 0").run;
    // The records the disk can still hold: the last `capacity` counts.
    log.assert_intact(
        last.saturating_sub(log.capacity() - 1)..=last,
        run,
        "after the load",
    );
    println!(
        "[load] the guest counted 0..={last} without a gap; every record on the disk is intact"
    );
}
