//! The `ledge` command line: flags or a config file → `VmConfig`. No VM logic lives here.
//!
//! A flag given on the command line overrides the same field from `--config-file`, so a saved
//! config can be reused with one value changed.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{BootProtocol, ConfigError, ConsoleConfig, SeccompLevel, VmConfig};

const EXAMPLES: &str = "\
Examples:
  ledge run                                   boot the built-in probe guest (no download needed)
  ledge run --vcpus 2 --cmdline probe=count   the probe guest, 2 vCPUs, printing a counter
  ledge run --kernel vmlinux --initrd initramfs.cpio.gz --mem-mib 256
  ledge run --kernel bzImage --cmdline 'console=ttyS0 reboot=k panic=1' --console file:/tmp/con
  ledge run --config-file vm.json --vcpus 4   a config file, with one value overridden
  ledge run --kernel vmlinux --disk path=rootfs.img,root,bw=10MiB,ops=500   a rate-limited disk
  ledge export-probe probe.elf                write the probe guest for other VMMs
  ledge snapshot create --api-sock /tmp/l.sock --snapshot vm.snap --mem vm.mem --pause
  ledge restore --snapshot vm.snap --mem vm.mem --api-sock /tmp/l2.sock
  ledge --api-sock /tmp/ledge.sock            wait for configuration over the API (Firecracker style)
  ledge jail --id vm1 --uid 10000 --gid 10000 --cgroup memory.max=512M -- run --api-sock /run/api.sock
                                              the same VMM confined; its socket: /srv/ledge/vm1/root/run/api.sock
  ledge --api-sock /tmp/l.sock --config-file vm.json   boot from a Firecracker config, serve the API";

/// Ledge: a micro-VM monitor for edge hosts.
///
/// With no command, Ledge runs like Firecracker: `ledge --api-sock PATH` serves the control
/// API and waits for configuration; with `--config-file` it boots at once (and still serves the
/// socket unless `--no-api`).
#[derive(Debug, Parser)]
#[command(name = "ledge", version, about, after_help = EXAMPLES)]
pub struct Cli {
    /// Log level on stderr: off, error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL",
          value_parser = ["off", "error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
    /// Serve the Firecracker-compatible control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// The VM's id, reported by `GET /`.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    pub id: String,
    /// Boot at once from this config file (Firecracker's keys, or Ledge's own).
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// With --config-file: boot without serving the API.
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// Seccomp filters on the vCPU, VMM and API threads: `kill` ends the process with SIGSYS
    /// when a thread makes a system call outside its allow-list, `log` lets the call through
    /// and the kernel logs it (dmesg / audit log) [default: kill].
    #[arg(long, global = true, value_name = "ACTION", value_parser = ["kill", "log"])]
    pub seccomp: Option<String>,
    /// Run without seccomp filters (for debugging only).
    #[arg(long, global = true, conflicts_with = "seccomp")]
    pub no_seccomp: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The seccomp level `--seccomp` / `--no-seccomp` ask for.
    pub fn seccomp_level(&self) -> SeccompLevel {
        match (self.no_seccomp, self.seccomp.as_deref()) {
            (true, _) => SeccompLevel::Off,
            (false, Some("log")) => SeccompLevel::Log,
            _ => SeccompLevel::Kill,
        }
    }

    /// `--seccomp ACTION` / `--no-seccomp` as given (nothing when neither was), for a VMM that
    /// runs as another process: `ledge jail` passes them on to the ledge it starts.
    pub fn seccomp_args(&self) -> Vec<String> {
        match (self.no_seccomp, &self.seccomp) {
            (true, _) => vec!["--no-seccomp".into()],
            (false, Some(a)) => vec!["--seccomp".into(), a.clone()],
            (false, None) => Vec::new(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM in the foreground; exits when the guest powers off or reboots.
    Run(Box<RunArgs>),
    /// Write the built-in probe guest (a PVH ELF) to PATH.
    ExportProbe {
        /// Where to write the ELF.
        path: PathBuf,
    },
    /// Snapshots: create one through a running VM's API socket, merge a diff, inspect a file.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Restore a snapshot in a new process and run it (in the foreground, or serving the API).
    Restore(Box<RestoreArgs>),
    /// As root: run `ledge LEDGE_ARGS` confined (namespaces, pivot_root, cgroup, no
    /// capabilities, another uid/gid). Paths in LEDGE_ARGS are paths inside the jail.
    Jail(Box<crate::jail::JailArgs>),
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Ask the VM behind --api-sock for a snapshot (the VM must be paused, or use --pause).
    Create {
        /// The VM's API socket.
        #[arg(long, value_name = "PATH")]
        api_sock: PathBuf,
        /// The state file to write.
        #[arg(long, value_name = "PATH")]
        snapshot: PathBuf,
        /// The memory file to write.
        #[arg(long, value_name = "PATH")]
        mem: PathBuf,
        /// Full (all memory) or diff (pages written since the last snapshot; needs
        /// track_dirty_pages).
        #[arg(long = "type", value_name = "TYPE", default_value = "full",
              value_parser = ["full", "diff"])]
        kind: String,
        /// Pause the VM first and resume it afterwards.
        #[arg(long)]
        pause: bool,
    },
    /// Apply a diff snapshot's memory onto its base memory file, in place.
    Merge {
        /// The base memory file (a Full snapshot's, or already merged up to the diff's parent).
        #[arg(long, value_name = "PATH")]
        base: PathBuf,
        /// The diff's memory file.
        #[arg(long, value_name = "PATH")]
        diff: PathBuf,
        /// The diff's state file.
        #[arg(long, value_name = "PATH")]
        diff_snapshot: PathBuf,
    },
    /// Check a state file and print its header as JSON.
    Info {
        /// The state file.
        path: PathBuf,
    },
}

/// `ledge restore` flags: the snapshot/load request, from the command line.
#[derive(Debug, Default, Args)]
pub struct RestoreArgs {
    /// The state file.
    #[arg(long, value_name = "PATH")]
    pub snapshot: PathBuf,
    /// The memory file (for a Diff snapshot: its base with the diffs merged in).
    #[arg(long, value_name = "PATH")]
    pub mem: PathBuf,
    /// Serve the control API on this socket instead of running in the foreground only.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Give a restored network interface another TAP: IFACE_ID=TAP (repeatable).
    #[arg(long = "net-override", value_name = "ID=TAP")]
    pub net_overrides: Vec<String>,
    /// Give the restored vsock device another host socket path.
    #[arg(long, value_name = "PATH")]
    pub vsock_override: Option<PathBuf>,
    /// Keep logging dirty pages, for later Diff snapshots.
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// Leave the VM paused (only useful with --api-sock).
    #[arg(long, requires = "api_sock")]
    pub paused: bool,
    /// Guest console (COM1): stdio, off or file:PATH [default: stdio].
    #[arg(long, value_name = "WHERE")]
    pub console: Option<ConsoleConfig>,
}

impl RestoreArgs {
    /// The equivalent `PUT /snapshot/load` body.
    pub fn to_load_params(&self) -> Result<crate::api::types::SnapshotLoadParams, String> {
        use crate::api::types::{
            MemBackend, MemBackendType, NetworkOverride, SnapshotLoadParams, VsockOverride,
        };
        let mut network_overrides = Vec::new();
        for o in &self.net_overrides {
            let Some((id, tap)) = o.split_once('=') else {
                return Err(format!("--net-override {o:?}: write it as IFACE_ID=TAP"));
            };
            network_overrides.push(NetworkOverride {
                iface_id: id.to_string(),
                host_dev_name: tap.to_string(),
            });
        }
        Ok(SnapshotLoadParams {
            snapshot_path: self.snapshot.display().to_string(),
            mem_file_path: None,
            mem_backend: Some(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: self.mem.display().to_string(),
            }),
            enable_diff_snapshots: false,
            track_dirty_pages: self.track_dirty_pages,
            resume_vm: !self.paused,
            network_overrides,
            vsock_override: self.vsock_override.as_ref().map(|p| VsockOverride {
                uds_path: p.display().to_string(),
            }),
        })
    }
}

/// `ledge run` flags; each one maps onto one `VmConfig` field.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Kernel: vmlinux ELF, bzImage or PVH ELF. Without it the built-in probe guest boots.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default "console=ttyS0 reboot=k panic=1").
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1-32) [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB [default: 128].
    #[arg(long, value_name = "N")]
    pub mem_mib: Option<u64>,
    /// Guest console (COM1): stdio, off or file:PATH [default: stdio].
    #[arg(long, value_name = "WHERE")]
    pub console: Option<ConsoleConfig>,
    /// Boot protocol: auto (PVH if the ELF has the PVH note, else Linux), linux or pvh.
    #[arg(long, value_name = "PROTO")]
    pub boot_protocol: Option<BootProtocol>,
    /// A virtio-blk disk: path=P[,ro][,id=ID][,root] (repeatable). Rate limits: bw=BYTES
    /// (per second, e.g. 10MiB), ops=N (requests per second), or the full buckets bw-size=,
    /// bw-refill-ms=, bw-burst=, ops-size=, ops-refill-ms=, ops-burst=.
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<crate::config::DiskConfig>,
    /// A virtio-net interface on a TAP device: tap=NAME[,mac=MAC][,id=ID] (repeatable). Rate
    /// limits per direction (rx: to the guest, tx: from it): rx-bw=, rx-ops=, tx-bw=, tx-ops=,
    /// and the full forms rx-bw-size=, rx-bw-refill-ms=, rx-bw-burst= ... as for --disk.
    #[arg(long, value_name = "SPEC")]
    pub net: Vec<crate::config::NetConfig>,
    /// virtio-vsock: cid=N,uds=PATH.
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<crate::config::VsockConfig>,
    /// A virtio-rng device fed from the host's entropy pool.
    #[arg(long)]
    pub rng: bool,
    /// virtio-balloon: mib=N[,deflate-on-oom][,stats=SECONDS].
    #[arg(long, value_name = "SPEC")]
    pub balloon: Option<crate::config::BalloonConfig>,
    /// Also serve the control API on this Unix socket while the VM runs.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// JSON config file (keys: machine, boot, console, disks, nets, vsock, rng, balloon); flags
    /// override its values, device flags add to its devices.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
}

impl RunArgs {
    /// The `VmConfig` these flags describe (validated later, by the builder).
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let mut c = match &self.config_file {
            Some(p) => VmConfig::from_file(p)?,
            None => VmConfig::default(),
        };
        if let Some(k) = &self.kernel {
            c.boot.kernel = Some(k.clone());
        }
        if let Some(i) = &self.initrd {
            c.boot.initrd = Some(i.clone());
        }
        if let Some(s) = &self.cmdline {
            c.boot.cmdline = Some(s.clone());
        }
        if let Some(p) = self.boot_protocol {
            c.boot.protocol = p;
        }
        if let Some(n) = self.vcpus {
            c.machine.vcpus = n;
        }
        if let Some(m) = self.mem_mib {
            c.machine.mem_mib = m;
        }
        if let Some(con) = &self.console {
            c.console = con.clone();
        }
        c.disks.extend(self.disk.iter().cloned());
        c.nets.extend(self.net.iter().cloned());
        if let Some(v) = &self.vsock {
            c.vsock = Some(v.clone());
        }
        if self.rng {
            c.rng = true;
        }
        if let Some(b) = &self.balloon {
            c.balloon = Some(b.clone());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn run_args(args: &[&str]) -> RunArgs {
        let mut v = vec!["ledge", "run"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Some(Command::Run(r)) => *r,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_map_onto_the_config() {
        let c = run_args(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "a=1 b",
            "--vcpus",
            "4",
            "--mem-mib",
            "256",
            "--console",
            "off",
            "--boot-protocol",
            "pvh",
        ])
        .to_config()
        .unwrap();
        assert_eq!(c.boot.kernel.as_deref(), Some(std::path::Path::new("/k")));
        assert_eq!(c.boot.cmdline.as_deref(), Some("a=1 b"));
        assert_eq!(c.machine.vcpus, 4);
        assert_eq!(c.machine.mem_mib, 256);
        assert_eq!(c.console, ConsoleConfig::Off);
        assert_eq!(c.boot.protocol, BootProtocol::Pvh);
    }

    #[test]
    fn no_flags_is_the_probe_guest() {
        assert_eq!(run_args(&[]).to_config().unwrap(), VmConfig::default());
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = std::env::temp_dir().join(format!("ledge-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.json");
        std::fs::write(
            &f,
            r#"{"machine":{"vcpus":2,"mem_mib":64},"console":"off"}"#,
        )
        .unwrap();
        let c = run_args(&["--config-file", f.to_str().unwrap(), "--vcpus", "3"])
            .to_config()
            .unwrap();
        assert_eq!((c.machine.vcpus, c.machine.mem_mib), (3, 64));
        assert_eq!(c.console, ConsoleConfig::Off);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn seccomp_flags() {
        let level = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.seccomp_level());
        assert_eq!(level(&["ledge", "run"]).unwrap(), SeccompLevel::Kill);
        assert_eq!(
            level(&["ledge", "run", "--seccomp", "log"]).unwrap(),
            SeccompLevel::Log
        );
        assert_eq!(
            level(&[
                "ledge",
                "--seccomp",
                "kill",
                "restore",
                "--snapshot",
                "s",
                "--mem",
                "m"
            ])
            .unwrap(),
            SeccompLevel::Kill
        );
        assert_eq!(
            level(&["ledge", "--api-sock", "/s", "--no-seccomp"]).unwrap(),
            SeccompLevel::Off
        );
        assert!(level(&["ledge", "run", "--seccomp", "trap"]).is_err());
        assert!(level(&["ledge", "run", "--seccomp", "log", "--no-seccomp"]).is_err());
    }

    /// What `ledge jail` passes on to the VMM: the flags as given, before or after `jail`.
    #[test]
    fn seccomp_args_for_the_jail() {
        let fwd = |args: &[&str]| Cli::try_parse_from(args).unwrap().seccomp_args();
        let jail = ["jail", "--id", "j", "--uid", "1", "--gid", "1"];
        let with = |pre: &[&str], post: &[&str]| {
            let mut v = vec!["ledge"];
            v.extend_from_slice(pre);
            v.extend_from_slice(&jail);
            v.extend_from_slice(post);
            v.extend_from_slice(&["--", "run"]);
            fwd(&v)
        };
        assert!(with(&[], &[]).is_empty());
        assert_eq!(with(&["--seccomp", "log"], &[]), ["--seccomp", "log"]);
        assert_eq!(with(&[], &["--seccomp", "kill"]), ["--seccomp", "kill"]);
        assert_eq!(with(&["--no-seccomp"], &[]), ["--no-seccomp"]);
        assert_eq!(with(&[], &["--no-seccomp"]), ["--no-seccomp"]);
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        for bad in [
            &["--vcpus", "x"][..],
            &["--console", "tty"],
            &["--boot-protocol", "multiboot"],
            &["--mem-mib", "-1"],
            &["--bogus"],
        ] {
            let mut v = vec!["ledge", "run"];
            v.extend_from_slice(bad);
            assert!(Cli::try_parse_from(v).is_err(), "{bad:?}");
        }
    }
}
