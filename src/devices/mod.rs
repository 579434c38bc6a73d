//! Devices the guest reaches through port I/O or MMIO exits.
//!
//! `bus` maps guest addresses to devices; `legacy` holds the 8250 serial port and the i8042
//! (keyboard controller: the reset line and Ctrl-Alt-Del); `virtio` the virtio-mmio transport and devices. Devices are concrete types held in `BusDevice`, an enum,
//! so dispatch is a `match` and no trait-object plumbing is needed.

pub mod bus;
pub mod legacy;
pub mod state;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
