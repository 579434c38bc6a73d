//! # Ledge: a micro-VM monitor for edge hosts
//!
//! Ledge runs each workload in its own KVM micro-VM. This crate is the one core behind every
//! front end: the `ledge` command line (src/main.rs), and Rust programs that embed it.
//!
//! ## Using it as a library
//! ```no_run
//! let mut config = ledge::config::VmConfig::default(); // the built-in probe guest
//! config.boot.cmdline = Some("probe=hello".into());
//! let mut vmm = ledge::builder::build(&config)?;   // vCPUs created, paused
//! let exit = vmm.run()?;                            // start, serve events until the guest stops
//! assert!(exit.is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//! The library never exits the process, never touches the terminal, and reports every failure
//! as a typed error. `controller::VmmHandle` runs a VM on its own thread and takes the same
//! requests as the HTTP API (see examples/agent.rs).
//!
//! ## Threads
//! - the VMM thread runs the event loop (`Vmm::run` / `Vmm::poll`): the stop event, console
//!   input, API requests and every virtio device's queues and backends. It is the caller's
//!   thread with `Vmm::run`, or a thread named `vmm` under `controller::VmmHandle`;
//! - one thread per vCPU, named `vcpuN`, started paused and driven by `VcpuCommand`s
//!   (`kvm::vcpu`); guest port and MMIO accesses are dispatched on these threads through
//!   `devices::Bus`;
//! - with a control socket, the `api` thread: HTTP in, `api::Request` to the VMM thread, HTTP out.
//!
//! The one process-wide signal handler the library installs is for `SIGRTMIN`, which kicks a
//! vCPU thread out of `KVM_RUN`.
//!
//! Every vCPU thread, the `vmm` thread of a `VmmHandle` and the `api` thread install a seccomp
//! filter (`seccomp`) before the guest runs; `VmConfig::seccomp` chooses what a forbidden call
//! does, by default `Kill` (the process dies with SIGSYS). A caller's own thread running
//! `Vmm::run` is not filtered unless it calls `seccomp::install` itself.
//!
//! ## Code map
//! - `api`: the control API, Firecracker-compatible HTTP over a Unix socket (API thread);
//! - `config`: `VmConfig`, the one schema, and its validation;
//! - `cli`: command-line flags → `VmConfig` (no VM logic);
//! - `builder`: `VmConfig` → `Vmm` (the boot order lives there);
//! - `controller`: the VMM thread behind the API: answers `api::Request`s, owns the VM;
//! - `vmm`: `Vmm`, the lifecycle transition table, the event loop;
//! - `exit`: why a VM stops and how any thread asks for it;
//! - `jail`: `ledge jail`, the VMM confined (namespaces, pivot_root, cgroup, no capabilities);
//! - `kvm`: /dev/kvm, guest memory slots, vCPU threads and exit dispatch;
//! - `arch::x86_64`: the guest physical layout, CPUID, MSRs, registers, MP table;
//! - `boot`: kernel (vmlinux, bzImage, PVH ELF) and initrd loading, boot parameters;
//! - `devices`: the buses, the legacy devices (COM1, i8042) and the virtio devices;
//! - `logger`: the opt-in logger the binary installs (stderr or a file, level at run time);
//! - `probe`: the embedded probe guest;
//! - `rate_limiter`: token buckets for the virtio-blk and virtio-net devices;
//! - `seccomp`: the system-call filters of the vCPU, VMM and API threads;
//! - `snapshot`: the snapshot state-file format, memory files and diff merging.
//!
//! resources/ARCHITECTURE.md has the longer version.

pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod config;
pub mod controller;
pub mod devices;
pub mod exit;
pub mod jail;
pub mod kvm;
pub mod logger;
pub mod probe;
pub mod rate_limiter;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;

pub use builder::build;
pub use config::VmConfig;
pub use exit::VmExit;
pub use vmm::{VmState, Vmm};
