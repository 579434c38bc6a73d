//! The library's lifecycle on a real guest: start, pause (every vCPU kicked out of KVM_RUN),
//! resume, refused transitions, and a host-side stop — checked by what the probe guest printed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use ledge::config::{ConsoleConfig, VmConfig};
use ledge::{VmExit, VmState};

fn counted(console: &Path) -> usize {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("count: "))
        .count()
}

fn wait_for_count(console: &Path, above: usize) -> usize {
    let start = Instant::now();
    loop {
        let n = counted(console);
        if n > above {
            return n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "guest counter stuck at {n}:\n{}",
            std::fs::read_to_string(console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pause_resume_stop_on_a_counting_guest() {
    if !common::require_kvm("pause_resume_stop_on_a_counting_guest") {
        return;
    }
    let dir = common::scratch("lifecycle");
    let console = dir.join("console.txt");
    let mut cfg = VmConfig::default();
    cfg.machine.vcpus = 2;
    cfg.boot.cmdline = Some("probe=count".into());
    cfg.console = ConsoleConfig::File(console.clone());

    let mut vmm = ledge::build(&cfg).expect("build");
    assert_eq!(vmm.state(), VmState::NotStarted);
    assert!(vmm.pause().is_err(), "a VM that never ran cannot pause");
    vmm.start().expect("start");
    assert_eq!(vmm.state(), VmState::Running);
    let before = wait_for_count(&console, 3);

    vmm.pause().expect("pause");
    assert_eq!(vmm.state(), VmState::Paused);
    let frozen = counted(&console);
    assert!(frozen >= before);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counted(&console), frozen, "a paused guest must not run");
    let e = vmm.pause().unwrap_err().to_string();
    assert_eq!(e, "the VM cannot go from Paused to Paused");

    vmm.resume().expect("resume");
    wait_for_count(&console, frozen);

    vmm.request_stop();
    let exit = vmm.run().expect("run");
    assert_eq!(exit, VmExit::Stopped);
    assert_eq!(vmm.state(), VmState::Stopped);
    assert!(vmm.resume().is_err());
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("cpus: mp=2 online=2"), "{text}");
}

#[test]
fn guest_reset_ends_run_with_reset() {
    if !common::require_kvm("guest_reset_ends_run_with_reset") {
        return;
    }
    let cfg = VmConfig {
        console: ConsoleConfig::Off,
        ..Default::default()
    };
    let mut vmm = ledge::build(&cfg).expect("build");
    assert_eq!(vmm.run().expect("run"), VmExit::Reset);
    assert_eq!(vmm.state(), VmState::Stopped);
}
