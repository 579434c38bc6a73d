//! virtio-balloon: the inflate, deflate and statistics queues driven with fuzz-chosen chains
//! and PFN lists / statistics entries, plus config writes (`actual`) and target changes.
#![no_main]

mod common;

use arbitrary::Arbitrary;
use ledge::config::BalloonConfig;
use ledge::devices::virtio::balloon::{Balloon, QUEUE_SIZE};
use ledge::devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Inflate,
    Deflate,
    Stats,
    RequestStats,
    SetTarget(u32),
    SetStatsInterval(u32),
    WriteConfig(u8, Vec<u8>),
    ReadConfig(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    mib: u32,
    deflate_on_oom: bool,
    stats: bool,
    acked_features: u64,
    queues: Vec<common::QueueInput>,
    ops: Vec<Op>,
    data: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let cfg = BalloonConfig {
        mib: input.mib,
        deflate_on_oom: input.deflate_on_oom,
        stats_interval_s: u32::from(input.stats),
    };
    let mut b = Balloon::new(&cfg).expect("balloon");
    let mem = common::memory(&input.data);
    let n = b.queue_max_sizes().len();
    let queues = common::build_queues(&mem, &input.queues, n, QUEUE_SIZE);
    b.set_acked_features(input.acked_features & b.avail_features());
    let (act, _irq) = common::active(&mem, queues);
    if b.activate(act).is_err() {
        return;
    }
    for op in input.ops.iter().take(32) {
        match op {
            Op::Inflate => {
                b.process_inflate();
            }
            Op::Deflate => {
                b.process_deflate();
            }
            Op::Stats => {
                b.process_stats();
            }
            Op::RequestStats => {
                b.request_stats();
            }
            Op::SetTarget(m) => b.set_target_mib(*m),
            Op::SetStatsInterval(s) => b.set_stats_interval(*s),
            Op::WriteConfig(off, bytes) => b.write_config(u64::from(*off), bytes),
            Op::ReadConfig(off) => {
                let mut d = [0u8; 4];
                b.read_config(u64::from(*off), &mut d);
            }
        }
    }
    let _ = b.counters();
    let _ = b.latest_stats();
    let _ = b.queue_states();
    let _ = b.save_state();
    b.reset();
});
