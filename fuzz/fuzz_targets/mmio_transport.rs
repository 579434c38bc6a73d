//! The virtio-mmio register interface as a hostile guest drives it: any sequence of reads and
//! writes of any width at any offset of the 4 KiB window (magic, features and their selectors,
//! queue selection, sizes, ring addresses, ready, notify, interrupt ack, status, config space),
//! with a virtio-rng device behind it. A queue the guest makes ready and activates is then
//! served from whatever the input put in guest memory, and the transport's state is saved and
//! restored into a fresh transport, as a snapshot would.
#![no_main]

mod common;

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use ledge::devices::virtio::mmio::{MmioTransport, SharedDevice};
use ledge::devices::virtio::rng::Rng;
use ledge::devices::virtio::Interrupt;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u16,
        width: u8,
    },
    Write {
        offset: u16,
        width: u8,
        value: u32,
    },
    /// A register by name, with a value (reaches the interesting offsets more often).
    Reg {
        which: u8,
        value: u32,
    },
    /// The device serves its queue, as the VMM thread does on a notification.
    Serve,
}

/// Offsets of the virtio-mmio registers (virtio 1.x, §4.2.2).
const REGS: [u16; 22] = [
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4,
];

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
    data: Vec<u8>,
}

fn transport(dev: &Arc<Mutex<Rng>>, mem: &ledge::kvm::memory::GuestMemoryMmap) -> MmioTransport {
    let shared: SharedDevice = dev.clone();
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let evts = vec![Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"))];
    MmioTransport::new(shared, mem.clone(), irq, evts)
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8, 3][usize::from(w % 5)]
}

fuzz_target!(|input: Input| {
    let mem = common::memory(&input.data);
    let dev = Arc::new(Mutex::new(Rng::new().expect("rng")));
    let mut t = transport(&dev, &mem);
    for op in input.ops.iter().take(256) {
        match *op {
            Op::Read { offset, width: w } => {
                let mut buf = [0u8; 8];
                t.read(u64::from(offset), &mut buf[..width(w)]);
            }
            Op::Write {
                offset,
                width: w,
                value,
            } => {
                let bytes = u64::from(value).to_le_bytes();
                t.write(u64::from(offset), &bytes[..width(w)]);
            }
            Op::Reg { which, value } => {
                let off = REGS[usize::from(which) % REGS.len()];
                t.write(u64::from(off), &value.to_le_bytes());
            }
            Op::Serve => {
                if t.is_activated() {
                    dev.lock().unwrap().process_queue();
                }
            }
        }
    }
    let saved = t.save();
    let dev2 = Arc::new(Mutex::new(Rng::new().expect("rng")));
    let mut t2 = transport(&dev2, &mem);
    if t2.restore(&saved).is_ok() && t2.is_activated() {
        dev2.lock().unwrap().process_queue();
    }
});
