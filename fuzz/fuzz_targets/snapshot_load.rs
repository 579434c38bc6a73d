//! The snapshot loader: `snapshot::decode` on arbitrary bytes and, for state files that
//! decode, the checks a restore runs before KVM is touched: the configuration, the CPU check,
//! the memory file check (`open_memory`), and every saved device put back into a fresh device
//! behind a virtio-mmio transport (`MmioTransport::restore`), plus COM1 and the i8042.
//!
//! Input: first byte even → the rest is a state file as is. Odd → the rest is a u32 (LE)
//! header length, the header JSON and the body JSON, and the target seals them into a state
//! file (prefix, lengths, CRC) so mutations reach the JSON and the restore checks instead of
//! failing the checksum.
#![no_main]

mod common;

use ledge::devices::legacy::{SerialDevice, I8042};
use ledge::devices::state::DeviceSnapshot;
use ledge::devices::virtio::balloon::Balloon;
use ledge::devices::virtio::block::Block;
use ledge::devices::virtio::mmio::{MmioTransport, SharedDevice};
use ledge::devices::virtio::net::Net;
use ledge::devices::virtio::rng::Rng;
use ledge::devices::virtio::vsock::Vsock;
use ledge::devices::virtio::Interrupt;
use ledge::exit::ExitSignal;
use ledge::kvm::memory::GuestMemoryMmap;
use ledge::snapshot;
use libfuzzer_sys::fuzz_target;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct Fixture {
    mem: GuestMemoryMmap,
    mem_file: PathBuf,
    disk: PathBuf,
    uds: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = common::scratch_dir();
        let mem_file = dir.join("vm.mem");
        std::fs::write(&mem_file, vec![0u8; 4096]).expect("memory file");
        let disk = dir.join("snap-disk.img");
        std::fs::write(&disk, vec![0u8; 4096]).expect("disk image");
        Fixture {
            // 16 MiB, as the committed snapshot's guest (mapped lazily, never written).
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("memory"),
            mem_file,
            disk,
            uds: dir.join("snap-v.sock"),
        }
    })
}

fn seal(rest: &[u8]) -> Vec<u8> {
    let (hlen, json) = match rest {
        [a, b, c, d, json @ ..] => (u32::from_le_bytes([*a, *b, *c, *d]) as usize, json),
        _ => (0, rest),
    };
    let (header, body) = json.split_at(hlen.min(json.len()));
    snapshot::frame(header, body)
}

/// A fresh device of the saved kind, as the restore path would build from the configuration.
fn device_for(state: &DeviceSnapshot, f: &Fixture, cfg: &ledge::VmConfig) -> Option<SharedDevice> {
    Some(match state {
        DeviceSnapshot::Rng {} => Arc::new(Mutex::new(Rng::new().ok()?)),
        DeviceSnapshot::Block { read_only, .. } => {
            let c = ledge::config::DiskConfig {
                path: f.disk.clone(),
                read_only: *read_only,
                id: None,
                root: false,
                rate_limiter: None,
            };
            Arc::new(Mutex::new(Block::new(&c, 0).ok()?))
        }
        DeviceSnapshot::Net { mac } => {
            let (dev, _peer) = UnixDatagram::pair().ok()?;
            Arc::new(Mutex::new(
                Net::with_backend(File::from(OwnedFd::from(dev)), *mac).ok()?,
            ))
        }
        DeviceSnapshot::Vsock { cid, .. } => {
            let c = ledge::config::VsockConfig {
                cid: u32::try_from(*cid).ok()?,
                uds: f.uds.clone(),
            };
            Arc::new(Mutex::new(Vsock::new(&c).ok()?))
        }
        DeviceSnapshot::Balloon { .. } => {
            let c = cfg.balloon.clone().unwrap_or(ledge::config::BalloonConfig {
                mib: 0,
                deflate_on_oom: false,
                stats_interval_s: 1,
            });
            Arc::new(Mutex::new(Balloon::new(&c).ok()?))
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        seal(rest)
    };
    let Ok(state) = snapshot::decode(Path::new("fuzz.snap"), &bytes) else {
        return;
    };
    let f = fixture();
    let body = &state.body;
    let _ = body.config.validate();
    let _ = snapshot::open_memory(&f.mem_file, &state.header);
    if let Some(v) = body.vcpus.first() {
        let _ = ledge::arch::state::check_cpu(&v.cpuid, &state.header.host_cpu.vendor, &v.cpuid);
    }
    let evt = || EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut serial = SerialDevice::new(evt(), Box::new(std::io::sink()));
    let _ = serial.restore(&body.serial);
    let exit = Arc::new(ExitSignal::new().expect("exit signal"));
    let mut i8042 = I8042::new(exit, evt());
    let _ = i8042.restore(&body.i8042);
    for (_name, ts) in body.devices.iter().take(8) {
        let Some(dev) = device_for(&ts.device, f, &body.config) else {
            continue;
        };
        let n = dev.lock().unwrap().queue_max_sizes().len();
        let irq = Arc::new(Interrupt::new(evt()));
        let evts = (0..n).map(|_| Arc::new(evt())).collect();
        let mut t = MmioTransport::new(dev, f.mem.clone(), irq, evts);
        let _ = t.restore(ts);
        let _ = t.save();
    }
});
