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
use crate::virtio::{bytes_mut, Arena, Buf, Device, F_VERSION_1, MAX_QUEUE, WAIT_CYCLES};
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

/// Echoes frames on the virtio-net device at `base` until told to stop; never returns.
pub fn run(base: u64, mut arena: Arena, max_frames: u64) -> ! {
    let d = Device::init(base, WANTED_FEATURES).unwrap_or_else(|e| fail(e.name()));
    let mut mac = [0u8; 6];
    if d.has(F_MAC) {
        d.mmio.config(0, &mut mac);
    }
    let mut rx = d.queue(0, QUEUE_WANT, &mut arena).unwrap_or_else(|e| fail(e.name()));
    let mut tx = d.queue(1, QUEUE_WANT, &mut arena).unwrap_or_else(|e| fail(e.name()));
    d.driver_ok().unwrap_or_else(|e| fail(e.name()));

    let pool = rx.size.min(tx.size);
    let bufs = arena.alloc(u64::from(pool) * u64::from(BUF_LEN), 4096).unwrap_or_else(|| fail("no-memory"));
    let buf_addr = |b: u16| bufs + u64::from(b) * u64::from(BUF_LEN);
    // Which pool buffer each in-flight chain (by head descriptor) carries.
    let mut rx_buf = [NONE; MAX_QUEUE as usize];
    let mut tx_buf = [NONE; MAX_QUEUE as usize];
    for b in 0..pool {
        let head = rx.add(&[Buf::wo(buf_addr(b), BUF_LEN)]).unwrap_or_else(|| fail("rx-queue-full"));
        rx_buf[usize::from(head)] = b;
    }
    rx.kick();

    puts("net: dev=0 mac=");
    put_mac(&mac);
    puts(" features=");
    crate::uart::put_hex(d.features);
    puts(" rx_queue=");
    put_dec(u64::from(rx.size));
    puts(" tx_queue=");
    put_dec(u64::from(tx.size));
    puts(" buffers=");
    put_dec(u64::from(pool));
    puts(" ready\n");

    let mut echoed = 0u64;
    let mut bytes = 0u64;
    let mut t0 = 0u64;
    let mut stopping = false;
    loop {
        // Sent buffers go back to the device for receiving.
        let mut reposted = false;
        while let Some((head, _)) = tx.pop_used() {
            let b = core::mem::replace(&mut tx_buf[usize::from(head)], NONE);
            if b == NONE {
                fail("tx-unknown-head");
            }
            let h = rx.add(&[Buf::wo(buf_addr(b), BUF_LEN)]).unwrap_or_else(|| fail("rx-queue-full"));
            rx_buf[usize::from(h)] = b;
            reposted = true;
        }
        if reposted {
            rx.kick();
        }
        if stopping || echoed >= max_frames {
            break;
        }

        // Received frames go straight out again.
        let mut sent = false;
        while let Some((head, len)) = rx.pop_used() {
            let b = core::mem::replace(&mut rx_buf[usize::from(head)], NONE);
            if b == NONE {
                fail("rx-unknown-head");
            }
            if t0 == 0 {
                t0 = rdtsc();
            }
            let len = (len as usize).min(BUF_LEN as usize);
            let buf = bytes_mut(buf_addr(b), len);
            if len <= HDR_LEN || is_stop(&buf[HDR_LEN..]) {
                stopping |= len > HDR_LEN;
                let h = rx.add(&[Buf::wo(buf_addr(b), BUF_LEN)]).unwrap_or_else(|| fail("rx-queue-full"));
                rx_buf[usize::from(h)] = b;
                reposted = true;
                if stopping {
                    break;
                }
                continue;
            }
            buf[..HDR_LEN].fill(0);
            let h = tx.add(&[Buf::ro(buf_addr(b), len as u32)]).unwrap_or_else(|| fail("tx-queue-full"));
            tx_buf[usize::from(h)] = b;
            sent = true;
            echoed += 1;
            bytes += (len - HDR_LEN) as u64;
            if echoed >= max_frames {
                break;
            }
        }
        if sent {
            tx.kick();
        }
        if reposted {
            rx.kick();
        }
        core::hint::spin_loop();
    }

    // Let every echo leave before the VM stops.
    let start = rdtsc();
    while tx.in_flight() > 0 && rdtsc().wrapping_sub(start) < WAIT_CYCLES {
        let _ = tx.pop_used();
    }
    let cycles = if t0 == 0 { 0 } else { rdtsc().wrapping_sub(t0) };
    d.mmio.reset();
    puts("net: echoed=");
    put_dec(echoed);
    puts(" cycles=");
    put_dec(cycles);
    puts(" bytes=");
    put_dec(bytes);
    puts(if stopping { " end=stop\n" } else { " end=count\n" });
    stop()
}
