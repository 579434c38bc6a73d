//! Device tests for virtio-blk on virtio-queue's mock queue: no KVM, plain guest memory,
//! temporary image files under `std::env::temp_dir()`.

use super::*;
use crate::config::RateLimiterConfig;
use crate::devices::virtio::test_utils::{active, memory, queue_from_mock};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

const W: u32 = VRING_DESC_F_WRITE;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x9000;
const DATA: u64 = 0x10000;
/// Everything below this is the mock queue's rings (16 entries).
const RINGS_END: u64 = 0x1000;
const FILL: u8 = 0xaa;
const SECTORS: u64 = 8;

/// A temporary image file, removed on drop.
struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

fn image(bytes: &[u8]) -> Image {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "ledge-blk-test-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&path, bytes).unwrap();
    Image(path)
}

fn cfg(img: &Image, read_only: bool) -> DiskConfig {
    DiskConfig {
        path: img.0.clone(),
        read_only,
        id: None,
        root: false,
        rate_limiter: None,
    }
}

fn checksum(path: &std::path::Path) -> u64 {
    let mut h = DefaultHasher::new();
    std::fs::read(path).unwrap().hash(&mut h);
    h.finish()
}

fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, 0))
}

fn raw(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

/// Guest memory filled with `FILL` past the rings, a request header at `HDR`.
fn guest(req_type: u32, sector: u64) -> GuestMemoryMmap {
    let mem = memory();
    mem.write_slice(
        &vec![FILL; (1 << 20) - RINGS_END as usize],
        GuestAddress(RINGS_END),
    )
    .unwrap();
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; 1 << 20];
    mem.read_slice(&mut v, GuestAddress(0)).unwrap();
    v
}

/// What the guest got back for one chain.
struct Outcome {
    used: Option<u32>,
    status: u8,
    mem: GuestMemoryMmap,
}

/// Serves the chain in `descs` (NEXT links filled in) on a fresh queue in `mem`.
fn serve(blk: &mut Block, mem: GuestMemoryMmap, descs: &[RawDescriptor]) -> Outcome {
    let mock = MockSplitQueue::new(&mem, 16);
    mock.build_desc_chain(descs).unwrap();
    finish(blk, mem.clone(), &mock, descs)
}

/// Activates `blk` on `mock`'s queue and serves its one chain; checks that nothing changed
/// outside the rings and the device-writable buffers among `descs`.
fn finish(
    blk: &mut Block,
    mem: GuestMemoryMmap,
    mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    descs: &[RawDescriptor],
) -> Outcome {
    let before = snapshot(&mem);
    blk.reset();
    let (act, irq) = active(&mem, vec![queue_from_mock(mock, 16)]);
    blk.activate(act).unwrap();
    let n = blk.process_queue();
    assert_eq!(n, 1, "one chain served");
    assert_eq!(irq.status() & 1, 1, "used buffers raise the interrupt");
    let used = Some(mock.used().ring().ref_at(0).unwrap().load().len());
    let after = snapshot(&mem);
    let writable: Vec<(u64, u64)> = descs
        .iter()
        .map(|d| SplitDescriptor::from(*d))
        .filter(|d| d.is_write_only())
        .map(|d| (d.addr().0, d.addr().0.saturating_add(u64::from(d.len()))))
        .collect();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let i = i as u64;
        if b != a && i >= RINGS_END && !writable.iter().any(|&(s, e)| i >= s && i < e) {
            panic!("guest byte {i:#x} outside the chain's writable buffers changed");
        }
    }
    let mut status = [0u8];
    mem.read_slice(&mut status, GuestAddress(STATUS)).unwrap();
    Outcome {
        used,
        status: status[0],
        mem,
    }
}

fn status_desc() -> RawDescriptor {
    desc(STATUS, 1, W)
}

fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn new_disk(read_only: bool) -> (Image, Block) {
    let img = image(&pattern(SECTORS as usize * 512));
    let blk = Block::new(&cfg(&img, read_only), 0).unwrap();
    (img, blk)
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn capacity_id_features_and_config_space() {
    let img = image(&pattern(4 * 512 + 100));
    let blk = Block::new(&cfg(&img, false), 3).unwrap();
    assert_eq!(blk.capacity(), 4, "a partial last sector is not exposed");
    assert_eq!(&blk.disk.id[..6], b"disk3\0");
    assert_eq!(blk.id(), "disk3");
    let f = blk.avail_features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
    ] {
        assert_ne!(f & 1 << bit, 0, "feature {bit}");
    }
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(blk.device_type(), TYPE_BLOCK);

    let mut b8 = [0u8; 8];
    blk.read_config(0, &mut b8);
    assert_eq!(u64::from_le_bytes(b8), 4, "capacity");
    let mut b4 = [0u8; 4];
    blk.read_config(12, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), SEG_MAX, "seg_max");
    blk.read_config(20, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 512, "blk_size");
    blk.read_config(8, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 0, "size_max (not offered)");
    blk.read_config(4096, &mut b4);
    assert_eq!(b4, [0; 4]);

    let ro = Block::new(&cfg(&img, true), 0).unwrap();
    assert_ne!(ro.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
}

#[test]
fn bad_images_and_ids_are_refused_naming_the_path() {
    let empty = image(&[]);
    let e = Block::new(&cfg(&empty, false), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("empty") && e.contains(&empty.0.display().to_string()),
        "{e}"
    );
    let tiny = image(&[1; 100]);
    assert!(matches!(
        Block::new(&cfg(&tiny, false), 0),
        Err(BlockError::Empty { .. })
    ));
    let missing = std::env::temp_dir().join("ledge-blk-test-does-not-exist.img");
    let c = DiskConfig {
        path: missing.clone(),
        read_only: false,
        id: None,
        root: false,
        rate_limiter: None,
    };
    let e = Block::new(&c, 0).err().unwrap().to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    let img = image(&[0; 512]);
    let mut c = cfg(&img, false);
    c.id = Some("x".repeat(21));
    assert!(matches!(Block::new(&c, 0), Err(BlockError::IdTooLong(_))));
}

#[test]
fn write_then_read_round_trip() {
    let (img, mut blk) = new_disk(false);
    // OUT: 1024 bytes at sector 2, from two descriptors.
    let mem = guest(VIRTIO_BLK_T_OUT, 2);
    let data: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let o = serve(
        &mut blk,
        mem,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(DATA + 512, 512, 0),
            status_desc(),
        ],
    );
    assert_eq!((o.used, o.status), (Some(1), OK));
    let file = std::fs::read(&img.0).unwrap();
    let mut want = pattern(SECTORS as usize * 512);
    want[1024..2048].copy_from_slice(&data);
    assert_eq!(file, want, "exactly sectors 2-3 changed");

    // IN: sectors 1..4 (1536 bytes) into two buffers.
    let o = serve(
        &mut blk,
        guest(VIRTIO_BLK_T_IN, 1),
        &[
            desc(HDR, 16, 0),
            desc(DATA, 1024, W),
            desc(DATA + 0x1000, 512, W),
            status_desc(),
        ],
    );
    assert_eq!((o.used, o.status), (Some(1536 + 1), OK));
    assert_eq!(read_guest(&o.mem, DATA, 1024), want[512..1536]);
    assert_eq!(read_guest(&o.mem, DATA + 0x1000, 512), want[1536..2048]);
    let s = blk.stats();
    assert_eq!((s.reads, s.writes, s.errors), (1, 1, 0));
    assert_eq!((s.bytes_read, s.bytes_written), (1536, 1024));
    let m = blk.metrics();
    assert_eq!(m["reads"], 1);
    assert_eq!(m["bytes_written"], 1024);
}

#[test]
fn any_descriptor_framing_is_accepted() {
    let (img, mut blk) = new_disk(false);
    // Header and data in one readable descriptor; status alone.
    let mem = guest(VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0x5a; 512], GuestAddress(HDR + 16))
        .unwrap();
    let o = serve(&mut blk, mem, &[desc(HDR, 16 + 512, 0), status_desc()]);
    assert_eq!((o.used, o.status), (Some(1), OK));
    assert_eq!(std::fs::read(&img.0).unwrap()[..512], [0x5a; 512]);
    // Header split in two; IN data and status in one writable descriptor.
    let mem = guest(VIRTIO_BLK_T_IN, 0);
    let mock = MockSplitQueue::new(&mem, 16);
    let descs = [desc(HDR, 5, 0), desc(HDR + 5, 11, 0), desc(DATA, 513, W)];
    mock.build_desc_chain(&descs).unwrap();
    let o = finish(&mut blk, mem.clone(), &mock, &descs);
    assert_eq!(o.used, Some(513));
    assert_eq!(
        read_guest(&o.mem, DATA, 513),
        [[0x5a; 512].as_slice(), &[OK]].concat()
    );
}

#[test]
fn flush_and_get_id() {
    let (img, mut blk) = new_disk(false);
    let o = serve(
        &mut blk,
        guest(VIRTIO_BLK_T_FLUSH, 0),
        &[desc(HDR, 16, 0), status_desc()],
    );
    assert_eq!((o.used, o.status), (Some(1), OK));
    assert_eq!(blk.stats().flushes, 1);

    let o = serve(
        &mut blk,
        guest(VIRTIO_BLK_T_GET_ID, 0),
        &[desc(HDR, 16, 0), desc(DATA, 20, W), status_desc()],
    );
    assert_eq!((o.used, o.status), (Some(21), OK));
    assert_eq!(
        read_guest(&o.mem, DATA, 20),
        b"disk0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    );

    // A 20-byte id fills the buffer; a larger buffer gets only 20 bytes.
    let mut c = cfg(&img, false);
    c.id = Some("abcdefghijklmnopqrst".into());
    let mut blk = Block::new(&c, 0).unwrap();
    let o = serve(
        &mut blk,
        guest(VIRTIO_BLK_T_GET_ID, 0),
        &[desc(HDR, 16, 0), desc(DATA, 64, W), status_desc()],
    );
    assert_eq!((o.used, o.status), (Some(21), OK));
    assert_eq!(read_guest(&o.mem, DATA, 21), b"abcdefghijklmnopqrst\xaa");
}

#[test]
fn read_only_disk_refuses_writes_and_stays_unchanged() {
    let (img, mut blk) = new_disk(true);
    let sum = checksum(&img.0);
    let mtime = std::fs::metadata(&img.0).unwrap().modified().unwrap();
    let o = serve(
        &mut blk,
        guest(VIRTIO_BLK_T_OUT, 0),
        &[desc(HDR, 16, 0), desc(DATA, 512, 0), status_desc()],
    );
    assert_eq!((o.used, o.status), (Some(1), IOERR));
    let o = serve(
        &mut blk,
        guest(VIRTIO_BLK_T_FLUSH, 0),
        &[desc(HDR, 16, 0), status_desc()],
    );
    assert_eq!(o.status, OK);
    let o = serve(
        &mut blk,
        guest(VIRTIO_BLK_T_IN, 7),
        &[desc(HDR, 16, 0), desc(DATA, 512, W), status_desc()],
    );
    assert_eq!((o.used, o.status), (Some(513), OK));
    assert_eq!(read_guest(&o.mem, DATA, 512), pattern(4096)[3584..]);
    assert_eq!(checksum(&img.0), sum, "read-only image unchanged");
    assert_eq!(
        std::fs::metadata(&img.0).unwrap().modified().unwrap(),
        mtime
    );
    assert_eq!(blk.stats().writes, 0);
    assert_eq!(blk.stats().errors, 1);
}

#[test]
fn out_of_range_and_overflowing_sectors_are_ioerr() {
    let (img, mut blk) = new_disk(false);
    let sum = checksum(&img.0);
    let cases: [(u64, u32); 5] = [
        (SECTORS, 512),        // first sector past the end
        (SECTORS - 1, 1024),   // starts inside, ends past the end
        (u64::MAX, 512),       // sector * 512 overflows
        (u64::MAX / 512, 512), // sector * 512 + len overflows
        (1 << 60, 0),          // even an empty request must start inside
    ];
    for (sector, len) in cases {
        for (t, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, 0)] {
            let mut descs = vec![desc(HDR, 16, 0)];
            if len > 0 {
                descs.push(desc(DATA, len, flags));
            }
            descs.push(status_desc());
            let o = serve(&mut blk, guest(t, sector), &descs);
            assert_eq!(
                (o.used, o.status),
                (Some(1), IOERR),
                "type {t} sector {sector}"
            );
            assert_eq!(read_guest(&o.mem, DATA, 1024), [FILL; 1024], "nothing read");
        }
    }
    assert_eq!(checksum(&img.0), sum, "nothing written");
    // The last sector itself is fine.
    let o = serve(
        &mut blk,
        guest(VIRTIO_BLK_T_IN, SECTORS - 1),
        &[desc(HDR, 16, 0), desc(DATA, 512, W), status_desc()],
    );
    assert_eq!(o.status, OK);
}

#[test]
fn lengths_not_multiple_of_512_are_ioerr() {
    let (img, mut blk) = new_disk(false);
    let sum = checksum(&img.0);
    for len in [1u32, 100, 511, 513, 1000] {
        let o = serve(
            &mut blk,
            guest(VIRTIO_BLK_T_IN, 0),
            &[desc(HDR, 16, 0), desc(DATA, len, W), status_desc()],
        );
        assert_eq!((o.used, o.status), (Some(1), IOERR), "IN {len}");
        assert_eq!(read_guest(&o.mem, DATA, 1024), [FILL; 1024]);
        let o = serve(
            &mut blk,
            guest(VIRTIO_BLK_T_OUT, 0),
            &[desc(HDR, 16, 0), desc(DATA, len, 0), status_desc()],
        );
        assert_eq!((o.used, o.status), (Some(1), IOERR), "OUT {len}");
    }
    assert_eq!(checksum(&img.0), sum);
}

#[test]
fn unknown_request_types_are_unsupp() {
    let (img, mut blk) = new_disk(false);
    let sum = checksum(&img.0);
    for t in [VIRTIO_BLK_T_DISCARD, 2, 0xdead_beef] {
        let o = serve(
            &mut blk,
            guest(t, 0),
            &[desc(HDR, 16, 0), desc(DATA, 16, 0), status_desc()],
        );
        assert_eq!((o.used, o.status), (Some(1), UNSUPP), "type {t}");
    }
    assert_eq!(checksum(&img.0), sum);
}

#[test]
fn malformed_requests_with_a_status_byte_get_ioerr() {
    let (img, mut blk) = new_disk(false);
    let sum = checksum(&img.0);
    let cases: Vec<(&str, u32, Vec<RawDescriptor>)> = vec![
        (
            "header short",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 8, 0), status_desc()],
        ),
        (
            "header missing",
            VIRTIO_BLK_T_IN,
            vec![desc(DATA, 512, W), status_desc()],
        ),
        (
            "IN with readable data",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 16, 0), desc(DATA, 512, 0), status_desc()],
        ),
        (
            "OUT with writable data",
            VIRTIO_BLK_T_OUT,
            vec![desc(HDR, 16, 0), desc(DATA, 512, W), status_desc()],
        ),
        (
            "OUT with writable data after readable data",
            VIRTIO_BLK_T_OUT,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, 0),
                desc(DATA + 0x1000, 512, W),
                status_desc(),
            ],
        ),
        (
            "readable after writable",
            VIRTIO_BLK_T_IN,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA + 0x1000, 512, 0),
                status_desc(),
            ],
        ),
        (
            "header after writable",
            VIRTIO_BLK_T_IN,
            vec![desc(DATA, 512, W), desc(HDR, 16, 0), status_desc()],
        ),
        (
            "data outside guest memory",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 16, 0), desc(0xffff_0000, 512, W), status_desc()],
        ),
        (
            "data straddling the end of guest memory",
            VIRTIO_BLK_T_IN,
            vec![
                desc(HDR, 16, 0),
                desc((1 << 20) - 256, 512, W),
                status_desc(),
            ],
        ),
        (
            "data address + length overflows",
            VIRTIO_BLK_T_OUT,
            vec![
                desc(HDR, 16, 0),
                desc(u64::MAX - 255, 512, 0),
                status_desc(),
            ],
        ),
        (
            "huge length",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 16, 0), desc(DATA, 0xffff_fe00, W), status_desc()],
        ),
        (
            "header outside guest memory",
            VIRTIO_BLK_T_IN,
            vec![
                desc(0x1_0000_0000, 16, 0),
                desc(DATA, 512, W),
                status_desc(),
            ],
        ),
        (
            "zero-length data descriptor",
            VIRTIO_BLK_T_OUT,
            vec![desc(HDR, 16, 0), desc(DATA, 0, 0), status_desc()],
        ),
        (
            "zero-length writable descriptor",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 16, 0), desc(DATA, 0, W), status_desc()],
        ),
        (
            "flush with data",
            VIRTIO_BLK_T_FLUSH,
            vec![desc(HDR, 16, 0), desc(DATA, 512, 0), status_desc()],
        ),
        (
            "get-id with readable data",
            VIRTIO_BLK_T_GET_ID,
            vec![
                desc(HDR, 16, 0),
                desc(DATA, 512, 0),
                desc(DATA + 0x1000, 20, W),
                status_desc(),
            ],
        ),
    ];
    for (what, t, descs) in cases {
        let o = serve(&mut blk, guest(t, 0), &descs);
        assert_eq!((o.used, o.status), (Some(1), IOERR), "{what}");
        assert_eq!(
            read_guest(&o.mem, DATA, 1024),
            [FILL; 1024],
            "{what}: nothing read"
        );
    }
    assert_eq!(checksum(&img.0), sum, "nothing written");
    assert_eq!(blk.stats().reads + blk.stats().writes, 0);
}

#[test]
fn chains_without_a_usable_status_byte_are_returned_empty() {
    let (img, mut blk) = new_disk(false);
    let sum = checksum(&img.0);
    let cases: Vec<(&str, u32, Vec<RawDescriptor>)> = vec![
        (
            "status missing (OUT)",
            VIRTIO_BLK_T_OUT,
            vec![desc(HDR, 16, 0), desc(DATA, 512, 0)],
        ),
        (
            "status missing (header only)",
            VIRTIO_BLK_T_FLUSH,
            vec![desc(HDR, 16, 0)],
        ),
        (
            "status not writable",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 16, 0), desc(STATUS, 1, 0)],
        ),
        (
            "status zero length",
            VIRTIO_BLK_T_IN,
            vec![desc(HDR, 16, 0), desc(STATUS, 0, W)],
        ),
        (
            "status outside guest memory",
            VIRTIO_BLK_T_FLUSH,
            vec![desc(HDR, 16, 0), desc(0xffff_0000, 1, W)],
        ),
        (
            "status address + length overflows",
            VIRTIO_BLK_T_FLUSH,
            vec![desc(HDR, 16, 0), desc(u64::MAX, 2, W)],
        ),
    ];
    for (what, t, descs) in cases {
        let o = serve(&mut blk, guest(t, 0), &descs);
        assert_eq!(o.used, Some(0), "{what}");
        assert_eq!(o.status, FILL, "{what}: no status written");
    }
    assert_eq!(checksum(&img.0), sum);
    assert_eq!(blk.stats().errors, 6);
}

/// Serves a chain whose descriptors are stored as given (with their own `next` fields),
/// head at index 0.
fn serve_raw(blk: &mut Block, mem: GuestMemoryMmap, table: &[RawDescriptor]) -> Outcome {
    let mock = MockSplitQueue::new(&mem, 16);
    for (i, d) in table.iter().enumerate() {
        mock.desc_table().store(i as u16, *d).unwrap();
    }
    mock.avail().ring().ref_at(0).unwrap().store(0);
    mock.avail().idx().store(1);
    finish(blk, mem.clone(), &mock, table)
}

#[test]
fn loops_and_overlong_chains_do_not_hang() {
    let (img, mut blk) = new_disk(false);
    let sum = checksum(&img.0);
    let n = W | VRING_DESC_F_NEXT;
    // Last writable descriptor links back to the first: a loop.
    let o = serve_raw(
        &mut blk,
        guest(VIRTIO_BLK_T_OUT, 0),
        &[
            raw(HDR, 16, VRING_DESC_F_NEXT, 1),
            raw(DATA, 512, VRING_DESC_F_NEXT, 2),
            raw(STATUS, 1, n, 0),
        ],
    );
    assert_eq!((o.used, o.status), (Some(0), FILL), "loop");
    // A chain longer than the queue: all 16 descriptors link on, the last to itself.
    let mut table: Vec<RawDescriptor> = (0..15)
        .map(|i| raw(DATA + i * 0x100, 16, VRING_DESC_F_NEXT, i as u16 + 1))
        .collect();
    table[0] = raw(HDR, 16, VRING_DESC_F_NEXT, 1);
    table.push(raw(STATUS, 1, n, 15));
    let o = serve_raw(&mut blk, guest(VIRTIO_BLK_T_OUT, 0), &table);
    assert_eq!((o.used, o.status), (Some(0), FILL), "overlong");
    // `next` outside the descriptor table.
    let o = serve_raw(
        &mut blk,
        guest(VIRTIO_BLK_T_IN, 0),
        &[raw(HDR, 16, VRING_DESC_F_NEXT, 1), raw(STATUS, 1, n, 200)],
    );
    assert_eq!((o.used, o.status), (Some(0), FILL), "next out of range");
    // An indirect table outside guest memory, and a nested indirect table.
    let o = serve_raw(
        &mut blk,
        guest(VIRTIO_BLK_T_IN, 0),
        &[raw(0xffff_0000, 64, VRING_DESC_F_INDIRECT, 0)],
    );
    assert_eq!(o.used, Some(0), "indirect table outside memory");
    let mem = guest(VIRTIO_BLK_T_IN, 0);
    let nested = 0x20000u64;
    mem.write_obj(raw(HDR, 16, VRING_DESC_F_NEXT, 1), GuestAddress(nested))
        .unwrap();
    mem.write_obj(
        raw(0x30000, 32, VRING_DESC_F_INDIRECT, 0),
        GuestAddress(nested + 16),
    )
    .unwrap();
    let o = serve_raw(&mut blk, mem, &[raw(nested, 32, VRING_DESC_F_INDIRECT, 0)]);
    assert_eq!(o.used, Some(0), "nested indirect table");
    assert_eq!(checksum(&img.0), sum);
}

#[test]
fn indirect_descriptors_are_followed() {
    // Not offered, but virtio-queue follows them; the same checks apply.
    let (_img, mut blk) = new_disk(false);
    let mem = guest(VIRTIO_BLK_T_IN, 1);
    let table = 0x20000u64;
    let entries = [
        raw(HDR, 16, VRING_DESC_F_NEXT, 1),
        raw(DATA, 512, W | VRING_DESC_F_NEXT, 2),
        raw(STATUS, 1, W, 0),
    ];
    for (i, d) in entries.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let mock = MockSplitQueue::new(&mem, 16);
    mock.desc_table()
        .store(0, raw(table, 48, VRING_DESC_F_INDIRECT, 0))
        .unwrap();
    mock.avail().ring().ref_at(0).unwrap().store(0);
    mock.avail().idx().store(1);
    // The writable buffers are the ones in the indirect table.
    let o = finish(&mut blk, mem.clone(), &mock, &entries);
    assert_eq!((o.used, o.status), (Some(513), OK));
    assert_eq!(read_guest(&o.mem, DATA, 512), pattern(1024)[512..]);
}

#[test]
fn event_idx_updates_avail_event_and_serves_every_chain() {
    let (_img, mut blk) = new_disk(false);
    let mem = guest(VIRTIO_BLK_T_FLUSH, 0);
    let mock = MockSplitQueue::new(&mem, 16);
    // Three flush chains: (header, status) x 3.
    let mut table = Vec::new();
    for i in 0..3u16 {
        table.push(raw(HDR, 16, VRING_DESC_F_NEXT, 2 * i + 1));
        table.push(raw(STATUS + u64::from(i), 1, W, 0));
    }
    mock.add_desc_chains(&table, 0).unwrap();
    let mut q = queue_from_mock(&mock, 16);
    q.set_event_idx(true);
    let (act, _irq) = active(&mem, vec![q]);
    blk.activate(act).unwrap();
    assert_eq!(blk.process_queue(), 3);
    // avail_event lives right after the used ring: the driver notifies at the next buffer.
    let avail_event_addr = mock.used_addr().0 + 4 + 8 * 16;
    let avail_event: u16 = mem.read_obj(GuestAddress(avail_event_addr)).unwrap();
    assert_eq!(avail_event, 3);
    assert_eq!(read_guest(&mem, STATUS, 3), [OK; 3]);
    assert_eq!(blk.stats().flushes, 3);
}

#[test]
fn a_bad_available_index_or_head_does_not_hang() {
    let (_img, mut blk) = new_disk(false);
    let mem = guest(VIRTIO_BLK_T_FLUSH, 0);
    let mock = MockSplitQueue::new(&mem, 16);
    mock.desc_table()
        .store(0, raw(HDR, 16, VRING_DESC_F_NEXT, 1))
        .unwrap();
    mock.desc_table().store(1, raw(STATUS, 1, W, 0)).unwrap();
    // More than a queue's worth of buffers "available": the queue refuses to iterate.
    mock.avail().ring().ref_at(0).unwrap().store(0);
    mock.avail().idx().store(100);
    let (act, _) = active(&mem, vec![queue_from_mock(&mock, 16)]);
    blk.activate(act).unwrap();
    assert_eq!(blk.process_queue(), 0);
    assert_eq!(read_guest(&mem, STATUS, 1), [FILL]);

    // A head index outside the table, then a good chain: the good one is still served.
    let mem = guest(VIRTIO_BLK_T_FLUSH, 0);
    let mock = MockSplitQueue::new(&mem, 16);
    mock.desc_table()
        .store(0, raw(HDR, 16, VRING_DESC_F_NEXT, 1))
        .unwrap();
    mock.desc_table().store(1, raw(STATUS, 1, W, 0)).unwrap();
    mock.avail().ring().ref_at(0).unwrap().store(200);
    mock.avail().ring().ref_at(1).unwrap().store(0);
    mock.avail().idx().store(2);
    blk.reset();
    let (act, _) = active(&mem, vec![queue_from_mock(&mock, 16)]);
    blk.activate(act).unwrap();
    assert_eq!(blk.process_queue(), 1);
    assert_eq!(read_guest(&mem, STATUS, 1), [OK]);
    let used = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!((used.id(), used.len()), (0, 1));
}

#[test]
fn nothing_happens_before_activation_and_after_reset() {
    let (_img, mut blk) = new_disk(false);
    assert_eq!(blk.process_queue(), 0);
    let mem = memory();
    let mock = MockSplitQueue::new(&mem, 16);
    let (act, _) = active(&mem, vec![queue_from_mock(&mock, 16)]);
    blk.activate(act).unwrap();
    blk.reset();
    assert_eq!(blk.process_queue(), 0);
    let (act, _) = active(&mem, vec![]);
    assert!(matches!(
        blk.activate(act),
        Err(ActivateError::QueueCount { want: 1, got: 0 })
    ));
}

#[test]
fn cursor_splits_segments_and_stops() {
    let segs = [
        Seg {
            addr: GuestAddress(0x100),
            len: 10,
        },
        Seg {
            addr: GuestAddress(0x200),
            len: 3,
        },
    ];
    let mut c = Cursor::new(&segs);
    assert_eq!(c.take(0).map(|s| s.len), None, "max 0 makes no progress");
    let pieces: Vec<(u64, usize)> = std::iter::from_fn(|| c.take(4))
        .map(|s| (s.addr.0, s.len))
        .collect();
    assert_eq!(
        pieces,
        [(0x100, 4), (0x104, 4), (0x108, 2), (0x200, 3)],
        "pieces never cross a segment"
    );
    assert_eq!(total(&segs), 13);
}

// --- snapshot ---

mod snapshot {
    use super::*;
    use crate::devices::state::{DeviceSnapshot, StateError, TransportSnapshot};
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_utils::{
        driver_init, settle, through_json, transport, TestRing,
    };
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;

    const REQ: [u64; 3] = [0x20000, 0x21000, 0x22000];

    struct Rig {
        t: MmioTransport,
        em: EventManager<Arc<Mutex<Block>>>,
        dev: Arc<Mutex<Block>>,
    }

    fn rig(mem: &GuestMemoryMmap, blk: Block) -> Rig {
        let dev = Arc::new(Mutex::new(blk));
        let mut em = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let (t, _, _) = transport(dev.clone(), mem);
        Rig { t, em, dev }
    }

    /// A request at `REQ[slot]`: header, `data` bytes (device-writable for IN), status.
    fn request(
        mem: &GuestMemoryMmap,
        ring: &mut TestRing,
        slot: usize,
        req_type: u32,
        sector: u64,
        data: &[u8],
    ) {
        let base = REQ[slot];
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(base)).unwrap();
        mem.write_slice(data, GuestAddress(base + 0x100)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(base + 0x800)).unwrap();
        let write = req_type == VIRTIO_BLK_T_IN;
        ring.push(
            mem,
            &[
                (base, 16, false),
                (base + 0x100, data.len() as u32, write),
                (base + 0x800, 1, true),
            ],
        );
    }

    fn status(mem: &GuestMemoryMmap, slot: usize) -> u8 {
        mem.read_obj(GuestAddress(REQ[slot] + 0x800)).unwrap()
    }

    /// An active disk (EVENT_IDX on) that served one read, with a write waiting in the ring.
    fn saved(mem: &GuestMemoryMmap, ring: &mut TestRing, img: &Image) -> TransportSnapshot {
        let mut r = rig(mem, Block::new(&cfg(img, false), 0).unwrap());
        driver_init(
            &mut r.t,
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_BLK_F_FLUSH,
            &[*ring],
        );
        request(mem, ring, 0, VIRTIO_BLK_T_IN, 1, &[0; 512]);
        settle(&mut r.em);
        assert_eq!(ring.take_used(mem), vec![(0, 513)]);
        assert_eq!(status(mem, 0), OK);
        request(mem, ring, 1, VIRTIO_BLK_T_OUT, 2, &[0x5a; 512]);
        r.t.save()
    }

    #[test]
    fn round_trip_serves_the_waiting_request_and_continues_the_used_ring() {
        let mem = memory();
        let img = image(&pattern(SECTORS as usize * 512));
        let mut ring = TestRing::new(&mem, 0x1000, 16);
        let s = through_json(&saved(&mem, &mut ring, &img));
        assert_eq!(
            s.device,
            DeviceSnapshot::Block {
                capacity: SECTORS,
                read_only: false
            }
        );
        assert_eq!((s.queues[0].next_avail, s.queues[0].next_used), (1, 1));
        assert!(s.queues[0].event_idx);

        // A new process: the same disk, a fresh device.
        let mut r = rig(&mem, Block::new(&cfg(&img, false), 0).unwrap());
        r.t.restore(&s).unwrap();
        assert_eq!(r.dev.lock().unwrap().acked, s.driver_features);
        settle(&mut r.em);
        assert_eq!(
            ring.take_used(&mem),
            vec![(3, 1)],
            "the write, as used entry 1"
        );
        assert_eq!(ring.used_idx(&mem), 2);
        assert_eq!(status(&mem, 1), OK);
        let disk = std::fs::read(&img.0).unwrap();
        assert_eq!(&disk[1024..1536], &[0x5a; 512][..]);
        assert_eq!(r.dev.lock().unwrap().stats().writes, 1);
    }

    /// A limited disk with three reads waiting: the limiter lets the first through, puts the
    /// second back in the ring and stops the queue; the limiter's timer (registered with the
    /// event loop) resumes it, until every request is served. `patch`: instead of waiting, a
    /// live update removes the limit.
    fn throttled(limits: RateLimiterConfig, patch: Option<RateLimiterConfig>) {
        let mem = memory();
        let img = image(&pattern(SECTORS as usize * 512));
        let mut ring = TestRing::new(&mem, 0x1000, 16);
        let mut c = cfg(&img, false);
        c.rate_limiter = Some(limits);
        let mut r = rig(&mem, Block::new(&c, 0).unwrap());
        driver_init(
            &mut r.t,
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
            &[ring],
        );
        for slot in 0..3 {
            request(
                &mem,
                &mut ring,
                slot,
                VIRTIO_BLK_T_IN,
                slot as u64,
                &[0; 512],
            );
        }
        settle(&mut r.em);
        assert_eq!(
            ring.take_used(&mem),
            vec![(0, 513)],
            "one request, then throttled"
        );
        {
            let d = r.dev.lock().unwrap();
            assert_eq!(d.stats().throttled, 1);
            assert!(d.rate_limiter().is_blocked());
            // Nothing held: the refused chain is back in the available ring.
            assert_eq!(d.queue_states()[0].next_avail, 1);
        }
        assert_eq!(status(&mem, 1), 0xff, "the second request is untouched");
        if let Some(p) = patch {
            let mut d = r.dev.lock().unwrap();
            d.rate_limiter_mut("rate_limiter")
                .unwrap()
                .update_buckets(&p)
                .unwrap();
            assert!(d.rate_limiter_mut("rx_rate_limiter").is_none());
        }
        let mut got = Vec::new();
        for _ in 0..200 {
            r.em.run_with_timeout(100).unwrap();
            got.extend(ring.take_used(&mem));
            if got.len() == 2 {
                break;
            }
        }
        assert_eq!(
            got,
            vec![(3, 513), (6, 513)],
            "resumed on the timer, in order"
        );
        assert_eq!((status(&mem, 1), status(&mem, 2)), (OK, OK));
        let d = r.dev.lock().unwrap();
        assert_eq!(d.stats().reads, 3);
        if patch.is_some() {
            assert!(d.rate_limiter().is_unlimited());
        }
    }

    #[test]
    fn a_throttled_disk_stops_and_resumes_on_its_timer() {
        use crate::config::TokenBucketConfig as B;
        // One request per 150 ms.
        throttled(
            RateLimiterConfig {
                bandwidth: None,
                ops: Some(B::new(1, 150)),
            },
            None,
        );
        // 256 bytes per 100 ms, 512-byte requests: larger than the bucket, served anyway
        // (on a full bucket, the excess paid back before the next one).
        throttled(
            RateLimiterConfig {
                bandwidth: Some(B::new(256, 100)),
                ops: None,
            },
            None,
        );
        // One request per hour, then the limit is lifted on the live device.
        throttled(
            RateLimiterConfig {
                bandwidth: None,
                ops: Some(B::new(1, 3_600_000)),
            },
            Some(RateLimiterConfig {
                bandwidth: None,
                ops: Some(B::new(0, 0)),
            }),
        );
    }

    #[test]
    fn a_disk_of_another_size_or_mode_is_refused() {
        let mem = memory();
        let img = image(&pattern(SECTORS as usize * 512));
        let mut ring = TestRing::new(&mem, 0x1000, 16);
        let s = through_json(&saved(&mem, &mut ring, &img));

        let bigger = image(&pattern(2 * SECTORS as usize * 512));
        let mut r = rig(&mem, Block::new(&cfg(&bigger, false), 0).unwrap());
        let err = r.t.restore(&s).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StateError::Mismatch(_)), "{err}");
        assert!(
            msg.contains("8192 bytes") && msg.contains("4096 bytes"),
            "{msg}"
        );
        assert!(!r.t.is_activated());
        assert_eq!(r.t.status(), 0);
        settle(&mut r.em);
        assert_eq!(ring.used_idx(&mem), 1, "nothing served");

        // Read-only now, read-write then: the guest acked no RO and may write.
        let mut r = rig(&mem, Block::new(&cfg(&img, true), 0).unwrap());
        let err = r.t.restore(&s).unwrap_err();
        assert!(matches!(err, StateError::Mismatch(_)), "{err}");
        assert!(!r.t.is_activated());

        // Another kind of state, straight into the device.
        let mut blk = Block::new(&cfg(&img, false), 0).unwrap();
        assert!(matches!(
            blk.restore_state(&DeviceSnapshot::Rng {}),
            Err(StateError::Kind { .. })
        ));
    }

    #[test]
    fn rings_outside_guest_memory_are_refused() {
        let mem = memory();
        let img = image(&pattern(SECTORS as usize * 512));
        let mut ring = TestRing::new(&mem, 0x1000, 16);
        let mut s = saved(&mem, &mut ring, &img);
        s.queues[0].avail_ring = (1 << 20) - 8;
        let mut r = rig(&mem, Block::new(&cfg(&img, false), 0).unwrap());
        assert!(matches!(
            r.t.restore(&s),
            Err(StateError::Queue { index: 0, .. })
        ));
        assert!(!r.t.is_activated());
    }
}
