//! Device tests without KVM: the guest is this test code writing packets into TX chains and
//! reading RX chains of virtio-queue mock rings; the host side is real Unix sockets in a
//! temporary directory; the device runs under a real event manager, as on the VMM thread.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::kvm::memory::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::*;
use super::*;
use crate::config::VsockConfig;
use crate::devices::virtio::test_utils::active;

const CID: u64 = 3;
const QSIZE: u16 = 64;
const MEM_SIZE: usize = 8 << 20;
const BUF_START: u64 = 0x10000;
const RX_DATA: u32 = 4096;
const GUEST_BUF: u32 = 64 * 1024;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "ledge-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A vsock header as the guest sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pkt {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Pkt {
    /// A packet from guest port `src` to host port `dst`.
    fn guest(op: u16, src: u32, dst: u32) -> Pkt {
        Pkt {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: src,
            dst_port: dst,
            type_: TYPE_STREAM,
            op,
            buf_alloc: GUEST_BUF,
            ..Pkt::default()
        }
    }

    fn bytes(&self) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    fn parse(b: &[u8; 44]) -> Pkt {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Pkt {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// A descriptor as the test writes it: address, length, flags, and the index of the next
/// descriptor *within the chain* (translated to the table index when written).
#[derive(Clone, Copy, Debug)]
struct D(u64, u32, u16, u16);

fn rd(addr: u64, len: u32) -> D {
    D(addr, len, 0, 0)
}
fn wr(addr: u64, len: u32) -> D {
    D(addr, len, VRING_DESC_F_WRITE as u16, 0)
}

/// The driver side of one queue. Its own layout rather than `MockSplitQueue::create`'s:
/// that one starts the used ring `len` bytes (not `2 * len`) after the avail ring entries, so
/// the two overlap once more than about `len / 2` chains were offered.
struct Ring {
    mem: &'static GuestMemoryMmap,
    desc: u64,
    avail_ring: u64,
    used_ring: u64,
    next_desc: u16,
    avail: u16,
    used_seen: u16,
    heads: HashMap<u16, Vec<D>>,
}

impl Ring {
    fn new(mem: &'static GuestMemoryMmap, base: u64) -> Ring {
        Ring {
            mem,
            desc: base,
            avail_ring: base + 0x400,
            used_ring: base + 0x800,
            next_desc: 0,
            avail: 0,
            used_seen: 0,
            heads: HashMap::new(),
        }
    }

    /// Offers one chain; descriptors are chained in order with NEXT unless `raw` (then the
    /// flags and next fields are taken as given, next relative to the chain's first index).
    fn push(&mut self, descs: &[D], raw: bool) -> u16 {
        let head = self.next_desc;
        let n = descs.len() as u16;
        for (i, d) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let (flags, next) = if raw {
                (d.2, (head + d.3) % QSIZE)
            } else if i + 1 < descs.len() {
                (d.2 | VRING_DESC_F_NEXT as u16, (idx + 1) % QSIZE)
            } else {
                (d.2, 0)
            };
            let raw = RawDescriptor::from(SplitDescriptor::new(d.0, d.1, flags, next));
            self.mem
                .write_obj(raw, GuestAddress(self.desc + u64::from(idx) * 16))
                .unwrap();
        }
        self.next_desc = (head + n) % QSIZE;
        let slot = self.avail_ring + 4 + u64::from(self.avail % QSIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        self.mem
            .write_obj(self.avail, GuestAddress(self.avail_ring + 2))
            .unwrap();
        self.heads.insert(head, descs.to_vec());
        head
    }

    /// A ready queue on these rings, as the transport would hand it to the device.
    fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail_ring as u32), Some(0));
        q.set_used_ring_address(Some(self.used_ring as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Used entries since the last call: (descriptors of the chain, used length).
    fn used(&mut self) -> Vec<(Vec<D>, u32)> {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used_ring + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used_ring + 4 + u64::from(self.used_seen % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            let id = u16::try_from(id).unwrap();
            out.push((self.heads.remove(&id).expect("a chain we offered"), len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// The test's guest, device and event loop.
struct H {
    _dir: TempDir,
    uds: PathBuf,
    mem: &'static GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    ev: Ring,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    evts: Vec<EventFd>,
    next_buf: u64,
}

impl H {
    fn new() -> H {
        H::with(None, false)
    }

    fn with(timeouts: Option<Timeouts>, event_idx: bool) -> H {
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        // Leaked so the mock rings can borrow it for the whole test.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let (rx, tx, ev) = (
            Ring::new(mem, 0x1000),
            Ring::new(mem, 0x4000),
            Ring::new(mem, 0x7000),
        );
        let mut dev = Vsock::new(&VsockConfig {
            cid: CID as u32,
            uds: uds.clone(),
        })
        .unwrap();
        if let Some(t) = timeouts {
            dev.set_timeouts(t);
        }
        let queues: Vec<_> = [&rx, &tx, &ev].iter().map(|r| r.queue(event_idx)).collect();
        let (act, _irq) = active(mem, queues);
        let evts = act
            .queue_evts
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        dev.lock().unwrap().activate(act).unwrap();
        let mut h = H {
            _dir: dir,
            uds,
            mem,
            rx,
            tx,
            ev,
            dev,
            em,
            evts,
            next_buf: BUF_START,
        };
        h.run();
        h
    }

    /// Runs the event loop until it has nothing more to do; a loop that never settles is a
    /// busy-wait bug.
    fn run(&mut self) {
        for _ in 0..200 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop does not settle");
    }

    fn kick(&mut self, q: usize) {
        self.evts[q].write(1).unwrap();
        self.run();
    }

    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).next_multiple_of(64);
        if self.next_buf + len > MEM_SIZE as u64 {
            self.next_buf = BUF_START;
        }
        let a = self.next_buf;
        self.next_buf += len;
        a
    }

    fn stats(&self) -> VsockStats {
        self.dev.lock().unwrap().stats()
    }

    fn conns(&self) -> usize {
        self.dev.lock().unwrap().connection_count()
    }

    /// The guest sends `p` with `data` (its len set to the data's), as Linux 6.1 does: a
    /// header descriptor, then a data descriptor when there is data.
    fn send(&mut self, mut p: Pkt, data: &[u8]) {
        p.len = data.len() as u32;
        self.send_raw(p, data);
    }

    /// As `send`, but `p.len` is left as given.
    fn send_raw(&mut self, p: Pkt, data: &[u8]) {
        let h = self.alloc(44);
        self.mem.write_slice(&p.bytes(), GuestAddress(h)).unwrap();
        let mut descs = vec![rd(h, 44)];
        if !data.is_empty() {
            let d = self.alloc(data.len() as u32);
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            descs.push(rd(d, data.len() as u32));
        }
        self.tx.push(&descs, false);
        self.kick(TXQ);
        let used = self.tx.used();
        assert!(
            used.iter().all(|(_, len)| *len == 0),
            "TX chains come back empty"
        );
    }

    /// Offers a raw TX chain and returns its used length.
    fn send_chain(&mut self, descs: &[D], raw: bool) -> Option<u32> {
        self.tx.push(descs, raw);
        self.kick(TXQ);
        self.tx.used().first().map(|(_, len)| *len)
    }

    /// Gives the guest `n` RX buffers (a header and a 4 KiB data descriptor each).
    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            let h = self.alloc(44);
            let d = self.alloc(RX_DATA);
            self.rx.push(&[wr(h, 44), wr(d, RX_DATA)], false);
        }
        self.kick(RXQ);
    }

    /// The packets the guest received since the last call.
    fn recv(&mut self) -> Vec<(Pkt, Vec<u8>)> {
        self.run();
        let mem = self.mem;
        self.rx
            .used()
            .into_iter()
            .map(|(descs, len)| {
                assert!(len >= 44, "RX packet of {len} bytes");
                let mut hdr = [0u8; 44];
                mem.read_slice(&mut hdr, GuestAddress(descs[0].0)).unwrap();
                let p = Pkt::parse(&hdr);
                assert_eq!(len, 44 + p.len, "used length covers header and data");
                assert_eq!(
                    (p.src_cid, p.dst_cid, p.type_),
                    (HOST_CID, CID, TYPE_STREAM)
                );
                let mut data = vec![0u8; p.len as usize];
                if p.len > 0 {
                    mem.read_slice(&mut data, GuestAddress(descs[1].0)).unwrap();
                }
                (p, data)
            })
            .collect()
    }

    /// Gives RX buffers and expects exactly one packet.
    fn recv_one(&mut self) -> (Pkt, Vec<u8>) {
        self.give_rx(1);
        let mut v = self.recv();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    /// A host client connects to guest `port`; the guest answers. Returns the client and the
    /// host port of the connection.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.run();
        let (req, _) = self.recv_one();
        assert_eq!((req.op, req.dst_port), (OP_REQUEST, port));
        self.send(Pkt::guest(OP_RESPONSE, port, req.src_port), &[]);
        s.set_nonblocking(true).unwrap();
        let line = read_all(&mut s);
        assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());
        (s, req.src_port)
    }

    /// The guest connects from `src` to host port `port`, where the test listens.
    fn guest_connect(&mut self, l: &UnixListener, src: u32, port: u32) -> UnixStream {
        self.send(Pkt::guest(OP_REQUEST, src, port), &[]);
        let (p, _) = self.recv_one();
        assert_eq!((p.op, p.src_port, p.dst_port), (OP_RESPONSE, port, src));
        assert_eq!(p.buf_alloc, BUF_ALLOC);
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        s
    }

    /// The host writes `data` on its end `s` of the connection between guest port `gport` and
    /// host port `hport`; the guest receives it, whole, in one RW packet.
    fn host_sends(&mut self, s: &mut UnixStream, gport: u32, hport: u32, data: &[u8]) {
        s.write_all(data).unwrap();
        self.run();
        let (p, got) = self.recv_one();
        assert_eq!((p.op, p.src_port, p.dst_port), (OP_RW, hport, gport));
        assert_eq!(got, data);
    }

    /// The guest sends `data` from `gport` to `hport`; the host reads all of it on `s`.
    fn guest_sends(&mut self, s: &mut UnixStream, gport: u32, hport: u32, data: &[u8]) {
        self.send(Pkt::guest(OP_RW, gport, hport), data);
        assert_eq!(read_all(s), data);
    }

    fn listen(&self, port: u32) -> UnixListener {
        let mut p = self.uds.clone().into_os_string();
        p.push(format!("_{port}"));
        UnixListener::bind(p).unwrap()
    }
}

/// Everything a non-blocking socket has now.
fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Whether the peer closed the socket (end of file, after any data).
fn closed(s: &mut UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn config_features_and_queues() {
    let h = H::new();
    let d = h.dev.lock().unwrap();
    assert_eq!(d.device_type(), 19);
    assert_eq!(d.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    assert_eq!(
        d.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    );
    let mut cfg = [0xffu8; 8];
    d.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut hi = [0xffu8; 4];
    d.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    d.read_config(8, &mut hi);
    assert_eq!(hi, [0; 4]);
}

#[test]
fn new_replaces_stale_sockets_and_refuses_other_files() {
    let dir = TempDir::new();
    let cfg = |p: &Path| VsockConfig {
        cid: 3,
        uds: p.to_path_buf(),
    };
    // A socket file left by an earlier run.
    let stale = dir.0.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let v = Vsock::new(&cfg(&stale)).unwrap();
    assert!(UnixStream::connect(&stale).is_ok(), "listening again");
    // A live socket is not taken over.
    let e = Vsock::new(&cfg(&stale)).unwrap_err();
    assert!(matches!(e, VsockError::InUse(_)), "{e}");
    drop(v);
    assert!(!stale.exists(), "the socket file goes with the device");

    let file = dir.0.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    let e = Vsock::new(&cfg(&file)).unwrap_err();
    assert!(matches!(e, VsockError::NotASocket(_)));
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let e = Vsock::new(&cfg(&dir.0.join("no/such/dir.sock"))).unwrap_err();
    assert!(matches!(e, VsockError::Bind { .. }), "{e}");
    let e = Vsock::new(&VsockConfig {
        cid: 2,
        uds: dir.0.join("x.sock"),
    })
    .unwrap_err();
    assert!(matches!(e, VsockError::Cid(2)));
}

#[test]
fn host_connects_and_data_flows_both_ways() {
    let mut h = H::new();
    let mut s = UnixStream::connect(&h.uds).unwrap();
    // Bytes right after the line are data for the guest, not part of the line.
    s.write_all(b"CONNECT 1234\nearly").unwrap();
    h.run();
    let (req, _) = h.recv_one();
    assert_eq!((req.op, req.dst_port, req.len), (OP_REQUEST, 1234, 0));
    assert!(req.src_port >= FIRST_HOST_PORT);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    let hp = req.src_port;

    h.send(Pkt::guest(OP_RESPONSE, 1234, hp), &[]);
    s.set_nonblocking(true).unwrap();
    assert_eq!(read_all(&mut s), format!("OK {hp}\n").as_bytes());

    let (p, data) = h.recv_one();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RW, hp, 1234));
    assert_eq!(data, b"early");

    h.host_sends(&mut s, 1234, hp, b"hello");
    h.guest_sends(&mut s, 1234, hp, b"world");

    // A second client gets its own host port.
    let (_s2, hp2) = h.host_connect(1234);
    assert_ne!(hp, hp2);
    assert!(hp2 >= FIRST_HOST_PORT);
    let st = h.stats();
    assert_eq!(st.conns_opened, 2);
    assert_eq!(st.bytes_to_guest, 10);
    assert_eq!(st.bytes_to_host, 5);
    assert_eq!(st.bad_chains + st.bad_packets + st.errors, 0);
}

#[test]
fn guest_connects_and_data_flows_both_ways() {
    let mut h = H::new();
    let l = h.listen(5000);
    let mut s = h.guest_connect(&l, 777, 5000);
    h.guest_sends(&mut s, 777, 5000, b"ping");
    h.host_sends(&mut s, 777, 5000, b"pong");

    // The guest closes: SHUTDOWN both ways; the device resets and closes the host side.
    let mut shut = Pkt::guest(OP_SHUTDOWN, 777, 5000);
    shut.flags = SHUTDOWN_BOTH;
    h.send(shut, &[]);
    let (p, _) = h.recv_one();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, 5000, 777));
    assert!(closed(&mut s));
    assert_eq!(h.conns(), 0);
    let st = h.stats();
    assert_eq!((st.conns_opened, st.conns_closed), (1, 1));
    assert_eq!((st.bytes_to_host, st.bytes_to_guest), (4, 4));
}

#[test]
fn refused_guest_connect_gets_rst() {
    let mut h = H::new();
    h.send(Pkt::guest(OP_REQUEST, 777, 6000), &[]);
    let (p, _) = h.recv_one();
    assert_eq!((p.op, p.src_port, p.dst_port), (OP_RST, 6000, 777));
    assert_eq!(h.conns(), 0);
    assert_eq!(h.stats().connect_errors, 1);
}

#[test]
fn device_never_exceeds_the_guest_credit() {
    let mut h = H::new();
    let l = h.listen(5000);
    let mut req = Pkt::guest(OP_REQUEST, 777, 5000);
    req.buf_alloc = 8;
    h.send(req, &[]);
    let (p, _) = h.recv_one();
    assert_eq!(p.op, OP_RESPONSE);
    let (mut s, _) = l.accept().unwrap();

    s.write_all(&[7u8; 20]).unwrap();
    h.run();
    h.give_rx(4);
    let got = h.recv();
    let ops: Vec<u16> = got.iter().map(|(p, _)| p.op).collect();
    assert_eq!(ops, [OP_RW, OP_CREDIT_REQUEST], "{got:?}");
    assert_eq!(got[0].1, [7u8; 8]);
    // More buffers change nothing while the credit is used up.
    h.give_rx(2);
    assert!(h.recv().is_empty());
    assert_eq!(h.stats().bytes_to_guest, 8);

    let mut upd = Pkt::guest(OP_CREDIT_UPDATE, 777, 5000);
    upd.buf_alloc = 8;
    upd.fwd_cnt = 8;
    h.send(upd, &[]);
    let got = h.recv();
    let ops: Vec<(u16, usize)> = got.iter().map(|(p, d)| (p.op, d.len())).collect();
    assert_eq!(ops, [(OP_RW, 8), (OP_CREDIT_REQUEST, 0)]);
    upd.fwd_cnt = 16;
    h.send(upd, &[]);
    let got = h.recv();
    assert_eq!((got[0].0.op, got[0].1.len()), (OP_RW, 4));
    assert_eq!(h.stats().bytes_to_guest, 20);
}

#[test]
fn credit_request_is_answered_and_freed_space_announced() {
    let mut h = H::new();
    let l = h.listen(5000);
    let mut s = h.guest_connect(&l, 777, 5000);
    h.send(Pkt::guest(OP_CREDIT_REQUEST, 777, 5000), &[]);
    let (p, _) = h.recv_one();
    assert_eq!(
        (p.op, p.buf_alloc, p.fwd_cnt),
        (OP_CREDIT_UPDATE, BUF_ALLOC, 0)
    );

    // Fill most of our buffer while the host does not read: no update yet (nothing freed).
    let chunk = vec![1u8; 64 * 1024];
    let mut sent = 0u32;
    while sent + 64 * 1024 <= BUF_ALLOC {
        h.send(Pkt::guest(OP_RW, 777, 5000), &chunk);
        sent += 64 * 1024;
    }
    // What the host socket took is announced, since the guest's view of our space is low.
    h.give_rx(2);
    let got = h.recv();
    assert!(
        got.iter()
            .any(|(p, _)| p.op == OP_CREDIT_UPDATE && p.fwd_cnt > 0),
        "{got:?}"
    );
    // The host drains the rest; asked again, the device reports it all forwarded.
    let mut total = 0;
    for _ in 0..100 {
        total += read_all(&mut s).len();
        h.run();
        if total == sent as usize {
            break;
        }
    }
    assert_eq!(total, sent as usize);
    h.recv();
    h.send(Pkt::guest(OP_CREDIT_REQUEST, 777, 5000), &[]);
    let (p, _) = h.recv_one();
    assert_eq!((p.op, p.fwd_cnt), (OP_CREDIT_UPDATE, sent));
    assert_eq!(h.stats().bytes_to_host, u64::from(sent));
}

#[test]
fn guest_sending_past_our_credit_is_reset() {
    let mut h = H::new();
    let l = h.listen(5000);
    let _s = h.guest_connect(&l, 777, 5000);
    let chunk = vec![1u8; 64 * 1024];
    // The host never reads: its socket buffer fills, then ours (BUF_ALLOC), then too much.
    for _ in 0..64 {
        h.send(Pkt::guest(OP_RW, 777, 5000), &chunk);
        if h.conns() == 0 {
            break;
        }
    }
    assert_eq!(h.conns(), 0);
    let (p, _) = h.recv_one();
    assert_eq!(p.op, OP_RST);
    assert_eq!(h.stats().bad_packets, 1);
}

#[test]
fn bad_packets_are_dropped_or_reset() {
    let mut h = H::new();
    let l = h.listen(5000);
    // Wrong source or destination CID: dropped, nothing answered, nothing connected.
    let mut p = Pkt::guest(OP_REQUEST, 777, 5000);
    p.src_cid = 4;
    h.send(p, &[]);
    let mut p = Pkt::guest(OP_REQUEST, 777, 5000);
    p.dst_cid = 1;
    h.send(p, &[]);
    let mut p = Pkt::guest(OP_REQUEST, 777, 5000);
    p.dst_cid = CID;
    h.send(p, &[]);
    h.give_rx(2);
    assert!(h.recv().is_empty());
    assert_eq!(h.conns(), 0);
    assert_eq!(h.stats().bad_packets, 3);

    // Not a stream: reset.
    let mut p = Pkt::guest(OP_REQUEST, 777, 5000);
    p.type_ = 2;
    h.send(p, &[]);
    // Data or shutdown for no connection: reset; a reset for none: ignored.
    h.send(Pkt::guest(OP_RW, 778, 5000), b"x");
    h.send(Pkt::guest(OP_SHUTDOWN, 779, 5000), &[]);
    h.send(Pkt::guest(OP_RST, 780, 5000), &[]);
    h.give_rx(2);
    let got = h.recv();
    let rsts: Vec<(u16, u32)> = got.iter().map(|(p, _)| (p.op, p.dst_port)).collect();
    assert_eq!(rsts, [(OP_RST, 777), (OP_RST, 778), (OP_RST, 779)]);
    assert_eq!(h.conns(), 0);

    // An unknown op on a live connection resets it and closes the host side.
    let mut s = h.guest_connect(&l, 800, 5000);
    h.send(Pkt::guest(99, 800, 5000), &[]);
    let (p, _) = h.recv_one();
    assert_eq!((p.op, p.dst_port), (OP_RST, 800));
    assert!(closed(&mut s));
    // So does a second REQUEST, or a RESPONSE, on a live connection.
    for op in [OP_REQUEST, OP_RESPONSE] {
        let mut s = h.guest_connect(&l, 801, 5000);
        h.send(Pkt::guest(op, 801, 5000), &[]);
        let (p, _) = h.recv_one();
        assert_eq!((p.op, p.dst_port), (OP_RST, 801));
        assert!(closed(&mut s));
    }
    assert_eq!(h.conns(), 0);
    assert_eq!(h.stats().bad_chains, 0);
}

#[test]
fn malformed_connect_lines_close_the_host_socket() {
    let mut h = H::new();
    let long = [b'A'; 40];
    for line in [
        &b"CONNECT abc\n"[..],
        b"CONNECT 99999999999\n",
        b"CONNECT\n",
        b"HELLO 5\n",
        &long[..],
        b"CONNECT 5",
    ] {
        let mut s = UnixStream::connect(&h.uds).unwrap();
        s.write_all(line).unwrap();
        if line == b"CONNECT 5" {
            // Half a line, then the client hangs up.
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        h.run();
        assert!(closed(&mut s), "{}", String::from_utf8_lossy(line));
    }
    h.give_rx(2);
    assert!(h.recv().is_empty(), "the guest hears nothing");
    assert_eq!(h.stats().connect_errors, 6);
    assert_eq!(h.conns(), 0);
}

#[test]
fn hostile_tx_chains_are_returned_unused() {
    let mut h = H::new();
    let l = h.listen(5000);
    let hdr = Pkt::guest(OP_REQUEST, 777, 5000).bytes();
    let a = h.alloc(4096);
    h.mem.write_slice(&hdr, GuestAddress(a)).unwrap();
    let mut rw = Pkt::guest(OP_RW, 777, 5000);
    rw.len = 100;
    let b = h.alloc(4096);
    h.mem.write_slice(&rw.bytes(), GuestAddress(b)).unwrap();
    rw.len = MAX_PKT_DATA + 1;
    let c = h.alloc(4096);
    h.mem.write_slice(&rw.bytes(), GuestAddress(c)).unwrap();
    let end = MEM_SIZE as u64;
    let next = VRING_DESC_F_NEXT as u16;
    let cases: Vec<(&str, Vec<D>, bool)> = vec![
        ("outside memory", vec![rd(end + 0x1000, 44)], false),
        ("straddles the end", vec![rd(end - 20, 44)], false),
        ("overflowing address", vec![rd(u64::MAX - 8, 44)], false),
        ("wrapping length", vec![rd(end - 0x1000, u32::MAX)], false),
        ("write-only header", vec![wr(a, 44)], false),
        ("zero-length header", vec![rd(a, 0)], false),
        ("short header", vec![rd(a, 20)], false),
        (
            "data beyond the chain",
            vec![rd(b, 44), rd(b + 64, 10)],
            false,
        ),
        ("no data descriptor", vec![rd(b, 44)], false),
        ("write-only data", vec![rd(b, 44), wr(b + 64, 100)], false),
        ("data outside memory", vec![rd(b, 44), rd(end, 100)], false),
        (
            "len past the maximum",
            vec![rd(c, 44), rd(c + 64, 100)],
            false,
        ),
        (
            "loop",
            vec![D(b, 44, next, 1), D(b + 64, 50, next, 0)],
            true,
        ),
    ];
    for (what, descs, raw) in cases {
        let before = h.stats().bad_chains;
        assert_eq!(h.send_chain(&descs, raw), Some(0), "{what}");
        assert_eq!(h.stats().bad_chains, before + 1, "{what}");
    }
    // A chain longer than the queue: virtio-queue stops following it; the header is read
    // from the first descriptor and the rest is never touched.
    let long: Vec<D> = (0..QSIZE + 4)
        .map(|i| rd(a + u64::from(i) * 64, 44))
        .collect();
    assert_eq!(h.send_chain(&long[..usize::from(QSIZE)], false), Some(0));
    // Nothing reached the host and no connection was made by any of them but the last.
    h.give_rx(4);
    let got = h.recv();
    assert!(got.iter().all(|(p, _)| p.op == OP_RESPONSE), "{got:?}");
    let _keep = l.accept().unwrap();
    // The device still works.
    let mut s = h.guest_connect(&l, 900, 5000);
    h.send(Pkt::guest(OP_RW, 900, 5000), b"fine");
    assert_eq!(read_all(&mut s), b"fine");
}

#[test]
fn hostile_rx_chains_are_returned_unused_and_nothing_else_is_written() {
    let mut h = H::new();
    // Something to deliver: the resets for two refused connects.
    h.send(Pkt::guest(OP_REQUEST, 777, 6000), &[]);
    h.send(Pkt::guest(OP_REQUEST, 778, 6000), &[]);
    let area = h.alloc(0x4000);
    h.mem
        .write_slice(&[0xaa; 0x4000], GuestAddress(area))
        .unwrap();
    let end = MEM_SIZE as u64;
    let write = VRING_DESC_F_WRITE as u16;
    let next = VRING_DESC_F_NEXT as u16;
    let cases: Vec<(&str, Vec<D>, bool)> = vec![
        (
            "read-only header",
            vec![rd(area, 44), wr(area + 0x100, 64)],
            false,
        ),
        ("short header", vec![wr(area + 0x200, 20)], false),
        ("zero-length header", vec![wr(area + 0x300, 0)], false),
        (
            "outside memory",
            vec![wr(end + 0x1000, 44), wr(area, 64)],
            false,
        ),
        ("straddles the end", vec![wr(end - 20, 64)], false),
        ("wrapping length", vec![wr(end - 0x1000, u32::MAX)], false),
        (
            "read-only data",
            vec![wr(area + 0x400, 44), rd(area + 0x500, 64)],
            false,
        ),
        (
            "data too long",
            vec![wr(area + 0x600, 44), wr(area + 0x700, MAX_PKT_DATA + 1)],
            false,
        ),
        ("no data buffer", vec![wr(area + 0xa00, 44)], false),
        (
            "empty data buffer",
            vec![wr(area + 0xb00, 44), wr(area + 0xc00, 0)],
            false,
        ),
    ];
    let n = cases.len();
    for (_, descs, raw) in &cases {
        h.rx.push(descs, *raw);
    }
    // A chain whose second descriptor points back at the first: the device uses the header
    // and data descriptors and never follows the loop.
    h.rx.push(
        &[
            D(area + 0x800, 44, write | next, 1),
            D(area + 0x900, 64, write | next, 0),
        ],
        true,
    );
    h.give_rx(1);
    let used = h.rx.used();
    assert_eq!(used.len(), n + 2);
    for ((what, _, _), (_, len)) in cases.iter().zip(&used) {
        assert_eq!(*len, 0, "{what}");
    }
    for (descs, len) in &used[n..] {
        assert_eq!(*len, 44, "the loop and the good chain get a packet each");
        let mut hdr = [0u8; 44];
        h.mem
            .read_slice(&mut hdr, GuestAddress(descs[0].0))
            .unwrap();
        assert_eq!(Pkt::parse(&hdr).op, OP_RST);
    }
    let mut seen = vec![0u8; 0x4000];
    h.mem.read_slice(&mut seen, GuestAddress(area)).unwrap();
    for (i, b) in seen.iter().enumerate() {
        // Only the loop chain's 44-byte header was written.
        if !(0x800..0x800 + 44).contains(&i) {
            assert_eq!(*b, 0xaa, "guest memory written at offset {i:#x}");
        }
    }
    assert_eq!(h.stats().bad_chains, n as u64);
}

#[test]
fn without_rx_buffers_the_device_stops_reading_the_host() {
    let mut h = H::new();
    let (mut s, hp) = h.host_connect(1234);
    s.write_all(&[5u8; 3000]).unwrap();
    h.run();
    assert_eq!(h.stats().bytes_to_guest, 0);
    {
        let d = h.dev.lock().unwrap();
        let c = d.muxer.conn((hp, 1234)).unwrap();
        assert_eq!(c.registered, None, "parked: not watched until buffers come");
    }
    h.give_rx(2);
    let got = h.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, vec![5u8; 3000]);
    // Drained (the second buffer found nothing more): watched again.
    let d = h.dev.lock().unwrap();
    assert_eq!(
        d.muxer.conn((hp, 1234)).unwrap().registered,
        Some(vmm_sys_util::epoll::EventSet::IN)
    );
}

#[test]
fn reset_connections_closes_all_and_sends_the_event() {
    let mut h = H::new();
    let (mut s1, _) = h.host_connect(1);
    let l = h.listen(5000);
    let mut s2 = h.guest_connect(&l, 777, 5000);
    let mut idle = UnixStream::connect(&h.uds).unwrap();
    h.run();
    let ev = h.alloc(64);
    h.mem.write_slice(&[0xaa; 8], GuestAddress(ev)).unwrap();
    h.ev.push(&[wr(ev, 8)], false);
    h.kick(EVQ);
    assert!(h.ev.used().is_empty(), "no event before a reset");

    h.dev.lock().unwrap().reset_connections();
    h.run();
    let used = h.ev.used();
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].1, 4);
    let mut e = [0u8; 8];
    h.mem.read_slice(&mut e, GuestAddress(ev)).unwrap();
    assert_eq!(e, [0, 0, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa]);
    assert!(closed(&mut s1) && closed(&mut s2) && closed(&mut idle));
    assert_eq!(h.conns(), 0);
    h.give_rx(2);
    assert!(h.recv().is_empty(), "no resets: the event covers them");
    assert_eq!(h.stats().events_sent, 1);

    // A later reset waits for an event buffer.
    h.dev.lock().unwrap().reset_connections();
    h.run();
    assert!(h.ev.used().is_empty());
    h.ev.push(&[wr(ev, 4)], false);
    h.kick(EVQ);
    assert_eq!(h.ev.used().len(), 1);
    // And new connections work afterwards.
    let (_s, _) = h.host_connect(2);
}

#[test]
fn host_close_is_passed_on_and_the_guest_reset_ends_it() {
    let mut h = H::new();
    let l = h.listen(5000);
    let s = h.guest_connect(&l, 777, 5000);
    drop(s);
    h.run();
    h.give_rx(4);
    let got = h.recv();
    let flags = got
        .iter()
        .filter(|(p, _)| p.op == OP_SHUTDOWN)
        .fold(0, |f, (p, _)| f | p.flags);
    assert_eq!(flags, SHUTDOWN_BOTH, "{got:?}");
    assert!(got.iter().all(|(p, _)| p.op == OP_SHUTDOWN));
    assert_eq!(h.conns(), 1);
    h.send(Pkt::guest(OP_RST, 777, 5000), &[]);
    assert_eq!(h.conns(), 0);
    h.give_rx(1);
    assert!(h.recv().is_empty(), "no reset answers a reset");
}

#[test]
fn half_close_each_way() {
    let mut h = H::new();
    let l = h.listen(5000);
    let mut s = h.guest_connect(&l, 777, 5000);
    // The guest will send no more: the host sees end of file but can still talk.
    let mut shut = Pkt::guest(OP_SHUTDOWN, 777, 5000);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert!(closed(&mut s));
    h.host_sends(&mut s, 777, 5000, b"bye");
    // Now the host is done too: SHUTDOWN, then the device resets (both ways done).
    s.shutdown(std::net::Shutdown::Write).unwrap();
    h.run();
    h.give_rx(3);
    let ops: Vec<(u16, u32)> = h.recv().iter().map(|(p, _)| (p.op, p.flags)).collect();
    assert_eq!(ops, [(OP_SHUTDOWN, SHUTDOWN_SEND), (OP_RST, 0)]);
    assert_eq!(h.conns(), 0);
}

#[test]
fn guest_data_buffered_before_close_still_reaches_the_host() {
    let mut h = H::new();
    let l = h.listen(5000);
    let mut s = h.guest_connect(&l, 777, 5000);
    let chunk = vec![3u8; 64 * 1024];
    // More than the host socket takes at once.
    for _ in 0..6 {
        h.send(Pkt::guest(OP_RW, 777, 5000), &chunk);
    }
    let mut shut = Pkt::guest(OP_SHUTDOWN, 777, 5000);
    shut.flags = SHUTDOWN_BOTH;
    h.send(shut, &[]);
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    s.set_nonblocking(true).unwrap();
    for _ in 0..1000 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => h.run(),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, 6 * 64 * 1024);
    h.give_rx(1);
    let got = h.recv();
    assert_eq!(got.last().map(|(p, _)| p.op), Some(OP_RST));
    assert_eq!(h.conns(), 0);
}

#[test]
fn half_open_connections_time_out() {
    let t = Timeouts {
        connect_line: Duration::from_millis(300),
        request: Duration::from_millis(300),
        shutdown: Duration::from_millis(300),
    };
    let mut h = H::with(Some(t), false);
    // A client that never sends its line.
    let mut silent = UnixStream::connect(&h.uds).unwrap();
    // A guest that never answers the request.
    let mut s = UnixStream::connect(&h.uds).unwrap();
    s.write_all(b"CONNECT 42\n").unwrap();
    h.run();
    let (req, _) = h.recv_one();
    assert_eq!(req.op, OP_REQUEST);
    // A guest that never resets after the host went away.
    let l = h.listen(5000);
    drop(h.guest_connect(&l, 777, 5000));
    h.run();
    h.give_rx(2);
    assert_eq!(h.recv().len(), 2, "shutdown both ways");

    std::thread::sleep(Duration::from_millis(700));
    h.run();
    assert!(closed(&mut silent));
    assert!(closed(&mut s));
    h.give_rx(4);
    let mut rsts: Vec<u32> = h
        .recv()
        .iter()
        .map(|(p, _)| {
            assert_eq!(p.op, OP_RST);
            p.dst_port
        })
        .collect();
    rsts.sort_unstable();
    assert_eq!(rsts, [42, 777]);
    assert_eq!(h.conns(), 0);
    assert_eq!(h.stats().timeouts, 3);
    // The timer stops once nothing waits.
    std::thread::sleep(Duration::from_millis(150));
    h.run();
}

#[test]
fn many_connections_stay_apart() {
    let mut h = H::with(None, true);
    let mut clients = Vec::new();
    for i in 0..20u32 {
        let (s, hp) = h.host_connect(100 + i % 3);
        clients.push((s, hp, 100 + i % 3));
    }
    let mut ports: Vec<u32> = clients.iter().map(|c| c.1).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 20, "host ports are unique");
    let tokens = h.dev.lock().unwrap().muxer.tokens();
    assert_eq!(tokens.len(), 20);
    assert!(tokens.iter().all(|&t| t >= TOKEN_BACKEND));

    for (s, hp, _) in &mut clients {
        s.write_all(format!("from {hp}").as_bytes()).unwrap();
    }
    h.run();
    h.give_rx(20);
    let got = h.recv();
    assert_eq!(got.len(), 20);
    for (p, data) in got {
        assert_eq!(data, format!("from {}", p.src_port).as_bytes());
        h.send(
            Pkt::guest(OP_RW, p.dst_port, p.src_port),
            format!("to {}", p.src_port).as_bytes(),
        );
    }
    for (s, hp, _) in &mut clients {
        assert_eq!(read_all(s), format!("to {hp}").as_bytes());
    }
    assert_eq!(h.stats().conns_opened, 20);
}

#[test]
fn driver_reset_closes_connections_and_stops_the_device() {
    let mut h = H::new();
    let (mut s, _) = h.host_connect(1);
    h.dev.lock().unwrap().reset();
    h.run();
    assert!(closed(&mut s));
    assert_eq!(h.conns(), 0);
    // While reset, host clients wait in the backlog and the loop stays quiet.
    let _c = UnixStream::connect(&h.uds).unwrap();
    h.run();
}

#[test]
fn resets_waiting_for_rx_buffers_hold_back_tx() {
    let mut h = H::new();
    // 300 packets for connections that do not exist, and no RX buffers: each wants a reset.
    let mut offered = 0u32;
    let mut used = 0;
    for _ in 0..6 {
        for _ in 0..50 {
            let a = h.alloc(44);
            let p = Pkt::guest(OP_SHUTDOWN, 1000 + offered, 5000);
            h.mem.write_slice(&p.bytes(), GuestAddress(a)).unwrap();
            h.tx.push(&[rd(a, 44)], false);
            offered += 1;
        }
        h.kick(TXQ);
        used += h.tx.used().len();
    }
    assert_eq!(used, 256, "TX stops once 256 resets wait");
    let mut ports = Vec::new();
    for _ in 0..20 {
        h.give_rx(30);
        ports.extend(h.recv().iter().map(|(p, _)| {
            assert_eq!(p.op, OP_RST);
            p.dst_port
        }));
        used += h.tx.used().len();
        if ports.len() == 300 {
            break;
        }
    }
    assert_eq!(used, 300, "TX resumed as resets drained");
    assert_eq!(ports, (1000..1300).collect::<Vec<u32>>());
}

#[test]
fn a_full_host_backlog_refuses_instead_of_blocking() {
    let mut h = H::new();
    let l = h.listen(5000);
    let mut p = h.uds.clone().into_os_string();
    p.push("_5000");
    // Fill the listener's backlog without accepting.
    let mut held = Vec::new();
    loop {
        match super::unix::connect_nonblocking(Path::new(&p)) {
            Ok(s) => held.push(s),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
                break;
            }
        }
        assert!(held.len() < 100_000);
    }
    h.send(Pkt::guest(OP_REQUEST, 777, 5000), &[]);
    let (p, _) = h.recv_one();
    assert_eq!((p.op, p.dst_port), (OP_RST, 777));
    drop(l);
}

// --- snapshot ---

mod snapshot {
    use super::*;
    use crate::devices::state::{DeviceSnapshot, StateError, TransportSnapshot};
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_utils::{driver_init, through_json, transport, TestRing};

    /// A test guest whose driver set the device up through a virtio-mmio window (`state`:
    /// restored from a snapshot instead), on `rings` in `mem` (fresh ones when `None`).
    fn h_on(
        mem: Option<&'static GuestMemoryMmap>,
        rings: Option<(Ring, Ring, Ring)>,
        cid: u64,
        state: Option<&TransportSnapshot>,
    ) -> Result<(H, MmioTransport), StateError> {
        let dir = TempDir::new();
        let uds = dir.0.join("v.sock");
        let mem: &'static GuestMemoryMmap = mem.unwrap_or_else(|| {
            Box::leak(Box::new(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            ))
        });
        let (rx, tx, ev) = rings.unwrap_or_else(|| {
            (
                Ring::new(mem, 0x1000),
                Ring::new(mem, 0x4000),
                Ring::new(mem, 0x7000),
            )
        });
        let dev = Vsock::new(&VsockConfig {
            cid: cid as u32,
            uds: uds.clone(),
        })
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let mut em = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
        em.add_subscriber(dev.clone());
        let (mut t, _irq, evts) = transport(dev.clone(), mem);
        match state {
            None => {
                // Same layout as `Ring`: table at base, avail at +0x400, used at +0x800.
                let rings: Vec<TestRing> = [0x1000, 0x4000, 0x7000]
                    .iter()
                    .map(|&b| TestRing::new(mem, b, QSIZE))
                    .collect();
                driver_init(&mut t, VIRTIO_F_VERSION_1, &rings);
            }
            Some(s) => t.restore(s)?,
        }
        let evts = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let mut h = H {
            _dir: dir,
            uds,
            mem,
            rx,
            tx,
            ev,
            dev,
            em,
            evts,
            next_buf: BUF_START,
        };
        h.run();
        Ok((h, t))
    }

    /// A running device with a host connection, an event buffer and RX buffers from the guest
    /// and a TX packet not yet taken; the snapshot of it and the guest's rings.
    fn saved() -> (
        TransportSnapshot,
        &'static GuestMemoryMmap,
        (Ring, Ring, Ring),
        u64,
    ) {
        let (mut h, t) = h_on(None, None, CID, None).unwrap();
        let (mut s1, hp) = h.host_connect(1);
        h.host_sends(&mut s1, 1, hp, b"before");
        let ev = h.alloc(64);
        h.mem.write_slice(&[0xaa; 8], GuestAddress(ev)).unwrap();
        h.ev.push(&[wr(ev, 8)], false);
        h.kick(EVQ);
        assert!(h.ev.used().is_empty());
        h.give_rx(2);
        assert!(
            h.recv().is_empty(),
            "nothing to send: the buffers stay the guest's"
        );
        // Paused: the guest queued data for the host that the device has not taken.
        let a = h.alloc(44 + 5);
        let mut pkt = Pkt::guest(OP_RW, 1, hp);
        pkt.len = 5;
        h.mem.write_slice(&pkt.bytes(), GuestAddress(a)).unwrap();
        h.mem.write_slice(b"after", GuestAddress(a + 44)).unwrap();
        h.tx.push(&[rd(a, 44), rd(a + 44, 5)], false);
        let s = through_json(&t.save());
        assert_eq!(h.conns(), 1);
        let H {
            mem,
            rx,
            tx,
            ev: evr,
            ..
        } = h;
        (s, mem, (rx, tx, evr), ev)
    }

    #[test]
    fn restore_starts_without_connections_and_sends_a_transport_reset() {
        let (s, mem, rings, ev) = saved();
        assert_eq!(
            s.device,
            DeviceSnapshot::Vsock {
                cid: CID,
                active: true
            }
        );
        assert_eq!(s.queues[TXQ].next_avail, s.queues[TXQ].next_used);

        // Another process, another host socket path.
        let (mut h, t) = h_on(Some(mem), Some(rings), CID, Some(&s)).unwrap();
        assert!(t.is_activated());
        assert_eq!(h.conns(), 0);
        let used = h.ev.used();
        assert_eq!(
            used.len(),
            1,
            "the transport reset went into the waiting buffer"
        );
        assert_eq!(used[0].1, 4);
        let mut e = [0u8; 8];
        h.mem.read_slice(&mut e, GuestAddress(ev)).unwrap();
        assert_eq!(
            e,
            [0, 0, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa],
            "EVENT_TRANSPORT_RESET"
        );
        assert_eq!(h.stats().events_sent, 1);
        // The TX packet queued before the snapshot was taken; its connection is gone, so the
        // guest gets a reset for it in one of the RX buffers given before the snapshot.
        assert_eq!(h.tx.used().len(), 1);
        assert_eq!(
            h.dev.lock().unwrap().queue_states()[TXQ].next_used,
            s.queues[TXQ].next_used + 1,
            "the used ring continues"
        );
        let got = h.recv();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, OP_RST);
        // New connections work.
        let (_s2, _) = h.host_connect(2);
    }

    #[test]
    fn the_event_waits_for_a_buffer_and_a_driver_that_was_not_running_gets_none() {
        let (mut s, mem, rings, _) = saved();
        // Use up the event buffer so none is waiting at restore.
        s.queues[EVQ].next_avail = s.queues[EVQ].next_avail.wrapping_add(1);
        s.queues[EVQ].next_used = s.queues[EVQ].next_used.wrapping_add(1);
        let (mut h, _t) = h_on(Some(mem), Some(rings), CID, Some(&s)).unwrap();
        assert_eq!(h.stats().events_sent, 0);
        let ev = h.alloc(8);
        h.ev.push(&[wr(ev, 4)], false);
        h.kick(EVQ);
        assert_eq!(
            h.stats().events_sent,
            1,
            "sent once the guest gives a buffer"
        );

        let dir = TempDir::new();
        let mut dev = Vsock::new(&VsockConfig {
            cid: CID as u32,
            uds: dir.0.join("x.sock"),
        })
        .unwrap();
        dev.restore_state(&DeviceSnapshot::Vsock {
            cid: CID,
            active: false,
        })
        .unwrap();
        assert!(!dev.reset_event_due);
    }

    #[test]
    fn another_cid_or_kind_is_refused() {
        let (s, mem, rings, _) = saved();
        let err = h_on(Some(mem), Some(rings), CID + 1, Some(&s))
            .err()
            .unwrap();
        assert!(matches!(err, StateError::Mismatch(_)), "{err}");
        assert!(err.to_string().contains('3') && err.to_string().contains('4'));

        let dir = TempDir::new();
        let mut dev = Vsock::new(&VsockConfig {
            cid: CID as u32,
            uds: dir.0.join("k.sock"),
        })
        .unwrap();
        assert!(matches!(
            dev.restore_state(&DeviceSnapshot::Rng {}),
            Err(StateError::Kind { .. })
        ));
    }
}

/// The vsock data paths under the real seccomp filters: the VMM thread's for the event loop
/// (host and guest connections, data both ways, shutdowns, the timer), the vCPU thread's for
/// a reset (which a guest's MMIO write makes on its vCPU thread). Run in a child process:
/// a call outside a list kills it with SIGSYS.
#[test]
fn data_paths_run_under_the_seccomp_filters() {
    crate::seccomp::under_filter::run_child(
        "devices::virtio::vsock::tests::seccomp_child_data_paths",
    );
}

#[test]
#[ignore = "run by data_paths_run_under_the_seccomp_filters in a child process"]
fn seccomp_child_data_paths() {
    use crate::seccomp::{under_filter, ThreadKind};
    if !under_filter::is_child("devices::virtio::vsock::tests::seccomp_child_data_paths") {
        return;
    }
    // Made before the filters: the device's listener and directory, a host listener.
    let mut h = H::with(
        Some(Timeouts {
            connect_line: Duration::from_millis(200),
            ..Timeouts::default()
        }),
        false,
    );
    let l = h.listen(5000);
    let h = under_filter::filtered(ThreadKind::Vmm, move || {
        // Host → guest: the client's CONNECT line, data both ways, a second client.
        let (mut s, hp) = h.host_connect(1234);
        h.host_sends(&mut s, 1234, hp, b"hello");
        h.guest_sends(&mut s, 1234, hp, b"world");
        // Guest → host: connect to PATH_5000, data both ways, the guest shuts down.
        let mut g = h.guest_connect(&l, 777, 5000);
        h.guest_sends(&mut g, 777, 5000, b"ping");
        h.host_sends(&mut g, 777, 5000, b"pong");
        let mut shut = Pkt::guest(OP_SHUTDOWN, 777, 5000);
        shut.flags = SHUTDOWN_BOTH;
        h.send(shut, &[]);
        let (p, _) = h.recv_one();
        assert_eq!(p.op, OP_RST);
        assert!(closed(&mut g));
        // A client that never sends its line is closed by the timer.
        let mut idle = UnixStream::connect(&h.uds).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        h.run();
        std::thread::sleep(Duration::from_millis(400));
        h.run();
        assert!(closed(&mut idle), "the connect-line timeout closes it");
        // The host closes its side.
        drop(s);
        h.run();
        h.give_rx(4);
        assert!(h.recv().iter().any(|(p, _)| p.op == OP_SHUTDOWN));
        // A connection the reset below must close.
        let (s2, _) = h.host_connect(99);
        (h, s2)
    });
    // The guest resets the device (status 0): on a vCPU thread, through the MMIO transport.
    let dev = h.0.dev.clone();
    under_filter::filtered(ThreadKind::Vcpu, move || {
        crate::devices::virtio::VirtioDevice::reset(&mut *dev.lock().unwrap());
    });
    let (h, mut s2) = h;
    assert!(closed(&mut s2), "the reset closed the host connection");
    assert_eq!(h.conns(), 0);
}
