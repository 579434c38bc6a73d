//! Faults of the host, end to end on this machine's /dev/kvm with the probe guest.
//!
//! `kill -9` of the VMM, 100 times, at random moments while the guest writes one
//! sequence-numbered, checksummed record per count to its virtio-blk disk and flushes it: the
//! guest prints a count only after the device acknowledged the record's write and FLUSH, so
//! after every kill each printed count's record must be on the host's file, intact. (The
//! Linux-guest version, ext4 and fsck, is the `crash` case of tests/linux_devices.rs.)
//!
//! No wall-clock time is asserted; the moments of the kills are random (the seed is printed;
//! LEDGE_TEST_SEED replays a run).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::probe_io::CountLog;
use common::vm::*;
use common::Rng;

const KILLS: usize = 100;

/// The run id of the guest's `log: ... run=0x<hex> ready` line, once it printed that line (a
/// line without a hex run id fails the test).
fn run_id(vm: &Ledge) -> Option<u64> {
    let l = vm.lines_with("log: dev=0").into_iter().next()?;
    assert!(l.contains(" run=0x"), "no hex run id in {l:?}");
    Some(field(&l, "run="))
}

/// Checks the disk after a kill: every count the guest printed has its record, from this run;
/// the record after the last printed one is either intact or absent (it was in flight), never
/// a record of this run with another number. Returns how many records were checked.
fn check_disk(disk: &Path, run: u64, last: Option<u64>, what: &str) -> u64 {
    let Some(last) = last else { return 0 };
    let log = CountLog::read(disk);
    log.assert_intact(0..=last, run, what);
    if let Some(r) = log.record(last + 1) {
        if r.run == run {
            assert_eq!(r.seq, last + 1, "{what}: the in-flight record");
        }
    }
    last + 1
}

#[test]
fn kill_9_a_hundred_times_loses_no_acknowledged_record() {
    if !common::require_kvm("kill-loop") {
        return;
    }
    let dir = common::scratch("kill-loop");
    let disk = dir.join("log.img");
    // 4 MiB: 8192 sectors, far more records than one run writes.
    image(&disk, 4 << 20);
    let seed = common::seed(
        "kill-loop",
        0x6b11_u64 ^ u64::from(std::process::id()) << 16 | 1,
    );
    let mut rng = Rng(seed);
    let disk_arg = format!("path={},id=log", disk.display());
    let (mut checked, mut in_counting, mut early) = (0u64, 0, 0);
    let start = Instant::now();
    for i in 0..KILLS {
        let mut vm = Ledge::spawn(&[
            "run",
            "--mem-mib",
            "64",
            "--cmdline",
            "probe=count probe.log=blk",
            "--disk",
            &disk_arg,
        ]);
        let what = format!("kill {i}");
        if rng.below(10) == 0 {
            // Now and then before the guest has even started its log.
            std::thread::sleep(Duration::from_millis(rng.below(60)));
            early += 1;
        } else {
            let k = rng.below(12);
            vm.wait_count_above(if k == 0 { None } else { Some(k) }, &what);
            // Somewhere in a record's write, its FLUSH or the wait between counts.
            std::thread::sleep(Duration::from_micros(rng.below(40_000)));
            in_counting += 1;
        }
        let st = vm.kill();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL),
            "{what}: ledge ended by itself ({st}) before the kill:\n{}",
            vm.diag()
        );
        let last = vm.last_count();
        match run_id(&vm) {
            Some(run) => checked += check_disk(&disk, run, last, &what),
            None => assert!(last.is_none(), "{what}: counts without a log line"),
        }
    }
    println!(
        "[kill-loop] {KILLS} SIGKILLs in {:.1?} ({in_counting} while counting, {early} during start-up): \
         {checked} acknowledged records checked after the kills, 0 lost or damaged",
        start.elapsed()
    );
    assert!(
        in_counting > KILLS / 2 && checked > KILLS as u64,
        "too few kills hit a counting guest"
    );
}
