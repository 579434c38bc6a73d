//! virtio-net: the receive and transmit queues driven with fuzz-chosen chains, vnet headers
//! and frames, on a datagram socket pair standing in for the TAP (one frame per message, vnet
//! header in front): the target plays both the guest driver and the host network.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use ledge::devices::virtio::net::{Net, QUEUE_SIZE};
use ledge::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;

#[derive(Arbitrary, Debug)]
enum Op {
    Tx,
    Rx,
    /// The host network sends a frame (vnet header included) towards the guest.
    HostSend(Vec<u8>),
    /// The host reads what the guest sent.
    HostRecv,
    ReadConfig(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    acked_features: u64,
    queues: Vec<common::QueueInput>,
    ops: Vec<Op>,
    data: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let (dev, peer) = UnixDatagram::pair().expect("socketpair");
    dev.set_nonblocking(true).expect("nonblocking");
    peer.set_nonblocking(true).expect("nonblocking");
    let mut net =
        Net::with_backend(File::from(OwnedFd::from(dev)), [6, 0, 0, 0, 0, 1]).expect("net");
    let mem = common::memory(&input.data);
    let queues = common::build_queues(&mem, &input.queues, 2, QUEUE_SIZE);
    net.set_acked_features(input.acked_features & net.avail_features());
    let (act, _irq) = common::active(&mem, queues);
    if net.activate(act).is_err() {
        return;
    }
    let mut buf = vec![0u8; 70 * 1024];
    for op in input.ops.iter().take(32) {
        match op {
            Op::Tx => {
                net.process_tx();
            }
            Op::Rx => {
                net.process_rx();
            }
            Op::HostSend(frame) => {
                let _ = peer.send(frame);
            }
            Op::HostRecv => {
                let _ = peer.recv(&mut buf);
            }
            Op::ReadConfig(off) => {
                let mut d = [0u8; 8];
                net.read_config(u64::from(*off), &mut d);
            }
        }
    }
    let _ = net.stats();
    let _ = net.queue_states();
    let _ = net.save_state();
    net.reset();
});
