//! `VmConfig` → a ready `Vmm` with paused vCPUs: the boot path.
//!
//! Order matters and is the one KVM needs: validate the config (nothing touched yet) → open KVM
//! and check capabilities → VM with irqchip and PIT → guest memory, registered as slots →
//! devices on the buses, with their irqfds → kernel, initrd and boot structures written into
//! memory → vCPUs created after the irqchip (so each gets an in-kernel LAPIC), configured, and
//! started paused on their threads.

use std::fs::OpenOptions;
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{self as arch, layout};
use crate::boot::{self, BootRequest, BootSource};
use crate::config::{ConfigError, ConsoleConfig, VmConfig};
use crate::devices::legacy::{self, SerialDevice, SerialOut, I8042};
use crate::devices::{Bus, BusDevice, BusError};
use crate::exit::ExitSignal;
use crate::kvm::{self, memory::MemoryError, vcpu::Vcpu, vcpu::VcpuError, KvmError};
use crate::vmm::{VmParts, Vmm, VmmError};

/// Errors building a VM; each names the stage that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("KVM set-up failed")]
    Arch(#[from] arch::ArchError),
    #[error("{what} failed")]
    KvmCall {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory")]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("cannot boot {name}")]
    Kernel {
        name: String,
        #[source]
        source: boot::BootError,
    },
    #[error("device placement")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot open console file {path}")]
    ConsoleFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vcpu set-up failed")]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::KvmCall { what, source }
}

/// Builds the VM `config` describes; its vCPUs wait, paused, for `Vmm::start`.
pub fn build(config: &VmConfig) -> Result<Vmm, BuildError> {
    config.validate()?;
    let console = console_writer(&config.console)?;

    let kvm = kvm::open()?;
    arch::check_kvm(&kvm)?;
    log::info!("KVM: {}", kvm::kvm_kind());
    let vm = kvm.create_vm().map_err(kvm_call("creating the VM"))?;
    arch::configure_vm(&vm)?;

    let mem = kvm::memory::create(config.machine.mem_mib)?;
    kvm::memory::register(&vm, &mem)?;

    let exit = Arc::new(ExitSignal::new().map_err(BuildError::EventFd)?);
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
        .map_err(kvm_call("registering the serial irqfd"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)));
    let mut pio = Bus::new();
    pio.insert(
        legacy::COM1_PORT,
        legacy::COM1_LEN,
        BusDevice::Serial(serial.clone()),
    )?;
    pio.insert(
        legacy::I8042_PORT,
        legacy::I8042_LEN,
        BusDevice::I8042(Arc::new(Mutex::new(I8042::new(exit.clone())))),
    )?;
    let mmio = Bus::new();

    let vcpu_count =
        u8::try_from(config.machine.vcpus).map_err(|_| ConfigError::Vcpus(config.machine.vcpus))?;
    let cmdline = config.boot.effective_cmdline();
    let mut probe = Cursor::new(crate::probe::PROBE_ELF);
    let kernel_name = match &config.boot.kernel {
        Some(path) => path.display().to_string(),
        None => "the built-in probe guest".to_string(),
    };
    let kernel = match &config.boot.kernel {
        Some(path) => BootSource::Path(path),
        None => BootSource::Image {
            name: "built-in probe guest",
            reader: &mut probe,
        },
    };
    let setup = boot::load(
        &mem,
        BootRequest {
            kernel,
            initrd: config.boot.initrd.as_deref(),
            cmdline: &cmdline,
            protocol: config.boot.protocol,
            num_vcpus: vcpu_count,
        },
    )
    .map_err(|e| match e {
        // These already name the file.
        boot::BootError::OpenKernel { .. } | boot::BootError::OpenInitrd { .. } => {
            BuildError::Boot(e)
        }
        source => BuildError::Kernel {
            name: kernel_name,
            source,
        },
    })?;
    log::info!(
        "kernel entry {:#x} ({:?}), {} vcpus, {} MiB",
        setup.entry.0,
        setup.mode,
        vcpu_count,
        config.machine.mem_mib
    );

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("reading the supported CPUID"))?;
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    for id in 0..vcpu_count {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_call("creating a vcpu"))?;
        arch::configure_vcpu(&fd, id, vcpu_count, &setup, &cpuid)?;
        vcpus.push(Vcpu::new(id, fd, pio.clone(), mmio.clone(), exit.clone()).start()?);
    }

    Ok(Vmm::new(VmParts {
        config: config.clone(),
        vm,
        mem,
        vcpus,
        exit,
        serial,
    })?)
}

fn console_writer(console: &ConsoleConfig) -> Result<SerialOut, BuildError> {
    Ok(match console {
        ConsoleConfig::Stdio => Box::new(std::io::stdout()),
        ConsoleConfig::Off => Box::new(std::io::sink()),
        ConsoleConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::ConsoleFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}
