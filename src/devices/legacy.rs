//! The legacy PC devices a micro-VM still needs: COM1 (8250 UART from vm-superio) and the i8042,
//! kept only for its CPU-reset line so that a guest `reboot` (Linux `reboot=k`) stops the VM.
//!
//! Both are driven by vCPU threads through the PIO bus; serial input arrives from the VMM thread.
//! The serial interrupt is an eventfd that the builder registers as an irqfd on COM1's GSI.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitSignal, VmExit};

/// COM1's I/O ports.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
/// The i8042 data (0x60) and command (0x64) ports.
pub const I8042_PORT: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// An eventfd as a vm-superio interrupt line.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// COM1.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::new(EventFdTrigger::new(interrupt), out),
        }
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) => *b = self.uart.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *b) {
                log::warn!("serial: {e}");
            }
        }
    }

    /// How many input bytes the guest can take now.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues input bytes for the guest; returns how many were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e}");
                0
            }
        }
    }
}

/// Turns the i8042 reset command into a VM stop.
#[derive(Debug)]
pub struct ResetTrigger(Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

/// The i8042 keyboard controller, for its reset line only.
#[derive(Debug)]
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042 {
            dev: I8042Device::new(ResetTrigger(exit)),
        }
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [b]) => *b = self.dev.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [b]) = (u8::try_from(offset), data) {
            if let Err(e) = self.dev.write(off, *b) {
                log::warn!("i8042: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_transmits_bytes_and_raises_its_interrupt() {
        let irq = EventFd::new(0).unwrap();
        let sink = Sink::default();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        s.write(1, &[0x02]); // IER: transmitter-empty interrupt
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        // Multi-byte and out-of-range accesses are ignored / read as all-ones.
        let mut two = [0u8; 2];
        s.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        s.write(0, &[1, 2]);
        assert_eq!(sink.0.lock().unwrap().len(), 3);
    }

    #[test]
    fn serial_input_reaches_the_receive_register() {
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        assert!(s.input_room() > 0);
        assert_eq!(s.enqueue_input(b"a"), 1);
        let mut b = [0u8];
        s.read(5, &mut b); // LSR: data ready
        assert_eq!(b[0] & 1, 1);
        s.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }

    #[test]
    fn i8042_reset_requests_a_vm_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut k = I8042::new(exit.clone());
        k.write(4, &[0x20]); // some other command: no reset
        assert!(!exit.requested());
        k.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
