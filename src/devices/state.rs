//! Device state as it goes into a snapshot.
//!
//! These are Ledge's own serde types, not the device structs: a snapshot file written by one
//! Ledge version must be readable by every later one, so a field added later gets
//! `#[serde(default)]` and nothing is ever renamed. Every `restore` treats the state as
//! untrusted input (the file may be corrupt or hand-made): sizes, feature bits and queue
//! addresses are checked, and a bad value is a `StateError`, never a panic.
//!
//! What is saved, and what is not:
//! - a virtio-mmio window (`TransportSnapshot`): every register, each queue's registers and ring
//!   positions, InterruptStatus and the config generation, and the device's own state. The ring
//!   positions are the device's (its copies of the queues advance, the transport's do not), with
//!   any chain the device took but had not returned put back in the available ring, so the
//!   restored device takes it again;
//! - per device (`DeviceSnapshot`): what the guest has seen and the host must keep agreeing
//!   with (block: capacity and read-only flag; net: the MAC; vsock: the CID; balloon: target,
//!   actual, statistics interval). Counters and metrics start from zero; host-side connections
//!   (vsock) and a frame read from the TAP but not yet delivered (net) do not survive;
//! - COM1 (`SerialSnapshot`): the 8250 registers and its receive FIFO;
//! - the i8042 (`I8042Snapshot`): controller and keyboard state, with every byte in flight.

use serde::{Deserialize, Serialize};

/// Errors putting saved state back into a device.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("saved state is for a {saved} device, this one is {here}")]
    Kind { saved: String, here: String },
    #[error("saved state does not fit this device: {0}")]
    Mismatch(String),
    #[error("saved queue {index} is invalid: {why}")]
    Queue { index: usize, why: String },
    #[error("device activation on restore failed")]
    Activate(#[from] crate::devices::virtio::ActivateError),
    #[error("cannot restore the {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One virtqueue's registers and ring positions (virtio-queue's `QueueState`, serialisable).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<&QueueSnapshot> for virtio_queue::QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio window: the transport registers, its queues, the interrupt line and the device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device: DeviceSnapshot,
}

/// What each virtio device keeps beyond its transport.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceSnapshot {
    Rng {},
    Block {
        /// In 512-byte sectors, as the guest read it from the configuration space.
        capacity: u64,
        read_only: bool,
    },
    Net {
        /// The MAC address the guest read from the configuration space.
        mac: [u8; 6],
    },
    Vsock {
        /// The guest's context id.
        cid: u64,
        /// The driver was running: after restore it is sent a transport reset.
        active: bool,
    },
    Balloon {
        /// Target balloon size in 4 KiB pages (config `num_pages`).
        num_pages: u32,
        /// Pages the driver said it holds (config `actual`).
        actual: u32,
        /// Whether the device has a statistics queue.
        stats_enabled: bool,
        stats_interval_s: u32,
        /// The guest's last statistics report.
        #[serde(default)]
        latest_stats: Option<crate::devices::virtio::balloon::BalloonStats>,
    },
}

impl DeviceSnapshot {
    /// The device kind, as errors name it.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSnapshot::Rng {} => "rng",
            DeviceSnapshot::Block { .. } => "block",
            DeviceSnapshot::Net { .. } => "net",
            DeviceSnapshot::Vsock { .. } => "vsock",
            DeviceSnapshot::Balloon { .. } => "balloon",
        }
    }

    /// The `StateError::Kind` for restoring this state into a device of kind `here`.
    pub fn wrong_kind(&self, here: &str) -> StateError {
        StateError::Kind {
            saved: self.kind().to_string(),
            here: here.to_string(),
        }
    }
}

/// The name of a virtio device type, as errors name it.
pub fn device_type_name(device_type: u32) -> String {
    use crate::devices::virtio::{TYPE_BALLOON, TYPE_BLOCK, TYPE_NET, TYPE_RNG, TYPE_VSOCK};
    match device_type {
        TYPE_NET => "net".into(),
        TYPE_BLOCK => "block".into(),
        TYPE_RNG => "rng".into(),
        TYPE_BALLOON => "balloon".into(),
        TYPE_VSOCK => "vsock".into(),
        other => format!("virtio type {other}"),
    }
}

/// COM1: vm-superio's `SerialState` (the 8250's registers and its receive FIFO).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Input bytes the guest has not read yet, oldest first.
    pub in_buffer: Vec<u8>,
}

/// The PS/2 keyboard behind the i8042.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyboardSnapshot {
    pub scanning: bool,
    /// A keyboard command waiting for its argument byte.
    pub pending: Option<u8>,
    /// Scancode set, 1 to 3.
    pub set: u8,
    pub leds: u8,
    pub typematic: u8,
    /// Bytes on their way to the controller, oldest first.
    pub out: Vec<u8>,
    /// The last byte the controller took, for RESEND.
    pub last_sent: u8,
}

/// The i8042 and its keyboard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Snapshot {
    pub command_byte: u8,
    /// A controller command waiting for its data byte.
    pub pending: Option<u8>,
    pub last_write_was_command: bool,
    /// The output register (status bit 0 when `Some`).
    pub output: Option<u8>,
    pub last_output: u8,
    pub output_port: u8,
    /// Controller replies waiting for the output register, oldest first.
    pub replies: Vec<u8>,
    pub keyboard: KeyboardSnapshot,
}
