//! Devices the guest reaches through port I/O or MMIO exits.
//!
//! `bus` maps guest addresses to devices; `legacy` holds the 8250 serial port and the i8042
//! (whose only job is the reset line). Devices are concrete types held in `BusDevice`, an enum,
//! so dispatch is a `match` and no trait-object plumbing is needed.

pub mod bus;
pub mod legacy;

pub use bus::{Bus, BusDevice, BusError};
