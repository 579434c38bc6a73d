//! The vsock wire format (virtio 1.x §5.10.6): header constants and the one place where the
//! device writes a header into a guest RX buffer.
//!
//! Parsing and guest-memory checks are virtio-vsock's `VsockPacket` (`from_tx_virtq_chain`,
//! `from_rx_virtq_chain`); this module only adds the numbers the spec defines and `OutHdr`, a
//! plain description of a packet the device is about to give the guest. Every packet the device
//! sends is a STREAM packet from the host CID to the guest CID.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

/// The host's context id; the guest reaches the host (and so this device's backend) there.
pub const HOST_CID: u64 = 2;
/// The only socket type this device carries.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// OP_SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// Event queue: the guest must drop every connection and re-read the CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// The header length as the used-ring length type.
pub const HDR_LEN: u32 = PKT_HEADER_SIZE as u32;

/// A packet the device sends the guest: everything but the CIDs and the type, which are fixed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutHdr {
    /// Host-side port.
    pub src_port: u32,
    /// Guest-side port.
    pub dst_port: u32,
    pub op: u16,
    pub flags: u32,
    pub len: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl OutHdr {
    /// A header-only packet of `op` for the connection (host `src_port`, guest `dst_port`).
    pub fn new(op: u16, src_port: u32, dst_port: u32) -> Self {
        OutHdr {
            src_port,
            dst_port,
            op,
            ..OutHdr::default()
        }
    }
}

/// Writes `hdr` as the header of an RX packet for the guest `guest_cid`. The header buffer
/// was checked by `from_rx_virtq_chain` (writable, in guest memory, at least 44 bytes).
pub fn write_header<B: BitmapSlice>(pkt: &mut VsockPacket<'_, B>, guest_cid: u64, hdr: &OutHdr) {
    pkt.set_src_cid(HOST_CID)
        .set_dst_cid(guest_cid)
        .set_src_port(hdr.src_port)
        .set_dst_port(hdr.dst_port)
        .set_type(TYPE_STREAM)
        .set_op(hdr.op)
        .set_flags(hdr.flags)
        .set_len(hdr.len)
        .set_buf_alloc(hdr.buf_alloc)
        .set_fwd_cnt(hdr.fwd_cnt);
}
