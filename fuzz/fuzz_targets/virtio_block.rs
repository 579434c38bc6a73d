//! virtio-blk: request parsing and I/O driven through the queue with fuzz-chosen chains and
//! request headers, on a small image file (on /dev/shm when present, rewritten each run).
#![no_main]

mod common;

use arbitrary::Arbitrary;
use ledge::config::DiskConfig;
use ledge::devices::virtio::block::{Block, QUEUE_SIZE, SECTOR_SIZE};
use ledge::devices::virtio::VirtioDevice;
use ledge::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Image size in sectors (small, so out-of-range sectors are easy to reach).
const SECTORS: u64 = 16;

#[derive(Arbitrary, Debug)]
struct Input {
    queue: common::QueueInput,
    read_only: bool,
    /// Drive id (GET_ID); may be too long, which `Block::new` must refuse.
    id: Option<String>,
    acked_features: u64,
    /// A rate limiter (bandwidth bytes per refill, ops per refill, refill ms): small buckets
    /// throttle mid-queue, so chains go back to the available ring.
    limiter: Option<(u32, u16, u16)>,
    rounds: u8,
    data: Vec<u8>,
}

fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| common::scratch_dir().join("disk.img"))
}

fuzz_target!(|input: Input| {
    let path = image();
    let content: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
        .map(|i| (i / 512) as u8)
        .collect();
    std::fs::write(path, &content).expect("image");
    let cfg = DiskConfig {
        path: path.clone(),
        read_only: input.read_only,
        id: input.id.clone(),
        root: false,
        rate_limiter: input.limiter.map(|(bytes, ops, ms)| RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig::new(u64::from(bytes), u64::from(ms))),
            ops: Some(TokenBucketConfig::new(u64::from(ops), u64::from(ms))),
        }),
    };
    let Ok(mut blk) = Block::new(&cfg, 0) else {
        return;
    };
    let mem = common::memory(&input.data);
    let q = common::build_queue(&mem, 0, &input.queue, QUEUE_SIZE);
    blk.set_acked_features(input.acked_features & blk.avail_features());
    let (act, _irq) = common::active(&mem, vec![q]);
    blk.activate(act).expect("activate");
    for _ in 0..=(input.rounds % 4) {
        blk.process_queue();
    }
    let mut cfg_bytes = [0u8; 8];
    blk.read_config(u64::from(input.rounds), &mut cfg_bytes);
    let _ = blk.queue_states();
    let _ = blk.save_state();
    let _ = blk.metrics();
    blk.reset();
});
