//! virtio-rng: the request queue driven with fuzz-chosen chains (hostile ones included).
#![no_main]

mod common;

use arbitrary::Arbitrary;
use ledge::devices::virtio::rng::{Rng, QUEUE_SIZE};
use ledge::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    queue: common::QueueInput,
    /// Times the queue is served (more chains may be offered by a hostile avail index).
    rounds: u8,
    data: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let mem = common::memory(&input.data);
    let q = common::build_queue(&mem, 0, &input.queue, QUEUE_SIZE);
    let mut rng = Rng::new().expect("rng");
    let (act, _irq) = common::active(&mem, vec![q]);
    rng.activate(act).expect("activate");
    for _ in 0..=(input.rounds % 4) {
        rng.process_queue();
    }
    let _ = rng.queue_states();
    let _ = rng.metrics();
    rng.reset();
});
