//! How a VM stops: the `VmExit` reasons and the `ExitSignal` every thread uses to ask for one.
//!
//! Any thread may request a stop (a vCPU on a triple fault, the i8042 on a reset, the VMM on a
//! request); the first reason wins and later ones are ignored. A vCPU checks `requested()` before
//! each `KVM_RUN`, so the vCPU that wrote the reset command never runs another guest instruction.
//! The VMM thread waits on `event()` and then tears the vCPUs down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset the machine (i8042 reset line, `reboot=k`, or a KVM reset event).
    Reset,
    /// The guest powered the machine off.
    Shutdown,
    /// The host asked the VM to stop.
    Stopped,
    /// The guest or KVM failed in a way that stops the VM; the text says how.
    Fault(String),
}

impl VmExit {
    /// True for the ways a guest ends on purpose.
    pub fn is_clean(&self) -> bool {
        !matches!(self, VmExit::Fault(_))
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => f.write_str("guest reset"),
            VmExit::Shutdown => f.write_str("guest shut down"),
            VmExit::Stopped => f.write_str("stopped by the host"),
            VmExit::Fault(why) => f.write_str(why),
        }
    }
}

/// Shared stop request: a flag for the vCPUs, an eventfd for the VMM thread's event loop.
#[derive(Debug)]
pub struct ExitSignal {
    requested: AtomicBool,
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            requested: AtomicBool::new(false),
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to stop; the first reason given is the one kept.
    pub fn request(&self, why: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            log::debug!("stop requested: {why}");
            *reason = Some(why);
        }
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal the VM stop: {e}");
        }
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// The reason, once one was requested.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable when a stop was requested.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.requested());
        assert_eq!(s.reason(), None);
        s.request(VmExit::Reset);
        s.request(VmExit::Fault("later".into()));
        assert!(s.requested());
        assert_eq!(s.reason(), Some(VmExit::Reset));
        assert_eq!(s.event().read().unwrap(), 2);
    }

    #[test]
    fn clean_exits() {
        assert!(VmExit::Reset.is_clean());
        assert!(VmExit::Shutdown.is_clean());
        assert!(!VmExit::Fault("x".into()).is_clean());
    }
}
