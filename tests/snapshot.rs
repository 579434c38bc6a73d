//! Snapshots end to end with the probe guest on this machine's /dev/kvm: a real `ledge` process
//! is paused and snapshotted through the API (`PUT /snapshot/create`), killed with SIGKILL, and
//! a new process restores it (`PUT /snapshot/load` or `ledge restore`). What is checked comes
//! from the guest (its counter continues at the next value, its memory pattern verifies after a
//! diff restore) and from the host (records on the virtio-blk disk, the memory files' allocated
//! size, the clones' RSS/PSS from /proc, refusals of damaged files). No wall-clock time is
//! asserted: durations are printed.
//!
//! Probe modes used: `probe=count probe.log=blk` (every count is written to the disk and
//! flushed before it is printed) and `probe=dirty probe.dirty-mib=N` (N MiB of patterned memory;
//! COM1 input `d` rewrites it with the next round, `v` verifies it).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::probe_io::{echo_frames, guest_mac, CountLog, RawSocket, Tap};
use common::vm::*;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a Ledge config file booting the built-in probe guest.
fn config_file(dir: &Path, name: &str, v: serde_json::Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).unwrap();
    p
}

fn pause(sock: &Path) {
    ok(sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
}

fn resume(sock: &Path) {
    ok(sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
}

fn create(sock: &Path, snap: &Path, mem: &Path, kind: &str) -> Duration {
    let t = Instant::now();
    ok(
        sock,
        "PUT",
        "/snapshot/create",
        &json!({"snapshot_path": snap, "mem_file_path": mem, "snapshot_type": kind}).to_string(),
    );
    t.elapsed()
}

fn load_body(snap: &Path, mem: &Path, resume: bool) -> String {
    load_body_with(snap, mem, resume, json!([]))
}

fn load_body_with(snap: &Path, mem: &Path, resume: bool, nets: serde_json::Value) -> String {
    json!({
        "snapshot_path": snap,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": resume,
        "network_overrides": nets,
    })
    .to_string()
}

/// A new `ledge --api-sock` process that loads the snapshot and resumes it.
fn restore(sock: &Path, snap: &Path, mem: &Path, input: bool) -> (Ledge, Duration) {
    restore_with(sock, &load_body(snap, mem, true), input)
}

fn restore_with(sock: &Path, body: &str, input: bool) -> (Ledge, Duration) {
    let t = Instant::now();
    let vm = if input {
        Ledge::serve_with_input(sock, &[])
    } else {
        Ledge::serve(sock, &[])
    };
    ok(sock, "PUT", "/snapshot/load", body);
    let took = t.elapsed();
    assert_eq!(state(sock), "Running");
    (vm, took)
}

/// Bytes the file really occupies on disk.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// The last count a process printed, and whether a partial `count:` line follows it (the VM
/// was paused in the middle of printing the next one).
fn last_count_and_partial(vm: &Ledge) -> (u64, bool) {
    let out = vm.stdout();
    let last = vm.last_count().expect("no count yet");
    let tail = &out[out.rfind('\n').map_or(0, |i| i + 1)..];
    (last, tail.starts_with("count:") || tail.starts_with("co"))
}

/// Counts must go up by one, without gaps or repeats.
fn assert_contiguous(counts: &[u64], what: &str) {
    for w in counts.windows(2) {
        assert_eq!(w[1], w[0] + 1, "{what}: counts jump {} -> {}", w[0], w[1]);
    }
}

/// Waits until the guest printed a line starting with `prefix` after byte `from` of stdout.
fn wait_line_after(vm: &mut Ledge, from: usize, prefix: &str) -> String {
    let start = Instant::now();
    loop {
        let out = vm.stdout();
        if let Some(l) = out
            .get(from..)
            .unwrap_or("")
            .lines()
            .find(|l| l.starts_with(prefix))
        {
            if out[from..].contains(&format!("{l}\n")) {
                return l.to_string();
            }
        }
        assert!(
            start.elapsed() < GUEST_LIMIT,
            "no {prefix:?} line within {GUEST_LIMIT:?}:\n{}",
            vm.diag()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Rss and Pss of a process, in bytes, from /proc/PID/smaps_rollup.
fn rss_pss(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let kb = |key: &str| -> u64 {
        common::proc_field(&text, key)
            .and_then(|v| common::kib(&v))
            .unwrap_or_else(|| panic!("no {key} in kB in smaps_rollup"))
    };
    (kb("Rss") * 1024, kb("Pss") * 1024)
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

#[test]
fn a_killed_vm_continues_counting_in_a_new_process() {
    if !common::require_kvm("snapshot-count") {
        return;
    }
    let _one = common::one_vm();
    let dir = common::scratch("snap-count");
    let disk = dir.join("log.img");
    image(&disk, MIB);
    // The network part needs root: one TAP before, another after the restore.
    let taps = Tap::try_create("snapshot-count").map(|a| {
        let b = Tap::create(&format!("{}b", a.0));
        (a, b)
    });
    let (cmdline, nets) = match &taps {
        Some((a, _)) => (
            "probe=count probe.log=blk probe.net=echo",
            json!([{"tap": a.0, "id": "eth0", "mac": guest_mac()}]),
        ),
        None => ("probe=count probe.log=blk", json!([])),
    };
    let cfg = config_file(
        &dir,
        "vm.json",
        json!({
            "machine": {"vcpus": 1, "mem_mib": 128},
            "boot": {"cmdline": cmdline},
            "disks": [{"path": disk, "id": "log"}],
            "nets": nets,
        }),
    );
    let (sock, sock2) = (dir.join("a.sock"), dir.join("b.sock"));
    let (snap, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));

    let mut vm = Ledge::serve(&sock, &["--config-file", s(&cfg)]);
    vm.wait_count_above(Some(5), "before the snapshot");
    // A running VM is refused, with what to do.
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": snap, "mem_file_path": mem}).to_string()),
        400,
        &["paused", "Running"],
    );
    assert!(!snap.exists() && !mem.exists());
    pause(&sock);
    std::thread::sleep(Duration::from_millis(300));
    let took = create(&sock, &snap, &mem, "Full");
    let (before, partial) = last_count_and_partial(&vm);
    vm.kill();
    println!(
        "[snapshot-count] Full snapshot of a 128 MiB probe guest: {took:?}; memory file {} MiB long, {:.2} MiB allocated; state file {} bytes",
        mib(std::fs::metadata(&mem).unwrap().len()),
        mib(allocated(&mem)),
        std::fs::metadata(&snap).unwrap().len()
    );
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 128 * MIB);
    assert!(
        allocated(&mem) < 16 * MIB,
        "an idle probe guest touched little, the file holds {} MiB",
        mib(allocated(&mem))
    );

    let overrides = match &taps {
        Some((_, b)) => json!([{"iface_id": "eth0", "host_dev_name": b.0}]),
        None => json!([]),
    };
    let (mut vm2, took) =
        restore_with(&sock2, &load_body_with(&snap, &mem, true, overrides), false);
    println!("[snapshot-count] launch -> snapshot/load answered (resumed): {took:?}");
    let after = vm2.wait_count_above(Some(before + 3), "after the restore");
    let counts = vm2.counts();
    let want = if partial { before + 2 } else { before + 1 };
    assert_eq!(
        counts[0], want,
        "the restored guest must continue at the next count (last before: {before}, partial line: {partial})"
    );
    assert_contiguous(&counts, "after the restore");
    if let Some((_, b)) = &taps {
        echo_frames(&RawSocket::bind(&b.0), 200, 1, None);
        println!(
            "[snapshot-count] the restored guest echoes frames through its new TAP {}",
            b.0
        );
    }
    // The restored VM is a normal VM: pause, snapshot again, resume.
    pause(&sock2);
    create(
        &sock2,
        &dir.join("again.snap"),
        &dir.join("again.mem"),
        "Full",
    );
    resume(&sock2);
    vm2.wait_count_above(Some(after + 2), "after a snapshot of the restored VM");
    vm2.kill();

    // Every count either process printed has its record on the disk, all from one run: the
    // restored guest is the same run, continuing.
    let last = vm2.last_count().unwrap();
    let log = CountLog::read(&disk);
    let run = log.record(0).expect("no record for count 0").run;
    log.assert_intact(0..=last, run, "across both processes");
    println!(
        "[snapshot-count] records 0..={last} on the disk, intact, one run across both processes"
    );
}

#[test]
fn a_diff_holds_what_changed_and_restores_merged() {
    if !common::require_kvm("snapshot-diff") {
        return;
    }
    let _one = common::one_vm();
    let dir = common::scratch("snap-diff");
    let cfg = config_file(
        &dir,
        "vm.json",
        json!({
            "machine": {"vcpus": 1, "mem_mib": 128, "track_dirty_pages": true},
            "boot": {"cmdline": "probe=dirty probe.dirty-mib=10"},
        }),
    );
    let (sock, sock2, sock3) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    let (base, base_mem) = (dir.join("base.snap"), dir.join("base.mem"));
    let (diff, diff_mem) = (dir.join("diff.snap"), dir.join("diff.mem"));

    let mut vm = Ledge::serve_with_input(&sock, &["--config-file", s(&cfg)]);
    vm.wait_line("dirty: round=1");
    vm.wait_count_above(Some(2), "after round 1");
    pause(&sock);
    let full_took = create(&sock, &base, &base_mem, "Full");
    resume(&sock);
    let from = vm.stdout_len();
    vm.send_input(b"d");
    let line = wait_line_after(&mut vm, from, "dirty: round=2");
    assert!(line.ends_with(" ok"), "{line}");
    pause(&sock);
    let diff_took = create(&sock, &diff, &diff_mem, "Diff");
    // A snapshot that fails (here: its directory does not exist) has read the dirty logs, so a
    // Diff after it would miss pages: it is refused until a snapshot succeeds again.
    let nowhere = Path::new("/nonexistent/ledge");
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": nowhere.join("s"), "mem_file_path": nowhere.join("m"), "snapshot_type": "Diff"}).to_string()),
        400,
        &["/nonexistent/ledge"],
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&json!({"snapshot_path": dir.join("d2.snap"), "mem_file_path": dir.join("d2.mem"), "snapshot_type": "Diff"}).to_string()),
        400,
        &["Full snapshot first"],
    );
    vm.kill();
    println!(
        "[snapshot-diff] Full: {full_took:?}, {:.2} MiB allocated; Diff after 10 MiB rewritten: {diff_took:?}, {:.2} MiB allocated (both files {} MiB long)",
        mib(allocated(&base_mem)),
        mib(allocated(&diff_mem)),
        mib(std::fs::metadata(&diff_mem).unwrap().len()),
    );
    let d = allocated(&diff_mem);
    assert!(
        (10 * MIB..=12 * MIB).contains(&d),
        "the diff should hold about the 10 MiB the guest rewrote, not {:.2} MiB",
        mib(d)
    );

    // The diff's state with the unmerged base or the bare diff: refused, naming the fix.
    let vm2 = Ledge::serve(&sock2, &[]);
    for m in [&base_mem, &diff_mem] {
        let fault = refused(
            &sock2,
            "PUT",
            "/snapshot/load",
            Some(&load_body(&diff, m, true)),
            400,
            &["merge"],
        );
        println!("[snapshot-diff] refused as expected: {fault}");
    }
    assert_eq!(state(&sock2), "Not started");
    drop(vm2);

    // Merge, restore, verify the guest's memory from inside.
    let out = common::ledge(
        &[
            "snapshot",
            "merge",
            "--base",
            s(&base_mem),
            "--diff",
            s(&diff_mem),
            "--diff-snapshot",
            s(&diff),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, Some(0), "merge: {}", out.stderr);
    let (mut vm3, _) = restore(&sock3, &diff, &base_mem, true);
    vm3.wait_count_above(None, "after the diff restore");
    let from = vm3.stdout_len();
    vm3.send_input(b"v");
    let line = wait_line_after(&mut vm3, from, "dirty: verify");
    assert_eq!(line, "dirty: verify round=2 ok", "{}", vm3.diag());
}

#[test]
fn ten_clones_share_one_memory_file() {
    if !common::require_kvm("snapshot-clones") {
        return;
    }
    let _one = common::one_vm();
    let dir = common::scratch("snap-clones");
    let cfg = config_file(
        &dir,
        "vm.json",
        json!({
            "machine": {"vcpus": 1, "mem_mib": 128},
            "boot": {"cmdline": "probe=dirty probe.dirty-mib=32"},
            "console": "off",
        }),
    );
    let (sock, snap, mem) = (dir.join("a.sock"), dir.join("vm.snap"), dir.join("vm.mem"));
    let mut vm = Ledge::serve(&sock, &["--config-file", s(&cfg)]);
    // With the console off, wait for the guest through its memory: the snapshot's size.
    std::thread::sleep(Duration::from_secs(2));
    // The CLI's way: pause, snapshot, resume in one command.
    let out = common::ledge(
        &[
            "snapshot",
            "create",
            "--api-sock",
            s(&sock),
            "--snapshot",
            s(&snap),
            "--mem",
            s(&mem),
            "--pause",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.code, Some(0), "ledge snapshot create: {}", out.stderr);
    assert_eq!(state(&sock), "Running", "--pause resumes afterwards");
    vm.kill();
    assert!(
        allocated(&mem) >= 32 * MIB,
        "the guest's 32 MiB are in the snapshot ({:.2} MiB)",
        mib(allocated(&mem))
    );

    const N: usize = 10;
    let t = Instant::now();
    let mut clones: Vec<(Ledge, PathBuf)> = (0..N)
        .map(|i| {
            let sock = dir.join(format!("c{i}.sock"));
            let l = Ledge::spawn(&[
                "restore",
                "--snapshot",
                s(&snap),
                "--mem",
                s(&mem),
                "--api-sock",
                s(&sock),
                "--console",
                "stdio",
            ]);
            (l, sock)
        })
        .collect();
    for (c, _) in &mut clones {
        c.wait_count_above(None, "a clone runs");
    }
    println!(
        "[snapshot-clones] {N} clones restored concurrently and counting after {:?}",
        t.elapsed()
    );
    let (mut rss, mut pss) = (0, 0);
    for (c, sock) in &clones {
        assert_eq!(state(sock), "Running");
        let (r, p) = rss_pss(c.pid());
        rss += r;
        pss += p;
    }
    println!(
        "[snapshot-clones] {N} clones of a 128 MiB guest with 32 MiB in use: total RSS {:.1} MiB, total PSS {:.1} MiB",
        mib(rss),
        mib(pss)
    );
    assert!(
        pss * 2 < rss,
        "clones must share the snapshot's pages: PSS {:.1} MiB vs RSS {:.1} MiB",
        mib(pss),
        mib(rss)
    );
    assert!(rss < N as u64 * 128 * MIB / 2);
    for (c, _) in &mut clones {
        c.signal(libc::SIGKILL);
    }
}

#[test]
fn damaged_snapshots_are_refused_before_any_vm_exists() {
    if !common::require_kvm("snapshot-bad-files") {
        return;
    }
    let _one = common::one_vm();
    let dir = common::scratch("snap-bad");
    let cfg = config_file(
        &dir,
        "vm.json",
        json!({"boot": {"cmdline": "probe=count"}, "console": "off"}),
    );
    let (sock, snap, mem) = (dir.join("a.sock"), dir.join("vm.snap"), dir.join("vm.mem"));
    let mut vm = Ledge::serve(&sock, &["--config-file", s(&cfg)]);
    pause(&sock);
    create(&sock, &snap, &mem, "Full");
    // A Diff without tracking, and before any Full of a tracked VM: refused with the fix.
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(
            &json!({"snapshot_path": dir.join("d.snap"), "mem_file_path": dir.join("d.mem"), "snapshot_type": "Diff"})
                .to_string(),
        ),
        400,
        &["track_dirty_pages"],
    );
    vm.kill();

    let good = std::fs::read(&snap).unwrap();
    let variant = |name: &str, bytes: &[u8]| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    let short_mem = dir.join("short.mem");
    std::fs::copy(&mem, &short_mem).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&short_mem)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let cases: Vec<(&str, PathBuf, &Path, Vec<&str>)> = vec![
        (
            "a flipped bit",
            variant("flip.snap", &flipped),
            &mem,
            vec!["checksum"],
        ),
        (
            "truncated",
            variant("short.snap", &good[..good.len() - 100]),
            &mem,
            vec!["truncated"],
        ),
        (
            "empty",
            variant("empty.snap", b""),
            &mem,
            vec!["not a Ledge snapshot"],
        ),
        (
            "a newer format",
            variant("v99.snap", &newer),
            &mem,
            vec!["version 99", "newer Ledge"],
        ),
        (
            "not a snapshot",
            cfg.clone(),
            &mem,
            vec!["not a Ledge snapshot"],
        ),
        (
            "a short memory file",
            snap.clone(),
            &short_mem,
            vec!["bytes of memory"],
        ),
        (
            "a missing memory file",
            snap.clone(),
            Path::new("/nonexistent/vm.mem"),
            vec!["/nonexistent/vm.mem"],
        ),
    ];
    let api = Ledge::serve(&dir.join("b.sock"), &[]);
    let b = dir.join("b.sock");
    for (what, snap_file, mem_file, needles) in &cases {
        let fault = refused(
            &b,
            "PUT",
            "/snapshot/load",
            Some(&load_body(snap_file, mem_file, true)),
            400,
            needles,
        );
        println!("[snapshot-bad-files] {what}: {fault}");
        assert_eq!(state(&b), "Not started", "{what}: no VM may exist");
        let out = common::ledge(
            &[
                "restore",
                "--snapshot",
                s(snap_file),
                "--mem",
                s(mem_file),
                "--console",
                "off",
            ],
            Duration::from_secs(30),
        );
        out.assert_clean_error(needles[0]);
    }
    let fault = refused(
        &b,
        "PUT",
        "/snapshot/load",
        Some(
            &json!({"snapshot_path": snap, "mem_backend": {"backend_type": "Uffd", "backend_path": "/tmp/x.sock"}})
                .to_string(),
        ),
        400,
        &["Uffd", "File"],
    );
    println!("[snapshot-bad-files] Uffd: {fault}");
    // After boot configuration, a load is refused; after a good load, a second one is too.
    ok(
        &b,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":1,"mem_size_mib":64}"#,
    );
    refused(
        &b,
        "PUT",
        "/snapshot/load",
        Some(&load_body(&snap, &mem, false)),
        400,
        &["fresh process"],
    );
    drop(api);
    let c = dir.join("c.sock");
    let _vm = Ledge::serve(&c, &[]);
    ok(&c, "PUT", "/snapshot/load", &load_body(&snap, &mem, false));
    assert_eq!(state(&c), "Paused");
    refused(
        &c,
        "PUT",
        "/snapshot/load",
        Some(&load_body(&snap, &mem, false)),
        400,
        &["Paused"],
    );
    resume(&c);
    assert_eq!(state(&c), "Running");
}

#[test]
fn kill_9_while_snapshotting_leaves_a_loadable_snapshot() {
    if !common::require_kvm("snapshot-kill-9") {
        return;
    }
    let _one = common::one_vm();
    let dir = common::scratch("snap-kill");
    let cfg = config_file(
        &dir,
        "vm.json",
        json!({
            "machine": {"vcpus": 1, "mem_mib": 256},
            "boot": {"cmdline": "probe=dirty probe.dirty-mib=96"},
        }),
    );
    let (snap, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let sock = dir.join("0.sock");
    let mut vm = Ledge::serve(&sock, &["--config-file", s(&cfg)]);
    vm.wait_line("dirty: round=1");
    pause(&sock);
    let full = create(&sock, &snap, &mem, "Full");
    println!("[snapshot-kill-9] a Full snapshot of 96 MiB in use takes {full:?} here");
    vm.kill();

    // Each round restores what is on disk, and kills the next snapshot at another moment.
    // Up to and past the whole snapshot's time, so the kill also lands in the renames.
    let delays_ms = [0u64, 5, 20, 50, 100, 200, 400, 600, 800, 1200];
    for (i, delay) in delays_ms.iter().enumerate() {
        let sock = dir.join(format!("{}.sock", i + 1));
        let (mut vm, _) = restore(&sock, &snap, &mem, false);
        vm.wait_count_above(None, &format!("round {i}: the restored guest runs"));
        pause(&sock);
        let body = json!({"snapshot_path": snap, "mem_file_path": mem}).to_string();
        // Connected before the thread starts, so the kill cannot come before the connection.
        let mut c = Conn::connect(&sock);
        let req = std::thread::spawn(move || c.send("PUT", "/snapshot/create", Some(&body)));
        std::thread::sleep(Duration::from_millis(*delay));
        vm.kill();
        let outcome = req.join().unwrap();
        println!(
            "[snapshot-kill-9] round {i}: killed {delay} ms into the snapshot: {}",
            match outcome {
                Outcome::Answered(r) => format!("it had finished ({})", r.status),
                Outcome::Closed(_) => "it was cut short".to_string(),
            }
        );
    }
    let sock = dir.join("last.sock");
    let (mut vm, _) = restore(&sock, &snap, &mem, true);
    vm.wait_count_above(None, "the last restore runs");
    let from = vm.stdout_len();
    vm.send_input(b"v");
    let line = wait_line_after(&mut vm, from, "dirty: verify");
    assert_eq!(line, "dirty: verify round=1 ok");
    // The next snapshot clears what the killed ones left behind.
    pause(&sock);
    create(&sock, &snap, &mem, "Full");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("ledge-tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn the_first_format_still_restores() {
    if !common::require_kvm("snapshot-format-v1") {
        return;
    }
    let _one = common::one_vm();
    let (snap, mem) = common::snapshot_v1_fixture(&common::scratch("snap-v1"));
    let info = common::ledge(&["snapshot", "info", s(&snap)], Duration::from_secs(30));
    assert_eq!(info.code, Some(0), "{}", info.stderr);
    let v: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["devices"], json!(["rng"]));

    let mut vm = Ledge::spawn(&["restore", "--snapshot", s(&snap), "--mem", s(&mem)]);
    vm.wait_count_above(Some(97), "the v1 fixture restored");
    let counts = vm.counts();
    assert_eq!(counts[0], 94, "the fixture was paused after count 93");
    assert_contiguous(&counts, "the v1 fixture");
    println!("[snapshot-format-v1] the format-1 fixture restores and counts on from 94");
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path, mib: u64) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "ledge-test"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a {mib} MiB tmpfs at {}", at.display());
        SmallFs(at.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_fails_the_snapshot_and_keeps_the_older_one() {
    if !common::require_kvm("snapshot-disk-full") {
        return;
    }
    if !common::probe_io::require_root("snapshot-disk-full", "mounting a small tmpfs needs root") {
        return;
    }
    let _one = common::one_vm();
    let dir = common::scratch("snap-full");
    let cfg = config_file(
        &dir,
        "vm.json",
        json!({
            "machine": {"vcpus": 1, "mem_mib": 128},
            "boot": {"cmdline": "probe=dirty probe.dirty-mib=24"},
        }),
    );
    // Room for one snapshot of ~24 MiB in use, not for a second one beside it.
    let fs = SmallFs::mount(&dir.join("small"), 40);
    let (snap, mem) = (fs.0.join("vm.snap"), fs.0.join("vm.mem"));
    let sock = dir.join("a.sock");
    let mut vm = Ledge::serve_with_input(&sock, &["--config-file", s(&cfg)]);
    vm.wait_line("dirty: round=1");
    vm.wait_count_above(Some(1), "after round 1");
    pause(&sock);
    create(&sock, &snap, &mem, "Full");
    let (old_state, old_mem) = (std::fs::read(&snap).unwrap(), std::fs::read(&mem).unwrap());
    println!(
        "[snapshot-disk-full] KVM {}: the first snapshot takes {:.1} MiB of the 40 MiB filesystem",
        common::kvm_kind(),
        mib(allocated(&mem) + allocated(&snap))
    );

    // The guest rewrites its buffer; the same snapshot again finds no room for the new copy.
    resume(&sock);
    let from = vm.stdout_len();
    vm.send_input(b"d");
    let line = wait_line_after(&mut vm, from, "dirty: round=2");
    assert!(line.ends_with(" ok"), "{line}");
    pause(&sock);
    let body = json!({"snapshot_path": snap, "mem_file_path": mem}).to_string();
    let fault = refused(
        &sock,
        "PUT",
        "/snapshot/create",
        Some(&body),
        400,
        &["No space left on device", "unchanged"],
    );
    println!("[snapshot-disk-full] refused: {fault}");
    assert!(!fault.contains('\n'), "one line: {fault:?}");
    // The older snapshot is untouched and nothing half-written is left beside it.
    assert!(
        std::fs::read(&snap).unwrap() == old_state,
        "the older state file changed"
    );
    assert!(
        std::fs::read(&mem).unwrap() == old_mem,
        "the older memory file changed"
    );
    let mut names: Vec<String> = std::fs::read_dir(&fs.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["vm.mem", "vm.snap"],
        "files left on the full filesystem"
    );

    // The VM goes on: it is still paused, resumes and counts; a snapshot elsewhere works.
    assert_eq!(state(&sock), "Paused");
    resume(&sock);
    let c = vm.last_count();
    vm.wait_count_above(c, "after the failed snapshot");
    pause(&sock);
    create(
        &sock,
        &dir.join("roomy.snap"),
        &dir.join("roomy.mem"),
        "Full",
    );
    vm.kill();

    // The older snapshot restores, with its own memory (round 1), and the newer one round 2.
    for (snap, mem, round) in [
        (snap.clone(), mem.clone(), 1),
        (dir.join("roomy.snap"), dir.join("roomy.mem"), 2),
    ] {
        let sock = dir.join(format!("r{round}.sock"));
        let (mut vm, _) = restore(&sock, &snap, &mem, true);
        vm.wait_count_above(None, "the restored guest runs");
        let from = vm.stdout_len();
        vm.send_input(b"v");
        let line = wait_line_after(&mut vm, from, "dirty: verify");
        assert_eq!(line, format!("dirty: verify round={round} ok"));
    }
    println!("[snapshot-disk-full] the older snapshot restores and verifies; so does a later one elsewhere");
}

/// Live changes to the balloon (PATCH /balloon, PATCH /balloon/statistics) are part of the
/// VM's configuration: a snapshot taken after them restores with them, as GET /balloon and
/// GET /vm/config of the restored VM show.
#[test]
fn a_restored_vm_keeps_its_live_balloon_changes() {
    if !common::require_kvm("snapshot-balloon") {
        return;
    }
    let _one = common::one_vm();
    let dir = common::scratch("snap-balloon");
    let cfg = config_file(
        &dir,
        "vm.json",
        json!({
            "machine": {"vcpus": 1, "mem_mib": 128},
            "boot": {"cmdline": "probe=count"},
            "balloon": {"mib": 0, "stats_interval_s": 5},
        }),
    );
    let (sock, snap, mem) = (dir.join("a.sock"), dir.join("vm.snap"), dir.join("vm.mem"));
    let mut vm = Ledge::serve(&sock, &["--config-file", s(&cfg)]);
    vm.wait_count_above(None, "the guest counts");
    ok(&sock, "PATCH", "/balloon", r#"{"amount_mib":16}"#);
    ok(
        &sock,
        "PATCH",
        "/balloon/statistics",
        r#"{"stats_polling_interval_s":2}"#,
    );
    let want = |b: &serde_json::Value, what: &str| {
        assert_eq!(
            (&b["amount_mib"], &b["stats_polling_interval_s"]),
            (&json!(16), &json!(2)),
            "{what}: {b}"
        );
    };
    want(&get(&sock, "/balloon"), "before the snapshot");
    pause(&sock);
    create(&sock, &snap, &mem, "Full");
    vm.kill();

    let sock2 = dir.join("b.sock");
    let (mut vm2, _) = restore(&sock2, &snap, &mem, false);
    want(&get(&sock2, "/balloon"), "the restored VM's GET /balloon");
    want(
        &get(&sock2, "/vm/config")["balloon"],
        "the restored VM's GET /vm/config",
    );
    vm2.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
