//! `probe=rng`: a polling virtio-rng driver (virtio 1.2 §5.4: one requestq of
//! device-writable buffers the device fills with entropy) that reads 64 KiB and reports
//! how much came back and how many runs of 8 or more zero bytes it holds (random data has
//! none; an all-zero answer is one run).

use crate::uart::{put_dec, puts};
use crate::virtio::{bytes_mut, Arena, Buf, Device, F_VERSION_1};
use crate::{rdtsc, stop};

const TOTAL: u64 = 64 * 1024;
const REQ: u64 = 4096;
const ZERO_RUN: usize = 8;

fn fail(what: &str) -> ! {
    puts("rng: error=");
    puts(what);
    puts("\n");
    stop()
}

/// Runs of at least ZERO_RUN zero bytes in `data`.
fn zero_runs(data: &[u8]) -> u64 {
    let (mut runs, mut len) = (0, 0usize);
    for &b in data {
        if b == 0 {
            len += 1;
            if len == ZERO_RUN {
                runs += 1;
            }
        } else {
            len = 0;
        }
    }
    runs
}

/// Reads TOTAL bytes from the virtio-rng at `base`, reports, and stops the VM.
pub fn run(base: u64, mut arena: Arena) -> ! {
    let d = Device::init(base, F_VERSION_1).unwrap_or_else(|e| fail(e.name()));
    let mut q = d.queue(0, 16, &mut arena).unwrap_or_else(|e| fail(e.name()));
    d.driver_ok().unwrap_or_else(|e| fail(e.name()));
    let data = arena.alloc(TOTAL, 4096).unwrap_or_else(|| fail("no-memory"));

    let t0 = rdtsc();
    let (mut got, mut requests, mut empty) = (0u64, 0u64, 0u64);
    while got < TOTAL {
        let len = (TOTAL - got).min(REQ);
        q.add(&[Buf::wo(data + got, len as u32)]).unwrap_or_else(|| fail("queue-full"));
        q.kick();
        let Some((_, n)) = q.wait_used() else { fail("timeout") };
        requests += 1;
        got += u64::from(n).min(len);
        if n == 0 {
            empty += 1;
            if empty > 100 {
                fail("no-data");
            }
        }
    }
    let cycles = rdtsc().wrapping_sub(t0);
    d.mmio.reset();
    puts("rng: bytes=");
    put_dec(got);
    puts(" zero_runs=");
    put_dec(zero_runs(bytes_mut(data, got as usize)));
    puts(" requests=");
    put_dec(requests);
    puts(" cycles=");
    put_dec(cycles);
    puts("\n");
    stop()
}
