//! The legacy PC devices a micro-VM still needs: COM1 (8250 UART from vm-superio) and the i8042
//! keyboard controller, for two things: its CPU-reset line, so that a guest `reboot` (Linux
//! `reboot=k`) stops the VM, and a keyboard, so that the host can send Ctrl-Alt-Del
//! (Firecracker's `SendCtrlAltDel`) and the guest shuts down cleanly.
//!
//! Both are driven by vCPU threads through the PIO bus; serial input and keys arrive from the
//! VMM thread, under the same lock. Each interrupt is an eventfd that the builder registers as
//! an irqfd: COM1's on GSI 4, the i8042's (the keyboard's) on GSI 1. The i8042 model follows
//! what Linux's i8042 and atkbd drivers probe (IBM PS/2 and AT technical references): a
//! translating controller with a PS/2 keyboard and no aux port. Everything the guest writes is
//! untrusted; the device never panics and its buffers are bounded.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub use crate::arch::x86_64::layout::I8042_IRQ;
use crate::devices::state::{I8042Snapshot, KeyboardSnapshot, SerialSnapshot, StateError};
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

    /// The UART's registers and the input bytes the guest has not read.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts saved registers and input back; the interrupt eventfd and the output sink stay
    /// this process's. A pending interrupt (enabled and set in the saved registers) is raised
    /// again. A receive FIFO longer than the UART's is refused, and nothing changes.
    pub fn restore(&mut self, state: &SerialSnapshot) -> Result<(), StateError> {
        let fifo = self.uart.state().in_buffer.len() + self.uart.fifo_capacity();
        if state.in_buffer.len() > fifo {
            return Err(StateError::Mismatch(format!(
                "serial input of {} bytes saved, the FIFO holds {fifo}",
                state.in_buffer.len()
            )));
        }
        let evt = self
            .uart
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|source| StateError::Io {
                what: "serial interrupt eventfd",
                source,
            })?;
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        // The output sink moves over below; the new UART writes nowhere until then.
        let placeholder: SerialOut = Box::new(io::sink());
        let uart = Serial::from_state(&s, EventFdTrigger::new(evt), NoEvents, placeholder)
            .map_err(|e| match e {
                vm_superio::serial::Error::Trigger(source)
                | vm_superio::serial::Error::IOError(source) => StateError::Io {
                    what: "serial interrupt",
                    source,
                },
                vm_superio::serial::Error::FullFifo => {
                    StateError::Mismatch("serial input longer than the FIFO".into())
                }
            })?;
        let old = std::mem::replace(&mut self.uart, uart);
        *self.uart.writer_mut() = old.into_writer();
        Ok(())
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

// --- i8042 -------------------------------------------------------------------------------------

/// Offsets from `I8042_PORT`: 0x60 data, 0x64 status (read) and command (write).
const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits. Never set: input buffer full (0x02; every write is taken at once), aux
// data (0x20; no aux port), timeout (0x40) and parity (0x80) errors.
const STS_OBF: u8 = 0x01;
const STS_SYS: u8 = 0x04;
const STS_LAST_WAS_COMMAND: u8 = 0x08;
const STS_NOT_INHIBITED: u8 = 0x10;

// Command byte bits (controller RAM byte 0).
const CB_KBD_INT: u8 = 0x01;
const CB_SYS: u8 = 0x04;
const CB_KBD_DISABLE: u8 = 0x10;
const CB_AUX_DISABLE: u8 = 0x20;
const CB_XLATE: u8 = 0x40;
/// The command byte as a BIOS hands it over: keyboard interrupt on, system flag set (self-test
/// passed), aux port off, set-2 → set-1 translation on.
const CB_POWER_ON: u8 = CB_XLATE | CB_AUX_DISABLE | CB_SYS | CB_KBD_INT;

// Controller commands (0x64 writes). The aux-port commands (0xa7-0xa9, 0xd3, 0xd4) are not
// here: like an AT controller without an aux port, this one ignores them, so the data byte of
// 0xd3/0xd4 goes to the keyboard, which refuses it. Linux's probe then sees the loop-back byte
// come from the keyboard, not the aux port, and decides at once that there is no aux port.
const CMD_READ_RAM_FIRST: u8 = 0x20; // 0x20 reads the command byte
const CMD_READ_RAM_LAST: u8 = 0x3f;
const CMD_WRITE_RAM_FIRST: u8 = 0x60; // 0x60 writes the command byte
const CMD_WRITE_RAM_LAST: u8 = 0x7f;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
/// 0xf0-0xff pulse the output-port lines whose bit is 0 in the low nibble; bit 0 is the CPU
/// reset line, so every even command here (0xfe above all) resets the machine.
const CMD_PULSE_FIRST: u8 = 0xf0;

const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;

// Output port bits.
const OUT_RESET_N: u8 = 0x01; // CPU reset, active low
const OUT_A20: u8 = 0x02;
const OUT_KBD_OBF: u8 = 0x10;

// Keyboard commands (0x60 writes with no controller command pending).
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_SET_TYPEMATIC: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_SET_DEFAULTS: u8 = 0xf6;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
/// Every byte from 0xed up is a command; a command byte arriving where an argument was
/// expected starts that command instead.
const KBD_FIRST_COMMAND: u8 = 0xed;

// Keyboard replies.
const KBD_ACK: u8 = 0xfa;
const KBD_NAK: u8 = 0xfe; // "resend": not understood
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const KBD_ID: u8 = 0xab; // MF2 keyboard: 0xab 0x83, translated by the controller to 0xab 0x41
const KBD_ID_2: u8 = 0x83;
const KBD_ID_2_TRANSLATED: u8 = 0x41;
/// 10.9 characters/s after 500 ms.
const KBD_DEFAULT_TYPEMATIC: u8 = 0x2b;

/// What a keyboard buffers, and what the controller keeps of its own replies. A guest that
/// never reads loses what comes after, as with real hardware.
const KBD_BUFFER: usize = 16;
const REPLY_BUFFER: usize = 16;

/// Ctrl↓ Alt↓ Del↓ Del↑ Alt↑ Ctrl↑ in scancode set 1 (what the guest reads when the controller
/// translates set 2, the usual case) and in set 2 (an untranslating guest, `i8042.direct`).
const CTRL_ALT_DEL_SET1: [u8; 8] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];

/// Why keys could not be sent to the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042Error {
    #[error("the guest has not read the keys sent before (keyboard buffer full)")]
    BufferFull,
    #[error("the guest has disabled its keyboard")]
    KeyboardDisabled,
    #[error("the guest's keyboard uses scancode set {set} (translated: {translated}), which Ledge cannot send")]
    ScancodeSet { set: u8, translated: bool },
}

/// The PS/2 keyboard behind the controller: its command set, its state and its buffer.
#[derive(Debug)]
struct Keyboard {
    scanning: bool,
    /// A command waiting for its argument byte (SET_LEDS, SCANCODE_SET, SET_TYPEMATIC).
    pending: Option<u8>,
    set: u8,
    leds: u8,
    typematic: u8,
    /// Bytes on their way to the controller, oldest first; at most `KBD_BUFFER`.
    out: VecDeque<u8>,
    /// The last byte the controller took, for RESEND.
    last_sent: u8,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard {
            scanning: true,
            pending: None,
            set: 2,
            leds: 0,
            typematic: KBD_DEFAULT_TYPEMATIC,
            out: VecDeque::with_capacity(KBD_BUFFER),
            last_sent: 0,
        }
    }

    fn set_defaults(&mut self) {
        self.set = 2;
        self.typematic = KBD_DEFAULT_TYPEMATIC;
        self.out.clear();
    }

    fn send(&mut self, b: u8) {
        if self.out.len() < KBD_BUFFER {
            self.out.push_back(b);
        } else {
            log::debug!("i8042: keyboard buffer full, {b:#04x} dropped");
        }
    }

    /// The next byte for the controller.
    fn take(&mut self) -> Option<u8> {
        let b = self.out.pop_front()?;
        self.last_sent = b;
        Some(b)
    }

    /// A byte from the host (the guest's write to 0x60). `translated`: the controller turns
    /// what the keyboard sends into set 1, which changes how identifiers read.
    fn receive(&mut self, b: u8, translated: bool) {
        if b < KBD_FIRST_COMMAND {
            match self.pending.take() {
                Some(KBD_SET_LEDS) => self.leds = b & 0x07,
                Some(KBD_SET_TYPEMATIC) => self.typematic = b & 0x7f,
                Some(KBD_SCANCODE_SET) => match b {
                    0 => {
                        self.send(KBD_ACK);
                        // Sets 1, 2, 3 read 0x43, 0x41, 0x3f through the translation.
                        let set = if translated {
                            [0x43, 0x41, 0x3f][usize::from(self.set.clamp(1, 3) - 1)]
                        } else {
                            self.set
                        };
                        self.send(set);
                        return;
                    }
                    1..=3 => self.set = b,
                    _ => {
                        self.send(KBD_NAK);
                        return;
                    }
                },
                _ => {
                    self.send(KBD_NAK);
                    return;
                }
            }
            self.send(KBD_ACK);
            return;
        }
        self.pending = None;
        match b {
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_TYPEMATIC => {
                self.pending = Some(b);
                self.send(KBD_ACK);
            }
            KBD_ECHO => self.send(KBD_ECHO),
            KBD_IDENTIFY => {
                self.send(KBD_ACK);
                self.send(KBD_ID);
                self.send(if translated {
                    KBD_ID_2_TRANSLATED
                } else {
                    KBD_ID_2
                });
            }
            KBD_ENABLE => {
                self.out.clear();
                self.scanning = true;
                self.send(KBD_ACK);
            }
            KBD_DISABLE => {
                self.set_defaults();
                self.scanning = false;
                self.send(KBD_ACK);
            }
            KBD_SET_DEFAULTS => {
                self.set_defaults();
                self.send(KBD_ACK);
            }
            KBD_RESEND => {
                let last = self.last_sent;
                self.send(last);
            }
            KBD_RESET => {
                self.set_defaults();
                self.leds = 0;
                self.scanning = true;
                self.send(KBD_ACK);
                self.send(KBD_SELF_TEST_PASSED);
            }
            // 0xf7-0xfd set scancode-set-3 key types; accepted and ignored.
            0xf7..=0xfd => self.send(KBD_ACK),
            // 0xef, 0xf1: not commands.
            _ => self.send(KBD_NAK),
        }
    }

    /// Key events from the host: all of `codes`, or nothing.
    fn press(&mut self, codes: &[u8]) -> Result<(), I8042Error> {
        if !self.scanning {
            return Err(I8042Error::KeyboardDisabled);
        }
        if self.out.len() + codes.len() > KBD_BUFFER {
            return Err(I8042Error::BufferFull);
        }
        self.out.extend(codes);
        Ok(())
    }
}

/// The i8042 keyboard controller with a PS/2 keyboard and no aux port: enough for Linux's
/// i8042 and atkbd drivers to find the keyboard, for the host to send Ctrl-Alt-Del, and for the
/// guest to reset the machine (command 0xfe, or output-port bit 0 through 0xd1).
///
/// Bytes for the guest wait in the controller's replies first, then in the keyboard's buffer;
/// one at a time moves into the output register (status bit 0), and each arrival there raises
/// IRQ 1 when the command byte enables it. The guest reads the register at 0x60.
#[derive(Debug)]
pub struct I8042 {
    exit: Arc<ExitSignal>,
    interrupt: EventFd,
    command_byte: u8,
    /// A controller command waiting for its data byte at 0x60.
    pending: Option<u8>,
    last_write_was_command: bool,
    output: Option<u8>,
    /// What a read of an empty output register returns: the byte read last.
    last_output: u8,
    output_port: u8,
    /// Controller replies, ahead of keyboard bytes; at most `REPLY_BUFFER`.
    replies: VecDeque<u8>,
    keyboard: Keyboard,
}

impl I8042 {
    /// `interrupt` is IRQ 1: the builder registers it as an irqfd on GSI `I8042_IRQ`.
    pub fn new(exit: Arc<ExitSignal>, interrupt: EventFd) -> Self {
        I8042 {
            exit,
            interrupt,
            command_byte: CB_POWER_ON,
            pending: None,
            last_write_was_command: false,
            output: None,
            last_output: 0,
            output_port: OUT_RESET_N | OUT_A20,
            replies: VecDeque::with_capacity(REPLY_BUFFER),
            keyboard: Keyboard::new(),
        }
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data) {
            (DATA, [b]) => *b = self.read_data(),
            (COMMAND, [b]) => *b = self.status(),
            // 0x61-0x63 are not the controller's (system control port B and unused ports).
            (_, [b]) => *b = 0,
            (_, data) => data.fill(0xff),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA, [b]) => self.write_data(*b),
            (COMMAND, [b]) => self.write_command(*b),
            _ => {}
        }
    }

    /// Controller and keyboard state, every byte on its way to the guest included.
    pub fn save(&self) -> I8042Snapshot {
        let k = &self.keyboard;
        I8042Snapshot {
            command_byte: self.command_byte,
            pending: self.pending,
            last_write_was_command: self.last_write_was_command,
            output: self.output,
            last_output: self.last_output,
            output_port: self.output_port,
            replies: self.replies.iter().copied().collect(),
            keyboard: KeyboardSnapshot {
                scanning: k.scanning,
                pending: k.pending,
                set: k.set,
                leds: k.leds,
                typematic: k.typematic,
                out: k.out.iter().copied().collect(),
                last_sent: k.last_sent,
            },
        }
    }

    /// Puts saved state back, checked first (buffer lengths, pending commands the device can
    /// be waiting on, scancode set, the reset line not asserted): a refusal changes nothing.
    /// A byte waiting in the output register with the interrupt enabled raises IRQ 1 again.
    pub fn restore(&mut self, state: &I8042Snapshot) -> Result<(), StateError> {
        let bad = |what: String| Err(StateError::Mismatch(format!("i8042: {what}")));
        let k = &state.keyboard;
        if state.replies.len() > REPLY_BUFFER {
            return bad(format!("{} controller replies", state.replies.len()));
        }
        if k.out.len() > KBD_BUFFER {
            return bad(format!("{} keyboard bytes", k.out.len()));
        }
        if let Some(p) = state.pending {
            let waits = matches!(
                p,
                CMD_WRITE_RAM_FIRST
                    ..=CMD_WRITE_RAM_LAST | CMD_WRITE_OUTPUT_PORT | CMD_WRITE_KBD_BUFFER
            );
            if !waits {
                return bad(format!("controller command {p:#04x} takes no data byte"));
            }
        }
        if let Some(p) = k.pending {
            if !matches!(p, KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_TYPEMATIC) {
                return bad(format!("keyboard command {p:#04x} takes no argument"));
            }
        }
        if !(1..=3).contains(&k.set) {
            return bad(format!("scancode set {}", k.set));
        }
        if state.output_port & OUT_RESET_N == 0 {
            return bad("output port holds the CPU in reset".into());
        }
        self.command_byte = state.command_byte;
        self.pending = state.pending;
        self.last_write_was_command = state.last_write_was_command;
        self.output = state.output;
        self.last_output = state.last_output;
        self.output_port = state.output_port & !OUT_KBD_OBF;
        self.replies = state.replies.iter().copied().collect();
        self.keyboard = Keyboard {
            scanning: k.scanning,
            pending: k.pending,
            set: k.set,
            leds: k.leds & 0x07,
            typematic: k.typematic & 0x7f,
            out: k.out.iter().copied().collect(),
            last_sent: k.last_sent,
        };
        if self.output.is_some() {
            if self.command_byte & CB_KBD_INT != 0 {
                // The guest may not have taken the interrupt before the snapshot; an extra one
                // finds the byte (or, if read meanwhile, an empty register) and is harmless.
                self.raise_interrupt();
            }
        } else {
            self.refill();
        }
        Ok(())
    }

    /// Queues Ctrl↓ Alt↓ Del↓ Del↑ Alt↑ Ctrl↑ for the guest, in the scancode set it reads.
    /// A guest whose keyboard is disabled, or that has not read earlier keys, gets nothing.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        let translated = self.command_byte & CB_XLATE != 0;
        let codes: &[u8] = match (translated, self.keyboard.set) {
            (true, 2) | (false, 1) => &CTRL_ALT_DEL_SET1,
            (false, 2) => &CTRL_ALT_DEL_SET2,
            (translated, set) => return Err(I8042Error::ScancodeSet { set, translated }),
        };
        self.keyboard.press(codes)?;
        self.refill();
        Ok(())
    }

    fn status(&self) -> u8 {
        let mut s = STS_NOT_INHIBITED;
        if self.command_byte & CB_SYS != 0 {
            s |= STS_SYS;
        }
        if self.output.is_some() {
            s |= STS_OBF;
        }
        if self.last_write_was_command {
            s |= STS_LAST_WAS_COMMAND;
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.output.take() {
            self.last_output = b;
        }
        self.refill();
        self.last_output
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_write_was_command = true;
        self.pending = None;
        match cmd {
            CMD_READ_RAM_FIRST => self.reply(self.command_byte),
            // The rest of the controller's RAM is not modelled: it reads as zero.
            0x21..=CMD_READ_RAM_LAST => self.reply(0),
            CMD_WRITE_RAM_FIRST..=CMD_WRITE_RAM_LAST
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_BUFFER => self.pending = Some(cmd),
            CMD_SELF_TEST => {
                self.command_byte |= CB_SYS;
                self.reply(SELF_TEST_PASSED);
            }
            CMD_KBD_TEST => self.reply(INTERFACE_TEST_PASSED),
            CMD_KBD_DISABLE => self.command_byte |= CB_KBD_DISABLE,
            CMD_KBD_ENABLE => {
                self.command_byte &= !CB_KBD_DISABLE;
                self.refill();
            }
            CMD_READ_OUTPUT_PORT => {
                let obf = if self.output.is_some() {
                    OUT_KBD_OBF
                } else {
                    0
                };
                self.reply(self.output_port | obf);
            }
            CMD_PULSE_FIRST..=0xff if cmd & OUT_RESET_N == 0 => self.reset(),
            // The aux port's commands and anything else: ignored.
            _ => log::debug!("i8042: command {cmd:#04x} ignored"),
        }
    }

    fn write_data(&mut self, b: u8) {
        self.last_write_was_command = false;
        match self.pending.take() {
            Some(CMD_WRITE_RAM_FIRST) => self.set_command_byte(b),
            Some(CMD_WRITE_OUTPUT_PORT) => {
                if b & OUT_RESET_N == 0 {
                    self.reset();
                } else {
                    self.output_port = b & !OUT_KBD_OBF;
                }
            }
            // The byte reads back as if the keyboard had sent it.
            Some(CMD_WRITE_KBD_BUFFER) => self.reply(b),
            // Other controller RAM: accepted, not kept.
            Some(_) => {}
            None => {
                // Sending to the keyboard enables its interface again, as on real controllers.
                self.command_byte &= !CB_KBD_DISABLE;
                let translated = self.command_byte & CB_XLATE != 0;
                self.keyboard.receive(b, translated);
                self.refill();
            }
        }
    }

    fn set_command_byte(&mut self, b: u8) {
        let was_enabled = self.command_byte & CB_KBD_INT != 0;
        self.command_byte = b;
        if self.output.is_some() && !was_enabled && b & CB_KBD_INT != 0 {
            // The interrupt line follows "output full and enabled": enabling it with a byte
            // waiting raises it.
            self.raise_interrupt();
        }
        self.refill();
    }

    fn reply(&mut self, b: u8) {
        if self.replies.len() < REPLY_BUFFER {
            self.replies.push_back(b);
        } else {
            log::debug!("i8042: reply {b:#04x} dropped, the guest is not reading");
        }
        self.refill();
    }

    /// Moves the next waiting byte into an empty output register and raises IRQ 1 for it.
    fn refill(&mut self) {
        if self.output.is_some() {
            return;
        }
        let next = match self.replies.pop_front() {
            Some(b) => Some(b),
            None if self.command_byte & CB_KBD_DISABLE == 0 => self.keyboard.take(),
            None => None,
        };
        if let Some(b) = next {
            self.output = Some(b);
            if self.command_byte & CB_KBD_INT != 0 {
                self.raise_interrupt();
            }
        }
    }

    fn raise_interrupt(&self) {
        if let Err(e) = self.interrupt.write(1) {
            log::warn!("i8042: cannot raise IRQ 1: {e}");
        }
    }

    fn reset(&self) {
        self.exit.request(VmExit::Reset);
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

    // --- i8042 ---

    struct Kbc {
        dev: I8042,
        irq: EventFd,
        exit: Arc<ExitSignal>,
    }

    impl Kbc {
        fn new() -> Self {
            let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
            let exit = Arc::new(ExitSignal::new().unwrap());
            let dev = I8042::new(exit.clone(), irq.try_clone().unwrap());
            Kbc { dev, irq, exit }
        }
        fn status(&mut self) -> u8 {
            let mut b = [0u8];
            self.dev.read(COMMAND, &mut b);
            b[0]
        }
        fn data(&mut self) -> u8 {
            let mut b = [0u8];
            self.dev.read(DATA, &mut b);
            b[0]
        }
        fn cmd(&mut self, c: u8) {
            self.dev.write(COMMAND, &[c]);
        }
        fn put(&mut self, b: u8) {
            self.dev.write(DATA, &[b]);
        }
        /// Interrupts raised since the last call.
        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
        /// Reads every waiting byte the way Linux's i8042_flush does: status, then data.
        fn drain(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            while self.status() & STS_OBF != 0 {
                v.push(self.data());
                assert!(v.len() <= KBD_BUFFER + REPLY_BUFFER, "output never empties");
            }
            v
        }
        /// A controller command and the bytes it answers.
        fn ask(&mut self, c: u8) -> Vec<u8> {
            self.cmd(c);
            self.drain()
        }
        /// A keyboard command (through the data port) and what the keyboard answers.
        fn kbd(&mut self, b: u8) -> Vec<u8> {
            self.put(b);
            self.drain()
        }
    }

    #[test]
    fn i8042_registers_at_power_on() {
        let mut k = Kbc::new();
        let s = k.status();
        assert_eq!(s & STS_OBF, 0, "nothing to read");
        assert_eq!(s & 0x02, 0, "input buffer never full");
        assert_ne!(s & STS_SYS, 0, "system flag: self-test passed");
        assert_ne!(s & STS_NOT_INHIBITED, 0, "no key lock");
        assert_eq!(s & 0x20, 0, "no aux data");
        k.cmd(CMD_READ_RAM_FIRST);
        assert_ne!(k.status() & STS_LAST_WAS_COMMAND, 0);
        assert_ne!(k.status() & STS_OBF, 0);
        assert_eq!(k.irqs(), 1, "the keyboard interrupt is enabled at power-on");
        assert_eq!(k.data(), CB_POWER_ON);
        assert_eq!(k.status() & STS_OBF, 0);
        // An empty output register reads its last byte again.
        assert_eq!(k.data(), CB_POWER_ON);
        assert_eq!(k.ask(CMD_SELF_TEST), [SELF_TEST_PASSED]);
        assert_eq!(k.ask(CMD_KBD_TEST), [INTERFACE_TEST_PASSED]);
        assert_eq!(k.ask(0x21), [0]);
        assert_eq!(k.ask(CMD_READ_OUTPUT_PORT), [OUT_RESET_N | OUT_A20]);
        // Multi-byte accesses and the ports in between belong to no one.
        let mut two = [0u8; 2];
        k.dev.read(DATA, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut one = [0x55u8];
        k.dev.read(1, &mut one);
        assert_eq!(one, [0]);
        k.dev.write(COMMAND, &[CMD_PULSE_FIRST | 0x0e, 0]);
        assert!(!k.exit.requested());
    }

    #[test]
    fn i8042_command_byte_round_trip_and_interrupt_enable() {
        let mut k = Kbc::new();
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.put(CB_XLATE | CB_SYS | CB_KBD_DISABLE);
        assert!(
            !k.exit.requested(),
            "the data byte is the command's, not a reset"
        );
        k.irqs();
        assert_eq!(
            k.ask(CMD_READ_RAM_FIRST),
            [CB_XLATE | CB_SYS | CB_KBD_DISABLE]
        );
        assert_eq!(k.irqs(), 0, "interrupt disabled");
        // A byte waiting when the interrupt gets enabled raises it.
        k.cmd(CMD_READ_RAM_FIRST);
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.put(CB_XLATE | CB_SYS | CB_KBD_INT);
        assert_eq!(k.irqs(), 1);
        assert_eq!(k.data(), CB_XLATE | CB_SYS | CB_KBD_DISABLE);
        // 0xad / 0xae set and clear the disable bit.
        k.cmd(CMD_KBD_DISABLE);
        assert_eq!(
            k.ask(CMD_READ_RAM_FIRST)[0] & CB_KBD_DISABLE,
            CB_KBD_DISABLE
        );
        k.cmd(CMD_KBD_ENABLE);
        assert_eq!(k.ask(CMD_READ_RAM_FIRST)[0] & CB_KBD_DISABLE, 0);
        // A new command drops one still waiting for its data byte: this goes to the keyboard.
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.cmd(CMD_KBD_TEST);
        assert_eq!(k.data(), INTERFACE_TEST_PASSED);
        assert_eq!(k.kbd(KBD_ECHO), [KBD_ECHO]);
        assert_eq!(k.ask(CMD_READ_RAM_FIRST), [CB_XLATE | CB_SYS | CB_KBD_INT]);
        // 0xd2: the byte reads back as if the keyboard sent it.
        k.cmd(CMD_WRITE_KBD_BUFFER);
        k.put(0x42);
        assert_eq!(k.drain(), [0x42]);
    }

    /// The exchange Linux 6.1's i8042 driver and then atkbd have with the controller at boot
    /// (i8042_controller_init, i8042_check_aux, i8042_enable_kbd_port, atkbd_probe,
    /// atkbd_reset_state, atkbd_activate), in the order they have it.
    #[test]
    fn i8042_linux_probe_sequence() {
        let mut k = Kbc::new();
        // i8042_controller_check: flush.
        assert!(k.drain().is_empty());
        // i8042_controller_init: two equal CTR reads, then keyboard disabled and quiet.
        let ctr = k.ask(CMD_READ_RAM_FIRST);
        assert_eq!(k.ask(CMD_READ_RAM_FIRST), ctr);
        let ctr = ctr[0];
        assert_ne!(
            ctr & CB_XLATE,
            0,
            "Linux keeps translation (no i8042.direct)"
        );
        assert_ne!(
            k.status() & STS_NOT_INHIBITED,
            0,
            "no 'Keylock active' warning"
        );
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.put((ctr | CB_KBD_DISABLE) & !CB_KBD_INT);
        assert!(k.drain().is_empty());
        k.irqs();

        // i8042_check_aux: the loop-back (0xd3 0x5a) must not come back as aux data...
        k.cmd(0xd3);
        k.put(0x5a);
        let s = k.status();
        assert_ne!(s & STS_OBF, 0, "an answer at once, not a 500 ms timeout");
        assert_eq!(
            s & 0x20,
            0,
            "not from the aux port: Linux gives up the loop test"
        );
        // ...and the interface test (0xa9) reads that byte, an error code: no aux port.
        k.cmd(0xa9);
        let r = k.data();
        assert!(r != 0 && r != 0xfa && r != 0xff, "aux test answer {r:#x}");
        assert_eq!(k.status() & STS_OBF, 0, "nothing left over");
        // 0xa7/0xa8 do not exist here either.
        k.cmd(0xa8);
        assert!(k.drain().is_empty());
        assert_eq!(k.irqs(), 0, "interrupt disabled throughout");

        // i8042_enable_kbd_port.
        let ctr = k.ask(CMD_READ_RAM_FIRST)[0];
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.put((ctr & !CB_KBD_DISABLE) | CB_KBD_INT);
        assert!(k.drain().is_empty());

        // atkbd_probe: identify, deactivate; atkbd_reset_state: LEDs off, typematic;
        // atkbd_activate.
        k.put(KBD_IDENTIFY);
        assert_eq!(k.irqs(), 1);
        assert_eq!(k.data(), KBD_ACK);
        assert_eq!(k.irqs(), 1, "one interrupt per byte");
        assert_eq!(k.drain(), [KBD_ID, KBD_ID_2_TRANSLATED]);
        assert_eq!(k.irqs(), 1, "for the last byte");
        assert_eq!(k.kbd(KBD_DISABLE), [KBD_ACK]);
        assert_eq!(k.kbd(KBD_SET_LEDS), [KBD_ACK]);
        assert_eq!(k.kbd(0x00), [KBD_ACK]);
        assert_eq!(k.kbd(KBD_SET_TYPEMATIC), [KBD_ACK]);
        assert_eq!(k.kbd(0x00), [KBD_ACK]);
        assert_eq!(k.kbd(KBD_ENABLE), [KBD_ACK]);
        assert_eq!(k.irqs(), 6);
        // Later LED changes (Caps Lock) from the input layer.
        assert_eq!(k.kbd(KBD_SET_LEDS), [KBD_ACK]);
        assert_eq!(k.kbd(0x04), [KBD_ACK]);
        assert_eq!(k.dev.keyboard.leds, 0x04);
        assert!(!k.exit.requested());

        // And at the end, reboot=k.
        k.cmd(0xfe);
        assert_eq!(k.exit.reason(), Some(VmExit::Reset));
    }

    #[test]
    fn i8042_keyboard_commands() {
        let mut k = Kbc::new();
        assert_eq!(k.kbd(KBD_RESET), [KBD_ACK, KBD_SELF_TEST_PASSED]);
        assert_eq!(k.kbd(KBD_ECHO), [KBD_ECHO]);
        assert_eq!(k.kbd(KBD_SCANCODE_SET), [KBD_ACK]);
        assert_eq!(
            k.kbd(0),
            [KBD_ACK, 0x41],
            "set 2, as the translation reads it"
        );
        assert_eq!(k.kbd(KBD_SCANCODE_SET), [KBD_ACK]);
        assert_eq!(k.kbd(9), [KBD_NAK], "no set 9");
        assert_eq!(k.kbd(KBD_SET_DEFAULTS), [KBD_ACK]);
        assert_eq!(k.kbd(0xf8), [KBD_ACK], "set-3 key types: accepted");
        assert_eq!(k.kbd(0x5a), [KBD_NAK], "not a command");
        assert_eq!(k.kbd(0xef), [KBD_NAK], "not a command");
        assert_eq!(k.kbd(KBD_RESEND), [KBD_NAK], "the last byte sent, again");
        // A command where an argument was expected is a command.
        assert_eq!(k.kbd(KBD_SET_LEDS), [KBD_ACK]);
        assert_eq!(k.kbd(KBD_IDENTIFY), [KBD_ACK, KBD_ID, KBD_ID_2_TRANSLATED]);
        assert_eq!(
            k.kbd(0x01),
            [KBD_NAK],
            "no command waits for an argument now"
        );
        // Untranslated (i8042.direct): the keyboard's own bytes.
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.put(CB_SYS | CB_KBD_INT);
        assert_eq!(k.kbd(KBD_IDENTIFY), [KBD_ACK, KBD_ID, KBD_ID_2]);
        assert_eq!(k.kbd(KBD_SCANCODE_SET), [KBD_ACK]);
        assert_eq!(k.kbd(0), [KBD_ACK, 2]);
        // Writing to the keyboard enables its interface again.
        k.cmd(CMD_KBD_DISABLE);
        assert_eq!(k.kbd(KBD_ECHO), [KBD_ECHO]);
        assert_eq!(k.ask(CMD_READ_RAM_FIRST)[0] & CB_KBD_DISABLE, 0);
    }

    #[test]
    fn i8042_ctrl_alt_del_arrives_with_interrupts() {
        let mut k = Kbc::new();
        k.irqs();
        k.dev.send_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        for _ in 0..CTRL_ALT_DEL_SET1.len() {
            // What Linux's interrupt handler does: one interrupt, one byte.
            assert_eq!(k.irqs(), 1, "after {got:x?}");
            assert_ne!(k.status() & STS_OBF, 0);
            got.push(k.data());
        }
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        assert_eq!(got, [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]);
        assert_eq!(k.irqs(), 0);
        assert_eq!(k.status() & STS_OBF, 0);

        // With the interface disabled the keys wait in the keyboard; enabling releases them.
        k.cmd(CMD_KBD_DISABLE);
        k.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(k.status() & STS_OBF, 0);
        assert_eq!(k.irqs(), 0);
        k.cmd(CMD_KBD_ENABLE);
        assert_eq!(k.irqs(), 1);
        assert_eq!(k.drain(), CTRL_ALT_DEL_SET1);

        // Without the interrupt the guest can still poll for them.
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.put(CB_XLATE | CB_SYS);
        k.irqs();
        k.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(k.drain(), CTRL_ALT_DEL_SET1);
        assert_eq!(k.irqs(), 0);

        // Untranslated: set 2.
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.put(CB_SYS | CB_KBD_INT);
        k.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(
            k.drain(),
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
        // Set 3 (untranslated) is not supported.
        assert_eq!(k.kbd(KBD_SCANCODE_SET), [KBD_ACK]);
        assert_eq!(k.kbd(3), [KBD_ACK]);
        assert_eq!(
            k.dev.send_ctrl_alt_del(),
            Err(I8042Error::ScancodeSet {
                set: 3,
                translated: false
            })
        );
        assert!(!k.exit.requested());
    }

    #[test]
    fn i8042_ctrl_alt_del_refused_when_the_guest_cannot_take_it() {
        let mut k = Kbc::new();
        // A guest that never reads: the keys fill the keyboard's buffer, then are refused
        // whole, never in part.
        let mut sent = 0;
        while k.dev.send_ctrl_alt_del().is_ok() {
            sent += 1;
            assert!(sent < 10);
        }
        assert_eq!(k.dev.send_ctrl_alt_del(), Err(I8042Error::BufferFull));
        let got = k.drain();
        assert_eq!(got.len(), sent * CTRL_ALT_DEL_SET1.len());
        assert!(got.chunks(8).all(|c| c == CTRL_ALT_DEL_SET1));
        // A disabled keyboard (0xf5) does not scan: nothing is queued.
        assert_eq!(k.kbd(KBD_DISABLE), [KBD_ACK]);
        assert_eq!(k.dev.send_ctrl_alt_del(), Err(I8042Error::KeyboardDisabled));
        assert!(k.drain().is_empty());
        assert_eq!(k.kbd(KBD_ENABLE), [KBD_ACK]);
        k.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(k.drain(), CTRL_ALT_DEL_SET1);
    }

    #[test]
    fn i8042_reset_lines() {
        let mut k = Kbc::new();
        k.cmd(0xff); // pulses no line
        k.cmd(CMD_WRITE_OUTPUT_PORT);
        k.put(OUT_RESET_N | OUT_A20);
        assert!(!k.exit.requested());
        assert_eq!(k.ask(CMD_READ_OUTPUT_PORT), [OUT_RESET_N | OUT_A20]);
        k.cmd(CMD_WRITE_OUTPUT_PORT);
        k.put(OUT_A20);
        assert_eq!(k.exit.reason(), Some(VmExit::Reset));

        let mut k = Kbc::new();
        k.cmd(CMD_WRITE_RAM_FIRST); // a reset written as data is not a reset command
        k.put(0xfe);
        assert!(!k.exit.requested());
        k.put(0xfe); // nor is one sent to the keyboard
        assert!(!k.exit.requested());
        k.cmd(0xfe);
        assert_eq!(k.exit.reason(), Some(VmExit::Reset));
        let mut k = Kbc::new();
        k.cmd(0xf0); // pulses every line, reset among them
        assert!(k.exit.requested());
    }

    /// Whatever the guest writes, in any order, the device neither panics nor grows.
    #[test]
    fn i8042_survives_hostile_guests() {
        let mut k = Kbc::new();
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            // xorshift32
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for _ in 0..200_000 {
            let r = next();
            let b = (r >> 8) as u8;
            match r % 8 {
                // Leave out the even 0xf0-0xfe pulses so the run is not one reset; they only
                // request a stop anyway.
                0 | 1 if b >= CMD_PULSE_FIRST && b & 1 == 0 => {}
                0 | 1 => k.cmd(b),
                2..=4 => k.put(b),
                5 => {
                    k.data();
                }
                6 => {
                    k.status();
                }
                _ => {
                    let _ = k.dev.send_ctrl_alt_del();
                }
            }
            assert!(k.dev.replies.len() <= REPLY_BUFFER);
            assert!(k.dev.keyboard.out.len() <= KBD_BUFFER);
        }
        let _ = k.irqs();
    }

    // --- snapshot ---

    #[test]
    fn serial_restore_keeps_input_registers_and_the_new_sink() {
        let old_sink = Sink::default();
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(old_sink.clone()));
        s.write(3, &[0x80]); // LCR: DLAB, to set the divisor
        s.write(0, &[0x0c]);
        s.write(3, &[0x03]); // 8N1
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[0x01]); // IER: received-data interrupt
        assert_eq!(s.enqueue_input(b"abc"), 3);
        let saved = s.save();
        assert_eq!(saved.in_buffer, b"abc");
        let text = serde_json::to_string(&saved).unwrap();
        let saved: SerialSnapshot = serde_json::from_str(&text).unwrap();

        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let new_sink = Sink::default();
        let mut s2 = SerialDevice::new(irq.try_clone().unwrap(), Box::new(new_sink.clone()));
        s2.restore(&saved).unwrap();
        assert_eq!(s2.save(), saved);
        assert_eq!(
            irq.read().unwrap(),
            1,
            "the pending data interrupt is raised again"
        );
        let mut b = [0u8];
        s2.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "data ready");
        for want in b"abc" {
            s2.read(0, &mut b);
            assert_eq!(b[0], *want);
        }
        s2.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        s2.write(0, b"x");
        assert_eq!(new_sink.0.lock().unwrap().as_slice(), b"x");
        assert!(old_sink.0.lock().unwrap().is_empty());
        assert_eq!(s2.input_room(), 64);
    }

    #[test]
    fn serial_restore_refuses_an_overfull_fifo() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        s.enqueue_input(b"z");
        let bad = SerialSnapshot {
            in_buffer: vec![b'q'; 65],
            ..s.save()
        };
        assert!(matches!(s.restore(&bad), Err(StateError::Mismatch(_))));
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'z', "unchanged");
    }

    #[test]
    fn i8042_restore_keeps_pending_bytes_and_commands() {
        let mut k = Kbc::new();
        // Untranslated, keyboard interrupt on; a command byte write half done.
        k.cmd(CMD_WRITE_RAM_FIRST);
        k.put(CB_SYS | CB_KBD_INT);
        k.drain();
        k.kbd(KBD_SCANCODE_SET);
        k.kbd(1);
        k.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(k.data(), CTRL_ALT_DEL_SET1[0]);
        k.cmd(CMD_WRITE_RAM_FIRST);
        let saved = k.dev.save();
        assert_eq!(saved.command_byte, CB_SYS | CB_KBD_INT);
        assert_eq!(saved.pending, Some(CMD_WRITE_RAM_FIRST));
        assert_eq!(saved.keyboard.set, 1);
        let text = serde_json::to_string(&saved).unwrap();
        let saved: I8042Snapshot = serde_json::from_str(&text).unwrap();

        let mut k2 = Kbc::new();
        k2.dev.restore(&saved).unwrap();
        assert_eq!(k2.dev.save(), saved);
        assert_eq!(
            k2.irqs(),
            1,
            "a byte waits with the interrupt on: raised again"
        );
        // The pending command takes its data byte.
        k2.put(CB_SYS | CB_KBD_INT | CB_XLATE);
        assert_eq!(k2.dev.command_byte, CB_SYS | CB_KBD_INT | CB_XLATE);
        // The rest of Ctrl-Alt-Del arrives, in order.
        assert_eq!(k2.drain(), CTRL_ALT_DEL_SET1[1..]);
        assert!(!k2.exit.requested());
    }

    #[test]
    fn i8042_restore_refuses_impossible_state() {
        let good = Kbc::new().dev.save();
        type Edit = fn(&mut I8042Snapshot);
        let cases: [Edit; 6] = [
            |s| s.replies = vec![0; REPLY_BUFFER + 1],
            |s| s.keyboard.out = vec![0; KBD_BUFFER + 1],
            |s| s.pending = Some(CMD_SELF_TEST),
            |s| s.keyboard.pending = Some(KBD_ECHO),
            |s| s.keyboard.set = 4,
            |s| s.output_port = 0,
        ];
        for edit in cases {
            let mut bad = good.clone();
            edit(&mut bad);
            let mut k = Kbc::new();
            k.cmd(CMD_READ_RAM_FIRST);
            let before = k.dev.save();
            assert!(matches!(k.dev.restore(&bad), Err(StateError::Mismatch(_))));
            assert_eq!(k.dev.save(), before, "unchanged");
            assert!(!k.exit.requested());
        }
    }
}
