//! virtio-vsock: the TX, RX and event queues driven with fuzz-chosen chains and packet
//! headers, under a real event manager as on the VMM thread; the host side is real Unix
//! sockets: host clients sending fuzz-chosen CONNECT lines and data, and a listener at
//! `<uds>_1024` for the guest's connections.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use event_manager::{EventManager, SubscriberOps};
use ledge::config::VsockConfig;
use ledge::devices::virtio::vsock::{Vsock, QUEUE_SIZE};
use ledge::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Arbitrary, Debug)]
enum Op {
    /// The driver notifies queue `n % 3`.
    Kick(u8),
    /// One pass of the event loop (no waiting).
    Run,
    /// A host client connects to the device's socket and sends these bytes.
    HostConnect(Vec<u8>),
    /// The host service behind port 1024 accepts a connection the guest made.
    HostAccept,
    HostWrite(u8, Vec<u8>),
    HostRead(u8),
    HostClose(u8),
    ReadConfig(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    acked_features: u64,
    queues: Vec<common::QueueInput>,
    ops: Vec<Op>,
    data: Vec<u8>,
}

fn paths() -> &'static (PathBuf, PathBuf) {
    static P: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    P.get_or_init(|| {
        let d = common::scratch_dir();
        (d.join("v.sock"), d.join("v.sock_1024"))
    })
}

fuzz_target!(|input: Input| {
    let (uds, service) = paths();
    let _ = std::fs::remove_file(service);
    let listener = UnixListener::bind(service).expect("service socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let cfg = VsockConfig {
        cid: 3,
        uds: uds.clone(),
    };
    let vsock = Arc::new(Mutex::new(Vsock::new(&cfg).expect("vsock")));
    let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().expect("event manager");
    em.add_subscriber(vsock.clone());
    let mem = common::memory(&input.data);
    let queues = common::build_queues(&mem, &input.queues, 3, QUEUE_SIZE);
    let (act, _irq) = common::active(&mem, queues);
    let evts = act.queue_evts.clone();
    {
        let mut v = vsock.lock().unwrap();
        let avail = v.avail_features();
        v.set_acked_features(input.acked_features & avail);
        v.activate(act).expect("activate");
    }
    let mut streams: Vec<UnixStream> = Vec::new();
    let pick = |streams: &[UnixStream], i: u8| -> Option<usize> {
        (!streams.is_empty()).then(|| usize::from(i) % streams.len())
    };
    let mut buf = [0u8; 4096];
    for op in input.ops.iter().take(32) {
        match op {
            Op::Kick(n) => {
                let _ = evts[usize::from(*n) % 3].write(1);
            }
            Op::Run => {
                let _ = em.run_with_timeout(0);
            }
            Op::HostConnect(bytes) => {
                if let Ok(mut s) = UnixStream::connect(uds) {
                    let _ = s.set_nonblocking(true);
                    let _ = s.write(bytes);
                    streams.push(s);
                }
            }
            Op::HostAccept => {
                if let Ok((s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(true);
                    streams.push(s);
                }
            }
            Op::HostWrite(i, bytes) => {
                if let Some(i) = pick(&streams, *i) {
                    let _ = streams[i].write(bytes);
                }
            }
            Op::HostRead(i) => {
                if let Some(i) = pick(&streams, *i) {
                    let _ = streams[i].read(&mut buf);
                }
            }
            Op::HostClose(i) => {
                if let Some(i) = pick(&streams, *i) {
                    streams.swap_remove(i);
                }
            }
            Op::ReadConfig(off) => {
                let mut d = [0u8; 8];
                vsock.lock().unwrap().read_config(u64::from(*off), &mut d);
            }
        }
    }
    // Let whatever is pending settle (bounded: a busy device re-kicks itself).
    for _ in 0..4 {
        if em.run_with_timeout(0).unwrap_or(0) == 0 {
            break;
        }
    }
    let v = vsock.lock().unwrap();
    let _ = v.stats();
    let _ = v.queue_states();
    let _ = v.save_state();
});
