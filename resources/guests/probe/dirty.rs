//! `probe=dirty`: a buffer of guest RAM the host can ask the probe to rewrite (`d`) or check
//! (`v`) over COM1, so a test can dirty a known amount of memory between two snapshots and
//! check after a restore that every page holds what the guest last wrote.
//!
//! Pattern of round r: 64-bit word i (0..512) of 4 KiB page p of the buffer is
//! `mix((r << 32) | p) ^ (i * 0x9e3779b97f4a7c15)` (wrapping), where `mix` is the splitmix64
//! finaliser (`z = x + 0x9e3779b97f4a7c15; z = (z ^ z >> 30) * 0xbf58476d1ce4e5b9;
//! z = (z ^ z >> 27) * 0x94d049bb133111eb; z ^ z >> 31`). Every page differs from every other
//! page and from itself in every other round.

use crate::uart::{put_dec, put_hex, puts};
use crate::virtio::Arena;
use crate::{rdtsc, stop};

const PAGE: u64 = 4096;
const WORDS_PER_PAGE: usize = 512;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The buffer and the round whose pattern it holds.
pub struct Dirty {
    base: u64,
    pages: u64,
    round: u64,
}

impl Dirty {
    /// Takes `mib` MiB from `arena`, writes round 1 and prints `dirty: round=1 pages=<n>`.
    /// If the buffer does not fit, prints a `probe:` line and stops the VM.
    pub fn start(arena: &mut Arena, mib: u64) -> Dirty {
        let size = mib.checked_mul(1 << 20).filter(|&s| s > 0);
        let Some(base) = size.and_then(|s| arena.take(s, PAGE)) else {
            let (start, end) = arena.free();
            puts("probe: dirty: probe.dirty-mib=");
            put_dec(mib);
            puts(" does not fit in the free RAM ");
            put_hex(start);
            puts("-");
            put_hex(end);
            puts(" (");
            put_dec((end - start) >> 20);
            puts(" MiB)\n");
            stop()
        };
        let mut d = Dirty { base, pages: mib << 8, round: 1 };
        puts("probe: dirty buffer=");
        put_hex(base);
        puts("-");
        put_hex(base + (d.pages << 12));
        puts("\n");
        let t0 = rdtsc();
        d.write(1);
        cycles_line("write", rdtsc().wrapping_sub(t0));
        puts("dirty: round=1 pages=");
        put_dec(d.pages);
        puts("\n");
        d.round = 1;
        d
    }

    fn words(&self) -> &'static mut [u64] {
        // SAFETY: base..base + pages * 4 KiB was taken from the Arena (probe-owned RAM in
        // the identity map, 4 KiB-aligned) for this buffer alone. black_box keeps the
        // compiler from assuming anything about what the memory holds across calls.
        unsafe {
            let p = core::hint::black_box(self.base as *mut u64);
            core::slice::from_raw_parts_mut(p, self.pages as usize * WORDS_PER_PAGE)
        }
    }

    fn write(&mut self, round: u64) {
        for (p, page) in self.words().chunks_exact_mut(WORDS_PER_PAGE).enumerate() {
            let h = mix(round << 32 | p as u64);
            let mut k = 0u64;
            for w in page.iter_mut() {
                *w = h ^ k;
                k = k.wrapping_add(GOLDEN);
            }
        }
        self.round = round;
    }

    /// The first page not holding `round`'s pattern.
    fn verify(&self, round: u64) -> Option<u64> {
        for (p, page) in self.words().chunks_exact(WORDS_PER_PAGE).enumerate() {
            let h = mix(round << 32 | p as u64);
            let mut k = 0u64;
            let mut diff = 0u64;
            for &w in page.iter() {
                diff |= w ^ h ^ k;
                k = k.wrapping_add(GOLDEN);
            }
            if diff != 0 {
                return Some(p as u64);
            }
        }
        None
    }

    /// A command byte from COM1: `d` checks the round and writes the next one, `v` checks
    /// only, `c` corrupts one page (to see a check fail); anything else is ignored.
    pub fn command(&mut self, byte: u8) {
        match byte {
            b'd' => {
                let t0 = rdtsc();
                let bad = self.verify(self.round);
                let t1 = rdtsc();
                self.write(self.round + 1);
                cycles_line("verify", t1.wrapping_sub(t0));
                cycles_line("write", rdtsc().wrapping_sub(t1));
                puts("dirty: round=");
                put_dec(self.round);
                puts(" pages=");
                put_dec(self.pages);
                bad_or_ok(bad);
            }
            b'v' => {
                let t0 = rdtsc();
                let bad = self.verify(self.round);
                cycles_line("verify", rdtsc().wrapping_sub(t0));
                puts("dirty: verify round=");
                put_dec(self.round);
                bad_or_ok(bad);
            }
            b'c' => {
                // A known corruption, so a test can see a failed check: bit 0 of word 37
                // of one page of the current round.
                let page = (self.round * 7919 + 13) % self.pages;
                self.words()[page as usize * WORDS_PER_PAGE + 37] ^= 1;
                puts("dirty: corrupted round=");
                put_dec(self.round);
                puts(" page=");
                put_dec(page);
                puts("\n");
            }
            _ => {}
        }
    }
}

fn bad_or_ok(bad: Option<u64>) {
    match bad {
        None => puts(" ok\n"),
        Some(p) => {
            puts(" BAD page=");
            put_dec(p);
            puts("\n");
        }
    }
}

fn cycles_line(what: &str, cycles: u64) {
    puts("probe: dirty ");
    puts(what);
    puts(" cycles=");
    put_dec(cycles);
    puts("\n");
}
