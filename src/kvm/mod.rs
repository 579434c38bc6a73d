//! Everything that talks to KVM directly: opening /dev/kvm, guest memory slots and vCPU threads.
//!
//! Together with `arch` this is where `unsafe` lives; device code needs none.

pub mod memory;
pub mod vcpu;

use std::path::Path;

use kvm_ioctls::Kvm;

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm does not exist: load the kvm module (kvm_intel or kvm_amd) or run on a host with virtualization enabled")]
    Missing,
    #[error("cannot open /dev/kvm: run as root or add this user to the kvm group")]
    Access(#[source] kvm_ioctls::Error),
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
}

/// Opens /dev/kvm, with an error that says what to do. (`arch::check_kvm` checks the API
/// version and capabilities next.)
pub fn open() -> Result<Kvm, KvmError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::Access(e),
        _ => KvmError::Open(e),
    })
}

/// Which KVM implementation backs /dev/kvm, for logs and test output:
/// `kvm-pvm` (software nested virtualization), `kvm-intel`, `kvm-amd`, or `none`.
pub fn kvm_kind() -> &'static str {
    let m = |name: &str| Path::new("/sys/module").join(name).exists();
    if !Path::new("/dev/kvm").exists() {
        "none"
    } else if m("kvm_pvm") {
        "kvm-pvm"
    } else if m("kvm_amd") {
        "kvm-amd"
    } else if m("kvm_intel") {
        "kvm-intel"
    } else {
        "kvm-unknown"
    }
}
