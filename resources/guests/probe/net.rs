//! `probe=net-echo`: a polling virtio-net driver that sends every received Ethernet frame
//! straight back (virtio 1.2 §5.1: receiveq 0, transmitq 1, a 12-byte `virtio_net_hdr` in
//! front of each frame with VERSION_1).
//!
//! Zero copy: a pool of 2 KiB buffers (one per RX descriptor, at most the smaller queue's
//! size) circulates RX → TX → RX: a received buffer is queued for transmit as it is, its
//! header zeroed (no checksum or GSO offload is negotiated, so flags, gso_type and the rest
//! are 0 on TX), and goes back on the RX queue once the device has sent it. Frames therefore
//! leave in the order they arrived. Stops after `net_frames=` echoes (default 10000) or at a
//! frame with EtherType 0x88b5 whose payload starts with "STOP" (not echoed), once every
//! echo has been sent.

use crate::uart::{put_bytes, put_dec, puts};
use crate::virtio::{bytes_mut, Arena, Buf, Device, Virtq, F_VERSION_1, MAX_QUEUE, WAIT_CYCLES};
use crate::{rdtsc, stop};

const F_MAC: u64 = 1 << 5;
pub const WANTED_FEATURES: u64 = F_VERSION_1 | F_MAC;

const HDR_LEN: usize = 12;
const BUF_LEN: u32 = 2048;
const QUEUE_WANT: u16 = 256;
const ETHERTYPE_PROBE: [u8; 2] = [0x88, 0xb5];
const NONE: u16 = u16::MAX;

fn fail(what: &str) -> ! {
    puts("net: error=");
    puts(what);
    puts("\n");
    stop()
}

fn is_stop(frame: &[u8]) -> bool {
    frame.len() >= 18 && frame[12..14] == ETHERTYPE_PROBE && &frame[14..18] == b"STOP"
}

fn put_mac(mac: &[u8; 6]) {
    let mut s = [0u8; 17];
    for (i, b) in mac.iter().enumerate() {
        s[3 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
        s[3 * i + 1] = b"0123456789abcdef"[usize::from(b & 0xf)];
        if i < 5 {
            s[3 * i + 2] = b':';
        }
    }
    put_bytes(&s);
}

/// A live virtio-net device echoing frames: the buffer pool, which buffer each in-flight
/// chain carries, and the totals.
pub struct Echo {
    d: Device,
    rx: Virtq,
    tx: Virtq,
    bufs: u64,
    rx_buf: [u16; MAX_QUEUE as usize],
    tx_buf: [u16; MAX_QUEUE as usize],
    pub echoed: u64,
    pub bytes: u64,
    /// TSC when the first frame came in (0: none yet).
    pub t0: u64,
}

impl Echo {
    /// Brings up the virtio-net device at `base`, posts every receive buffer and prints the
    /// `net: dev=0 ... ready` line; on failure prints `net: error=` and stops the VM.
    pub fn open(base: u64, arena: &mut Arena) -> Echo {
        let d = Device::init(base, WANTED_FEATURES).unwrap_or_else(|e| fail(e.name()));
        let mut mac = [0u8; 6];
        if d.has(F_MAC) {
            d.mmio.config(0, &mut mac);
        }
        let rx = d.queue(0, QUEUE_WANT, arena).unwrap_or_else(|e| fail(e.name()));
        let tx = d.queue(1, QUEUE_WANT, arena).unwrap_or_else(|e| fail(e.name()));
        d.driver_ok().unwrap_or_else(|e| fail(e.name()));
        let pool = rx.size.min(tx.size);
        let pool_bytes = u64::from(pool) * u64::from(BUF_LEN);
        let bufs = arena.alloc(pool_bytes, 4096).unwrap_or_else(|| fail("no-memory"));
        let mut e = Echo {
            d,
            rx,
            tx,
            bufs,
            rx_buf: [NONE; MAX_QUEUE as usize],
            tx_buf: [NONE; MAX_QUEUE as usize],
            echoed: 0,
            bytes: 0,
            t0: 0,
        };
        for b in 0..pool {
            e.post(b);
        }
        e.rx.kick();

        puts("net: dev=0 mac=");
        put_mac(&mac);
        puts(" features=");
        crate::uart::put_hex(e.d.features);
        puts(" rx_queue=");
        put_dec(u64::from(e.rx.size));
        puts(" tx_queue=");
        put_dec(u64::from(e.tx.size));
        puts(" buffers=");
        put_dec(u64::from(pool));
        puts(" ready\n");
        e
    }

    fn buf_addr(&self, b: u16) -> u64 {
        self.bufs + u64::from(b) * u64::from(BUF_LEN)
    }

    /// Gives pool buffer `b` to the device for receiving (without notifying).
    fn post(&mut self, b: u16) {
        let buf = Buf::wo(self.buf_addr(b), BUF_LEN);
        let h = self.rx.add(&[buf]).unwrap_or_else(|| fail("rx-queue-full"));
        self.rx_buf[usize::from(h)] = b;
    }

    /// One pass: sent buffers go back to receiving, then received frames (at most `budget`
    /// of them) go out again. Returns true once a STOP frame came in (it is not echoed).
    pub fn poll(&mut self, budget: u64) -> bool {
        // Sent buffers go back to the device for receiving.
        let mut reposted = false;
        while let Some((head, _)) = self.tx.pop_used() {
            let b = core::mem::replace(&mut self.tx_buf[usize::from(head)], NONE);
            if b == NONE {
                fail("tx-unknown-head");
            }
            self.post(b);
            reposted = true;
        }

        // Received frames go straight out again.
        let mut sent = false;
        let mut stop = false;
        let mut left = budget;
        while left > 0 {
            let Some((head, len)) = self.rx.pop_used() else { break };
            let b = core::mem::replace(&mut self.rx_buf[usize::from(head)], NONE);
            if b == NONE {
                fail("rx-unknown-head");
            }
            if self.t0 == 0 {
                self.t0 = rdtsc();
            }
            let len = (len as usize).min(BUF_LEN as usize);
            let buf = bytes_mut(self.buf_addr(b), len);
            if len <= HDR_LEN || is_stop(&buf[HDR_LEN..]) {
                stop |= len > HDR_LEN;
                self.post(b);
                reposted = true;
                if stop {
                    break;
                }
                continue;
            }
            buf[..HDR_LEN].fill(0);
            let out = Buf::ro(self.buf_addr(b), len as u32);
            let h = self.tx.add(&[out]).unwrap_or_else(|| fail("tx-queue-full"));
            self.tx_buf[usize::from(h)] = b;
            sent = true;
            self.echoed += 1;
            self.bytes += (len - HDR_LEN) as u64;
            left -= 1;
        }
        if sent {
            self.tx.kick();
        }
        if reposted {
            self.rx.kick();
        }
        stop
    }

    /// Waits (bounded) until every echo has been sent, then resets the device.
    pub fn finish(&mut self) {
        let start = rdtsc();
        while self.tx.in_flight() > 0 && rdtsc().wrapping_sub(start) < WAIT_CYCLES {
            let _ = self.tx.pop_used();
        }
        self.d.mmio.reset();
    }
}

/// Echoes frames on the virtio-net device at `base` until told to stop; never returns.
pub fn run(base: u64, mut arena: Arena, max_frames: u64) -> ! {
    let mut e = Echo::open(base, &mut arena);
    let mut stopping = false;
    while !stopping && e.echoed < max_frames {
        stopping = e.poll(max_frames - e.echoed);
        core::hint::spin_loop();
    }
    // Buffers of echoes sent go back to receiving, then every echo leaves before the VM
    // stops.
    e.poll(0);
    e.finish();
    let cycles = if e.t0 == 0 { 0 } else { rdtsc().wrapping_sub(e.t0) };
    puts("net: echoed=");
    put_dec(e.echoed);
    puts(" cycles=");
    put_dec(cycles);
    puts(" bytes=");
    put_dec(e.bytes);
    puts(if stopping { " end=stop\n" } else { " end=count\n" });
    stop()
}
