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

/// The embedding API: a VM on its own VMM thread, driven through `VmmHandle` with the same
/// rules as the HTTP API (refused transitions are errors naming the state).
#[test]
fn vmm_handle_drives_a_vm_from_another_thread() {
    if !common::require_kvm("vmm_handle_drives_a_vm_from_another_thread") {
        return;
    }
    use ledge::controller::VmmHandle;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let count = |s: &Sink| {
        String::from_utf8_lossy(&s.0.lock().unwrap())
            .lines()
            .filter(|l| l.starts_with("count: "))
            .count()
    };
    let mut cfg = VmConfig::default();
    cfg.boot.cmdline = Some("probe=count".into());
    let vm = VmmHandle::spawn("handle-test", cfg, Some(Box::new(sink.clone()))).unwrap();
    assert_eq!(vm.describe().unwrap()["state"], "Not started");
    let e = vm.pause().unwrap_err().to_string();
    assert!(e.contains("Not started"), "{e}");
    vm.start().unwrap();
    let start = Instant::now();
    while count(&sink) < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "guest not counting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let other = vm.clone();
    std::thread::spawn(move || other.pause().unwrap())
        .join()
        .unwrap();
    assert_eq!(vm.describe().unwrap()["state"], "Paused");
    let frozen = count(&sink);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&sink), frozen);
    vm.resume().unwrap();
    vm.stop();
    assert_eq!(vm.wait().unwrap(), VmExit::Stopped);
    assert!(vm.wait().is_err(), "a second wait is refused");
    assert!(vm.describe().is_err(), "the VMM thread is gone");
}
