//! Port I/O, the polled COM1 console and the few number formats the report needs.
//!
//! Port I/O goes through DPL-3 gates into ring 0 (boot.s): kvm-pvm forces IOPL to 0 for
//! guest ring 3, so a ring-3 `in`/`out` would #GP there. Console output is sent in
//! batches through one gate that polls LSR.THRE before each byte, to keep the number of
//! ring switches low. No `core::fmt`: it would triple the image for three number formats.

use core::arch::asm;

const COM1: u16 = 0x3f8;
/// Bytes buffered before one trip through the serial gate.
const OUT_BUF: usize = 128;

pub fn outb(port: u16, value: u8) {
    // SAFETY: int 0x83 is the outb gate of boot.s; it only touches rax/rdx as declared.
    unsafe { asm!("int 0x83", in("dx") port, in("al") value, options(nomem, nostack)) };
}

#[allow(dead_code)] // for scenarios that read ports
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: int 0x84 is the inb gate of boot.s.
    unsafe { asm!("int 0x84", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

fn serial_write(bytes: &[u8]) {
    // SAFETY: int 0x82 reads rcx bytes at rsi (ring 0 may read user pages: no SMAP) and
    // clobbers exactly the registers listed.
    unsafe {
        asm!("int 0x82", inout("rsi") bytes.as_ptr() => _, inout("rcx") bytes.len() => _,
             out("rax") _, out("rdx") _, out("r8") _, options(readonly, nostack));
    }
}

/// 115200 8N1, interrupts off; FIFOs left as they are.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // LCR: DLAB on
    outb(COM1, 0x01); // DLL: divisor 1
    outb(COM1 + 1, 0x00); // DLM
    outb(COM1 + 3, 0x03); // LCR: 8N1, DLAB off
}

/// A byte COM1 received, if one is waiting (LSR.DR); never blocks.
pub fn getc() -> Option<u8> {
    let lsr = inb(COM1 + 5);
    // No UART (the port floats to all-ones) or nothing received.
    if lsr == 0xff || lsr & 1 == 0 {
        return None;
    }
    Some(inb(COM1))
}

pub fn put_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(OUT_BUF) {
        serial_write(chunk);
    }
}

pub fn puts(s: &str) {
    put_bytes(s.as_bytes());
}

pub fn put_dec(mut value: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    put_bytes(&buf[i..]);
}

/// Lower-case hex with a `0x` prefix and no padding.
pub fn put_hex(value: u64) {
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    let mut v = value;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    puts("0x");
    put_bytes(&buf[i..]);
}
