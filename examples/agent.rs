//! A tiny edge agent that embeds Ledge as a library: it boots the built-in probe guest on its
//! own VMM thread, keeps the guest console in memory, pauses and resumes the VM (checking from
//! the guest's own counter that a pause is a pause), then stops it.
//!
//! Run: `cargo run --example agent` (needs /dev/kvm).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ledge::config::VmConfig;
use ledge::controller::VmmHandle;

/// The guest console, kept in memory by the agent.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    /// How many `count: N` lines the probe guest has printed.
    fn counted(&self) -> usize {
        let text = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.starts_with("count: "))
            .count()
    }

    fn wait_above(&self, n: usize) -> Result<usize, String> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            let c = self.counted();
            if c > n {
                return Ok(c);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("the guest counter stayed at {n}"))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = VmConfig::default();
    config.machine.vcpus = 2;
    config.boot.cmdline = Some("probe=count".into());
    let console = Console::default();

    let vm = VmmHandle::spawn("agent-demo", config, Some(Box::new(console.clone())))?;
    vm.start()?;
    console.wait_above(3)?;
    println!("agent: started: {}", vm.describe()?);

    vm.pause()?;
    let frozen = console.counted();
    std::thread::sleep(Duration::from_millis(500));
    if console.counted() != frozen {
        return Err("the guest kept counting while paused".into());
    }
    println!("agent: paused at count {frozen}: {}", vm.describe()?);

    vm.resume()?;
    let after = console.wait_above(frozen)?;
    println!("agent: resumed, count {after}");

    vm.stop();
    let exit = vm.wait()?;
    println!("agent: stopped ({exit})");
    Ok(())
}
