//! What the probe guest's drivers put on the host side: the count log's records on a disk
//! image, and test frames through a TAP (an AF_PACKET socket on the host end).

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const SECTOR: usize = 512;
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
pub const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// "LEDGELOG": bytes 0..8 of every record.
pub const LOG_MAGIC: &[u8; 8] = b"LEDGELOG";

/// A valid record of the count log (README.md, "The count log").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogRecord {
    pub seq: u64,
    pub run: u64,
    pub sector: u64,
}

/// The record in `sec`, if it is one: magic, filler and checksum all valid.
pub fn parse_record(sec: &[u8]) -> Option<LogRecord> {
    let w: Vec<u64> = sec
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    if w.len() != 64 || &sec[..8] != LOG_MAGIC {
        return None;
    }
    let (seq, run, sector) = (w[1], w[2], w[3]);
    let filler_ok = (5..63).all(|i| w[i] == seq ^ run ^ (i as u64).wrapping_mul(GOLDEN));
    let sum = w[..63]
        .iter()
        .fold(FNV_BASIS, |h, &x| (h ^ x).wrapping_mul(FNV_PRIME));
    (filler_ok && sum == w[63]).then_some(LogRecord { seq, run, sector })
}

/// A disk image holding the count log: the record of count n is in sector n mod capacity.
pub struct CountLog(Vec<u8>);

impl CountLog {
    pub fn read(disk: &std::path::Path) -> CountLog {
        CountLog(fs::read(disk).unwrap_or_else(|e| panic!("read {}: {e}", disk.display())))
    }

    /// Sectors, so records, the disk holds.
    pub fn capacity(&self) -> u64 {
        (self.0.len() / SECTOR) as u64
    }

    /// The valid record in count `n`'s sector, whatever count it is for.
    pub fn record(&self, n: u64) -> Option<LogRecord> {
        let off = (n % self.capacity()) as usize * SECTOR;
        parse_record(&self.0[off..off + SECTOR])
    }

    /// Every count in `counts` was printed, so its record must be there: intact, for that
    /// count, from run `run`. `counts` must fit on the disk without wrapping.
    pub fn assert_intact(&self, counts: std::ops::RangeInclusive<u64>, run: u64, what: &str) {
        assert!(
            counts.end() - counts.start() < self.capacity(),
            "{what}: the log wrapped; use a bigger disk"
        );
        for n in counts {
            let r = self.record(n).unwrap_or_else(|| {
                panic!("{what}: count {n} was printed, its record is missing or damaged")
            });
            assert_eq!((r.seq, r.run), (n, run), "{what}: record of count {n}");
        }
    }
}

pub const ETHERTYPE: u16 = 0x88b5;
pub const GUEST_MAC: [u8; 6] = [0x02, 0x4c, 0x45, 0x44, 0x47, 0x01];
pub const HOST_MAC: [u8; 6] = [0x02, 0x4c, 0x45, 0x44, 0x47, 0x02];

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when running as root; otherwise prints that `test` skipped, and why, and returns false.
pub fn require_root(test: &str, why: &str) -> bool {
    if is_root() {
        return true;
    }
    println!("[{test}] SKIPPED: {why}");
    false
}

/// The gate of a test that echoes frames through a TAP: KVM (see `require_kvm`), and root for
/// the TAP and the AF_PACKET socket; false (with the reason printed) when the test skips.
pub fn require_tap_test(test: &str) -> bool {
    super::require_kvm(test)
        && require_root(
            test,
            "needs root to create a TAP interface and an AF_PACKET socket",
        )
}

/// GUEST_MAC as `--net mac=` takes it (02:4c:...).
pub fn guest_mac() -> String {
    GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `ledge run` (with `extra` arguments) with the probe's net-echo scenario on one `--net NET`
/// card, once the guest says its card is ready (or that it failed): the guest, and that line.
pub fn spawn_net_echo(net: &str, extra: &[&str]) -> (super::Guest, String) {
    let mut args = vec![
        "run",
        "--console",
        "stdio",
        "--net",
        net,
        "--cmdline",
        "probe=net-echo net_frames=100000000",
    ];
    args.extend_from_slice(extra);
    let mut guest = super::Guest::spawn(&args);
    let ready = guest
        .wait_line(&["net: dev=0", "net: error="], Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the guest never said it was ready: {:?}", guest.seen));
    (guest, ready)
}

/// Ends the net-echo scenario: a STOP frame on `sock`, then the guest's `net: echoed=` line
/// (returned), which must say the guest ended on the STOP, and ledge's exit status 0.
pub fn stop_net_echo(guest: &mut super::Guest, sock: &RawSocket) -> String {
    sock.send(&stop_frame());
    let done = guest
        .wait_line(&["net: echoed="], Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the guest did not stop on STOP: {:?}", guest.seen));
    assert!(done.split_whitespace().any(|w| w == "end=stop"), "{done}");
    assert_eq!(
        guest.wait_exit(Duration::from_secs(30)),
        Some(0),
        "ledge must exit 0"
    );
    done
}

pub fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A TAP interface created for one test and deleted when dropped.
pub struct Tap(pub String);

impl Tap {
    pub fn create(name: &str) -> Tap {
        let _ = ip(&["link", "del", name]);
        assert!(
            ip(&["tuntap", "add", "dev", name, "mode", "tap"]),
            "ip tuntap add {name}"
        );
        let tap = Tap(name.to_string());
        // No IPv6 chatter from the host kernel: the guest would echo it too.
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        assert!(ip(&["link", "set", name, "up"]), "ip link set {name} up");
        tap
    }

    /// A TAP named after this process, or None (with the reason printed) when one cannot be
    /// made here: not root, or no TUN support.
    pub fn try_create(test: &str) -> Option<Tap> {
        if !is_root() {
            println!("[{test}] NOTE: not root: the network part is skipped");
            return None;
        }
        let name = format!("lgav{}", std::process::id() % 100_000);
        let _ = ip(&["link", "del", &name]);
        if !ip(&["tuntap", "add", "dev", &name, "mode", "tap"]) {
            println!("[{test}] NOTE: `ip tuntap add` failed: the network part is skipped");
            return None;
        }
        let _ = fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let _ = ip(&["link", "set", &name, "up"]);
        Some(Tap(name))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.0]);
    }
}

/// An AF_PACKET socket bound to one interface, for EtherType 0x88b5 only.
pub struct RawSocket {
    pub fd: libc::c_int,
    pub ifindex: libc::c_int,
}

impl RawSocket {
    pub fn bind(ifname: &str) -> RawSocket {
        let proto = ETHERTYPE.to_be();
        // SAFETY: plain socket(2) call; the fd is owned by RawSocket.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: name is a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
        assert!(ifindex > 0, "no interface {ifname}");
        let s = RawSocket { fd, ifindex };
        let addr = s.addr();
        // SAFETY: addr is a valid sockaddr_ll of the size given.
        let r = unsafe {
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            r,
            0,
            "bind to {ifname}: {}",
            std::io::Error::last_os_error()
        );
        s
    }

    pub fn addr(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        a.sll_family = libc::AF_PACKET as u16;
        a.sll_protocol = ETHERTYPE.to_be();
        a.sll_ifindex = self.ifindex;
        a
    }

    pub fn send(&self, frame: &[u8]) {
        // SAFETY: frame is a valid buffer of frame.len() bytes.
        let n = unsafe { libc::send(self.fd, frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame that came in on the interface (not one sent from this host), within
    /// `limit`; None on timeout.
    pub fn recv(&self, buf: &mut [u8], limit: Duration) -> Option<usize> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as libc::c_int) };
            if r <= 0 {
                if r < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return None;
            }
            // SAFETY: as in addr().
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut flen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buf and from are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut flen,
                )
            };
            assert!(n >= 0, "recvfrom: {}", std::io::Error::last_os_error());
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Some(n as usize);
        }
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: fd is ours.
        unsafe { libc::close(self.fd) };
    }
}

/// Frame `seq`: 60..=1514 bytes, to the guest, EtherType 0x88b5, payload = seq, length,
/// filler from seq, and an FNV-1a-32 of all that at the end.
pub fn test_frame(seq: u32) -> Vec<u8> {
    let len = 60 + (seq as usize * 7919) % (1514 - 60 + 1);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&(len as u16).to_le_bytes());
    let mut x = seq.wrapping_mul(2_654_435_761) | 1;
    while f.len() < len - 4 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    let sum = f[14..].iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    f.extend_from_slice(&sum.to_le_bytes());
    f
}

pub fn stop_frame() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(b"STOP");
    f.resize(60, 0);
    f
}

/// Describes what came back instead of frame `seq`.
pub fn describe(got: &[u8]) -> String {
    if got.len() >= 20 && got[12..14] == ETHERTYPE.to_be_bytes() {
        let seq = u32::from_le_bytes(got[14..18].try_into().unwrap());
        format!("{} bytes claiming seq {seq}", got.len())
    } else {
        format!("{} bytes, not a test frame", got.len())
    }
}

/// Sends test frames 0..n through `sock`, at most `window` unanswered at a time, and checks that
/// each comes back unchanged and in order; with `stop_at`, a STOP frame goes out before that
/// frame (a guest that must not stop on it). Returns the bytes echoed.
pub fn echo_frames(sock: &RawSocket, n: u32, window: u32, stop_at: Option<u32>) -> u64 {
    let mut buf = vec![0u8; 65536];
    let (mut sent, mut got, mut bytes) = (0u32, 0u32, 0u64);
    while got < n {
        while sent < n && sent - got < window {
            if stop_at == Some(sent) {
                sock.send(&stop_frame());
            }
            sock.send(&test_frame(sent));
            sent += 1;
        }
        let Some(len) = sock.recv(&mut buf, Duration::from_secs(10)) else {
            panic!("no echo of frame {got} within 10 s ({sent} sent)");
        };
        let want = test_frame(got);
        assert!(
            buf[..len] == want[..],
            "echo {got}: expected {} bytes unchanged, got {}",
            want.len(),
            describe(&buf[..len])
        );
        got += 1;
        bytes += len as u64;
    }
    bytes
}
