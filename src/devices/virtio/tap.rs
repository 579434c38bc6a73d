//! The host side of virtio-net: a Linux TAP device opened through /dev/net/tun.
//!
//! Why it exists: the TAP ioctls are the only `unsafe` the net device needs, so they live
//! here, each in its own small function. The fd is opened non-blocking (the VMM thread never
//! blocks on it) with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every read and write carries a
//! `virtio_net_hdr_v1` (12 bytes, `TUNSETVNETHDRSZ`) in front of the Ethernet frame, so the
//! guest's checksum and segmentation offload metadata passes through unchanged.
//!
//! Ordering: `TUNSETIFF` first (it attaches the fd to the interface, creating it when it does
//! not exist and the caller has CAP_NET_ADMIN), then the header size, then offloads. Offloads
//! (`TUNSETOFFLOAD`) say what the *reader* of the TAP — the guest — can take: they start at
//! none and are set from the features the guest acked, so the kernel never sends a guest a
//! GSO frame or a partial checksum it did not ask for. The vnet header is in native byte order
//! (no `TUNSETVNETLE`), which on x86_64 is the little endian virtio 1.x wants.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::raw::{c_int, c_short, c_uint, c_ulong};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Size of `virtio_net_hdr_v1` (virtio 1.x §5.1.6), in front of every frame on the TAP.
pub const VNET_HDR_LEN: usize = 12;

const TUN_PATH: &str = "/dev/net/tun";
const IFNAMSIZ: usize = 16;

/// Errors opening or configuring a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {0:?}: 1 to 15 bytes, no NUL")]
    Name(String),
    #[error("cannot open {TUN_PATH}: load the tun module (modprobe tun) and give Ledge access")]
    OpenTun(#[source] io::Error),
    #[error(
        "not permitted to attach to TAP {0}: create it for this user first \
         (ip tuntap add dev {0} mode tap user USER) or give Ledge CAP_NET_ADMIN"
    )]
    NotPermitted(String),
    #[error("TAP {0} is busy: another process (another VM?) has it open")]
    Busy(String),
    #[error("interface {0} exists but is not a single-queue TAP: delete it or use another name")]
    NotATap(String),
    #[error("cannot attach to TAP {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name} refuses a {VNET_HDR_LEN}-byte virtio-net header")]
    VnetHdr {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name} refuses offloads {flags:#x}")]
    Offload {
        name: String,
        flags: c_uint,
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF uses it: the name, then `ifr_flags` at the start of the union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: c_short,
    _pad: [u8; 22],
}

// The kernel copies sizeof(struct ifreq) == 40 bytes in and out on x86_64.
const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// An open, attached TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens /dev/net/tun non-blocking and attaches to the TAP `name` (created if missing and
    /// permitted), with a 12-byte vnet header and no offloads yet.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as c_short,
            _pad: [0; 22],
        };
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::Name(name.to_string()));
        }
        req.name[..bytes.len()].copy_from_slice(bytes);

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        set_iff(&file, &mut req).map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::NotPermitted(name.to_string()),
            Some(libc::EBUSY) => TapError::Busy(name.to_string()),
            Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
            _ => TapError::Attach {
                name: name.to_string(),
                source: e,
            },
        })?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        set_vnet_hdr_size(&tap.file, VNET_HDR_LEN as c_int).map_err(|source| {
            TapError::VnetHdr {
                name: tap.name.clone(),
                source,
            }
        })?;
        // An existing TAP may keep offloads from its previous user: start with none.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Finds the largest offload set (for frames *to* the guest) this kernel accepts, from
    /// CSUM+TSO4+TSO6+UFO down to nothing, and leaves the TAP with none set.
    pub fn probe_offloads(&self) -> c_uint {
        const CANDIDATES: [c_uint; 4] = [
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6,
            libc::TUN_F_CSUM,
            0,
        ];
        let accepted = CANDIDATES
            .into_iter()
            .find(|&f| set_offload(&self.file, f).is_ok())
            .unwrap_or(0);
        if let Err(e) = self.set_offload(0) {
            log::warn!("{e}");
        }
        accepted
    }

    /// Sets which offloads (`TUN_F_*`) frames read from the TAP may carry.
    pub fn set_offload(&self, flags: c_uint) -> Result<(), TapError> {
        set_offload(&self.file, flags).map_err(|source| TapError::Offload {
            name: self.name.clone(),
            flags,
            source,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fd, for reads, writes and epoll.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_iff(file: &File, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a live, exclusively
    // borrowed `#[repr(C)]` struct of exactly that size (checked above), with a NUL-terminated
    // name. The fd is a /dev/net/tun fd we own.
    check(unsafe { ioctl_with_mut_ref(file, libc::TUNSETIFF as c_ulong, req) })
}

fn set_vnet_hdr_size(file: &File, size: c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one `int` from the pointer; `size` lives across the call.
    check(unsafe { ioctl_with_ref(file, libc::TUNSETVNETHDRSZ as c_ulong, &size) })
}

fn set_offload(file: &File, flags: c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no user memory.
    check(unsafe { ioctl_with_val(file, libc::TUNSETOFFLOAD as c_ulong, c_ulong::from(flags)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for bad in ["", "0123456789abcdef", "a\0b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = TapError::NotPermitted("tap7".into()).to_string();
        assert!(e.contains("tap7") && e.contains("ip tuntap add"), "{e}");
        let e = TapError::Busy("tap7".into()).to_string();
        assert!(e.contains("tap7") && e.contains("busy"), "{e}");
    }
}
