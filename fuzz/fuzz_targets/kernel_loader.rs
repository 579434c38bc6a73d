//! The kernel and initrd loaders (`boot::load_from`): format detection, vmlinux / PVH ELF and
//! bzImage inspection and loading, initrd placement, command line, zero page / start info,
//! boot tables and MP table, on arbitrary images into a small guest memory.
//!
//! Input: [flags][vcpus][cmdline length][cmdline][initrd length u16 LE][initrd][kernel...].
//! flags bits 0-1: protocol (auto, linux, pvh, auto); bit 2: with an initrd; bits 3-4: guest
//! memory 2, 8, 16 or 64 MiB.
#![no_main]

use ledge::arch::x86_64::layout;
use ledge::boot::{load_from, BootProtocol, ReadSeek};
use ledge::kvm::memory::GuestMemoryMmap;
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (head, rest) = data.split_at(n);
    *data = rest;
    head
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let head = take(&mut data, 3);
    let [flags, vcpus, cmdline_len] = *head else {
        return;
    };
    let protocol = match flags & 3 {
        1 => BootProtocol::Linux,
        2 => BootProtocol::Pvh,
        _ => BootProtocol::Auto,
    };
    let cmdline = String::from_utf8_lossy(take(&mut data, usize::from(cmdline_len))).into_owned();
    let initrd = if flags & 4 != 0 {
        let l = take(&mut data, 2);
        let len = match l {
            [a, b] => usize::from(u16::from_le_bytes([*a, *b])),
            _ => 0,
        };
        Some(take(&mut data, len))
    } else {
        None
    };
    let kernel = data;
    let mib: u64 = [2, 8, 16, 64][usize::from((flags >> 3) & 3)];
    let Ok(regions) = layout::ram_regions(mib << 20) else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&regions).expect("guest memory");
    let mut k = Cursor::new(kernel);
    let mut i = initrd.map(Cursor::new);
    let _ = load_from(
        &mem,
        &mut k,
        i.as_mut().map(|c| c as &mut dyn ReadSeek),
        &cmdline,
        protocol,
        vcpus,
    );
});
