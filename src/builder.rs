//! `VmConfig` → a ready `Vmm` with paused vCPUs: the boot path.
//!
//! Order matters and is the one KVM needs: validate the config (nothing touched yet) → open KVM
//! and check capabilities → VM → guest memory, registered as slots → irqchip and PIT (after
//! the slots: KVM's first slot after the irqchip costs milliseconds) → devices on the buses, with their irqfds → kernel, initrd and boot structures written into
//! memory → vCPUs created after the irqchip (so each gets an in-kernel LAPIC), configured, and
//! started paused on their threads.

use std::fs::{File, OpenOptions};
use std::io::Cursor;
use std::sync::{Arc, Mutex};

use crate::kvm::memory::GuestMemoryMmap;
use event_manager::MutEventSubscriber;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{self as arch, layout};
use crate::boot::{self, BootRequest, BootSource};
use crate::config::{ConfigError, ConsoleConfig, VmConfig};
use crate::devices::legacy::{self, SerialDevice, SerialOut, I8042};
use crate::devices::virtio::mmio::{MmioTransport, SharedDevice, NOTIFY_OFFSET};
use crate::devices::virtio::{
    balloon::Balloon, block::Block, net::Net, rng::Rng, vsock::Vsock, Interrupt, VirtioDevice,
};
use crate::devices::{Bus, BusDevice, BusError};
use crate::exit::ExitSignal;
use crate::kvm::vcpu::{ExitCounters, Vcpu, VcpuError};
use crate::kvm::{self, memory::MemoryError, KvmError};
use crate::snapshot::StateFile;
use crate::vmm::{Restored, VmParts, Vmm, VmmError};

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
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("no room for another virtio device (at most {0})")]
    NoDeviceSlot(usize),
    #[error("virtio-rng")]
    Rng(#[from] crate::devices::virtio::rng::RngError),
    #[error("virtio-blk")]
    Block(#[from] crate::devices::virtio::block::BlockError),
    #[error("virtio-net")]
    Net(#[from] crate::devices::virtio::net::NetError),
    #[error("virtio-balloon")]
    Balloon(#[from] crate::devices::virtio::balloon::BalloonError),
    #[error("virtio-vsock")]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("the snapshot does not fit its configuration")]
    Snapshot(#[source] SnapshotMismatch),
    #[error("cannot restore the state of {name}")]
    DeviceState {
        name: String,
        #[source]
        source: crate::devices::state::StateError,
    },
    #[error("cannot restore the vCPU or VM state")]
    ArchState(#[from] arch::state::StateError),
}

/// How a snapshot disagrees with the configuration it is restored with.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SnapshotMismatch(pub String);

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::KvmCall { what, source }
}

/// Builds the VM `config` describes; its vCPUs wait, paused, for `Vmm::start`.
pub fn build(config: &VmConfig) -> Result<Vmm, BuildError> {
    build_with_console(config, None)
}

/// As `build`, with the guest's COM1 output going to `console` instead of what
/// `config.console` says — for programs that embed Ledge and keep the output themselves.
pub fn build_with_console(
    config: &VmConfig,
    console: Option<SerialOut>,
) -> Result<Vmm, BuildError> {
    assemble(config, console, None, None)
}

/// As `build_with_console`, on KVM objects made earlier by `prewarm`.
pub fn build_prewarmed(
    config: &VmConfig,
    console: Option<SerialOut>,
    pre: Option<Prewarmed>,
) -> Result<Vmm, BuildError> {
    assemble(config, console, None, pre)
}

/// What a VM needs from KVM before its configuration is known: the checked /dev/kvm, the VM
/// fd, KVM's supported CPUID and MSR list (together ~1 ms on kvm-pvm). A process driven by the
/// API makes them while it waits for its first request (`prewarm` on a thread), and the boot
/// or restore that follows starts from them.
pub struct Prewarmed {
    vm: VmFd,
    cpuid: kvm_bindings::CpuId,
    msrs: Arc<[u32]>,
}

impl std::fmt::Debug for Prewarmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prewarmed").finish_non_exhaustive()
    }
}

/// Opens KVM, checks it, and makes the VM-wide objects (see `Prewarmed`).
pub fn prewarm() -> Result<Prewarmed, BuildError> {
    let kvm = kvm::open()?;
    arch::check_kvm(&kvm)?;
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("reading the supported CPUID"))?;
    arch::cpuid::add_kvm_emulated(
        &mut cpuid,
        kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    );
    let msrs: Arc<[u32]> = arch::state::msrs_to_save(&kvm)?.into();
    let vm = kvm.create_vm().map_err(kvm_call("creating the VM"))?;
    Ok(Prewarmed { vm, cpuid, msrs })
}

/// A snapshot to restore: its checked state file and its memory file (the full image).
pub struct RestoreSource {
    pub state: StateFile,
    pub memory: File,
}

/// Restores a snapshot into a new VM, paused. `config` is the snapshot's configuration with
/// the caller's overrides (TAP names, vsock socket, console) applied; everything that must
/// match the saved state (vCPUs, memory size, devices) is checked before any VM exists.
pub fn restore(
    config: &VmConfig,
    source: RestoreSource,
    console: Option<SerialOut>,
) -> Result<Vmm, BuildError> {
    assemble(config, console, Some(source), None)
}

/// As `restore`, on KVM objects made earlier by `prewarm`.
pub fn restore_prewarmed(
    config: &VmConfig,
    source: RestoreSource,
    console: Option<SerialOut>,
    pre: Option<Prewarmed>,
) -> Result<Vmm, BuildError> {
    assemble(config, console, Some(source), pre)
}

/// Everything in a snapshot that must agree with the host and with `config`, checked before
/// KVM is touched.
fn check_restorable(
    config: &VmConfig,
    src: &RestoreSource,
    supported: &[kvm_bindings::kvm_cpuid_entry2],
) -> Result<(), BuildError> {
    let body = &src.state.body;
    let h = &src.state.header;
    let mismatch = |what: String| BuildError::Snapshot(SnapshotMismatch(what));
    if body.vcpus.len() != config.machine.vcpus as usize
        || body
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| usize::from(v.id) != i)
    {
        return Err(mismatch(format!(
            "it holds {} vCPU states for {} vCPUs",
            body.vcpus.len(),
            config.machine.vcpus
        )));
    }
    let bytes = config.machine.mem_mib.saturating_mul(1 << 20);
    let regions: Vec<(u64, u64)> = layout::ram_regions(bytes)
        .map_err(MemoryError::from)?
        .into_iter()
        .map(|(a, l)| (a.0, l as u64))
        .collect();
    if h.memory.size != bytes || h.memory.regions != regions {
        return Err(mismatch(format!(
            "its memory layout ({} bytes in {:?}) is not that of a {} MiB guest",
            h.memory.size, h.memory.regions, config.machine.mem_mib
        )));
    }
    if let Some(v) = body.vcpus.first() {
        arch::state::check_cpu(&v.cpuid, &h.host_cpu.vendor, supported)?;
    }
    Ok(())
}

fn assemble(
    config: &VmConfig,
    console: Option<SerialOut>,
    restore: Option<RestoreSource>,
    pre: Option<Prewarmed>,
) -> Result<Vmm, BuildError> {
    config.validate()?;
    let stdin_input = console.is_none() && config.console == ConsoleConfig::Stdio;
    let console = match console {
        Some(c) => c,
        None => console_writer(&config.console)?,
    };

    let Prewarmed { vm, cpuid, msrs } = match pre {
        Some(p) => p,
        None => prewarm()?,
    };
    log::info!("KVM: {}", kvm::kvm_kind());
    if let Some(src) = &restore {
        check_restorable(config, src, cpuid.as_slice())?;
    }

    let mem = match &restore {
        None => kvm::memory::create(config.machine.mem_mib)?,
        Some(src) => kvm::memory::create_from_file(config.machine.mem_mib, &src.memory)?,
    };
    // Memory slots before the irqchip and PIT: KVM's first slot added after the irqchip
    // exists costs milliseconds (~7 ms on kvm-pvm, whatever its size), before it ~0.1 ms.
    kvm::memory::register(&vm, &mem, config.machine.track_dirty_pages)?;
    arch::configure_vm(&vm)?;

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
    let i8042_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&i8042_irq, legacy::I8042_IRQ)
        .map_err(kvm_call("registering the i8042 irqfd"))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), i8042_irq)));
    pio.insert(
        legacy::I8042_PORT,
        legacy::I8042_LEN,
        BusDevice::I8042(i8042.clone()),
    )?;
    let mut virtio = VirtioSlots::new();
    // The root disk first, so the guest sees it as /dev/vda; `i` is the position in the config.
    let (root, other): (Vec<_>, Vec<_>) =
        config.disks.iter().enumerate().partition(|(_, d)| d.root);
    let mut root_arg = String::new();
    for (i, d) in root.into_iter().chain(other) {
        let blk = Block::new(d, i)?;
        if d.root {
            root_arg = format!("root=/dev/vda {}", if d.read_only { "ro" } else { "rw" });
        }
        virtio.add(&vm, &mem, d.device_name(i), blk)?;
    }
    for (i, n) in config.nets.iter().enumerate() {
        virtio.add(&vm, &mem, n.device_name(), Net::new(n, i)?)?;
    }
    if let Some(v) = &config.vsock {
        virtio.add(&vm, &mem, "vsock".into(), Vsock::new(v)?)?;
    }
    if config.rng {
        virtio.add(&vm, &mem, "rng".into(), Rng::new()?)?;
    }
    let balloon = match &config.balloon {
        Some(b) => Some(virtio.add(&vm, &mem, "balloon".into(), Balloon::new(b)?)?),
        None => None,
    };
    let mmio = std::mem::take(&mut virtio.bus);

    let vcpu_count =
        u8::try_from(config.machine.vcpus).map_err(|_| ConfigError::Vcpus(config.machine.vcpus))?;
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let counters = Arc::new(ExitCounters::default());
    // Every vCPU thread gets the same filter: compiled once here, not once per vCPU.
    let vcpu_filter = crate::seccomp::filter(crate::seccomp::ThreadKind::Vcpu, config.seccomp)?;
    let start_vcpu = |id: u8, fd| {
        Vcpu::new(
            id,
            fd,
            pio.clone(),
            mmio.clone(),
            exit.clone(),
            counters.clone(),
            msrs.clone(),
        )
        .start(vcpu_filter.clone())
    };
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));

    let restored = if let Some(src) = restore {
        let body = &src.state.body;
        // The VM's interrupt controllers and PIT, then each vCPU (its LAPIC among it), then the
        // devices (their queues live in the restored memory).
        arch::state::restore_vm(&vm, &body.vm)?;
        for (id, saved) in (0..vcpu_count).zip(&body.vcpus) {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_call("creating a vcpu"))?;
            arch::state::restore_vcpu(&fd, saved)?;
            vcpus.push(start_vcpu(id, fd)?);
        }
        // Devices last: restoring them may raise interrupts, which must land in the restored
        // interrupt controllers. The kvmclock goes back on resume.
        if body.devices.len() != virtio.transports.len() {
            return Err(BuildError::Snapshot(SnapshotMismatch(format!(
                "it holds {} virtio devices, the configuration {}",
                body.devices.len(),
                virtio.transports.len()
            ))));
        }
        for ((name, saved), (here, t)) in body.devices.iter().zip(&virtio.transports) {
            if name != here {
                return Err(BuildError::Snapshot(SnapshotMismatch(format!(
                    "its device {name} is {here} in the configuration"
                ))));
            }
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(saved)
                .map_err(|source| BuildError::DeviceState {
                    name: name.clone(),
                    source,
                })?;
        }
        serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&body.serial)
            .map_err(|source| BuildError::DeviceState {
                name: "serial".into(),
                source,
            })?;
        i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&body.i8042)
            .map_err(|source| BuildError::DeviceState {
                name: "i8042".into(),
                source,
            })?;
        Some(Restored {
            clock: body.vm.clock,
            snapshot_id: src.state.header.id.clone(),
            memory: src.memory,
        })
    } else {
        let cmdline = join_cmdline(
            &config.boot.effective_cmdline(),
            &format!("{} {root_arg}", virtio.cmdline),
        );
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

        for id in 0..vcpu_count {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_call("creating a vcpu"))?;
            arch::configure_vcpu(&fd, id, vcpu_count, &setup, &cpuid)?;
            vcpus.push(start_vcpu(id, fd)?);
        }
        None
    };

    let mut vmm = Vmm::new(VmParts {
        config: config.clone(),
        vm,
        mem,
        vcpus,
        exit,
        serial,
        i8042,
        subscribers: virtio.subscribers,
        devices: virtio.devices,
        transports: virtio.transports,
        balloon,
        stdin_input,
        exit_counters: counters,
    })?;
    if let Some(r) = restored {
        vmm.set_restored(r);
    }
    Ok(vmm)
}

/// Hands out virtio-mmio windows and GSIs, in order, from one place, and collects what each
/// device needs elsewhere: its bus entry, its kernel command-line fragment, its event-loop
/// subscription.
struct VirtioSlots {
    bus: Bus,
    count: u64,
    cmdline: String,
    subscribers: Vec<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    devices: Vec<(String, SharedDevice)>,
    transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
}

impl VirtioSlots {
    fn new() -> Self {
        VirtioSlots {
            bus: Bus::new(),
            count: 0,
            cmdline: String::new(),
            subscribers: Vec::new(),
            devices: Vec::new(),
            transports: Vec::new(),
        }
    }

    /// Places `dev` in the next window: ioeventfds on QueueNotify (one per queue, matched on
    /// the queue index), an irqfd on its GSI, the transport on the MMIO bus. `name` identifies
    /// the device in metrics ("rng", "block:ID", ...).
    fn add<D>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        name: String,
        dev: D,
    ) -> Result<Arc<Mutex<D>>, BuildError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let max = u64::from(layout::LAST_DEVICE_IRQ - layout::FIRST_DEVICE_IRQ + 1);
        if self.count >= max {
            return Err(BuildError::NoDeviceSlot(max as usize));
        }
        let addr = layout::VIRTIO_MMIO_START + self.count * layout::VIRTIO_MMIO_WINDOW;
        // `count` < 19, so the GSI fits.
        let irq = layout::FIRST_DEVICE_IRQ + self.count as u32;
        let queues = dev.queue_max_sizes().len();
        let dev = Arc::new(Mutex::new(dev));

        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)
            .map_err(kvm_call("registering a virtio irqfd"))?;
        let mut queue_evts = Vec::with_capacity(queues);
        for i in 0..queues as u32 {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(addr + NOTIFY_OFFSET), i)
                .map_err(kvm_call("registering a virtio ioeventfd"))?;
            queue_evts.push(Arc::new(evt));
        }
        let shared: SharedDevice = dev.clone();
        self.devices.push((name.clone(), shared.clone()));
        let transport = MmioTransport::new(
            shared,
            mem.clone(),
            Arc::new(Interrupt::new(irqfd)),
            queue_evts,
        );
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push((name, transport.clone()));
        self.bus.insert(
            addr,
            layout::VIRTIO_MMIO_WINDOW,
            BusDevice::Virtio(transport),
        )?;
        self.cmdline
            .push_str(&format!(" virtio_mmio.device=4K@{addr:#x}:{irq}"));
        self.subscribers.push(dev.clone());
        self.count += 1;
        Ok(dev)
    }
}

/// The caller's command line followed by what the devices add.
fn join_cmdline(base: &str, extra: &str) -> String {
    format!("{base} {extra}").trim().to_string()
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
