//! The `ledge` command line: flags or a config file → `VmConfig`. No VM logic lives here.
//!
//! A flag given on the command line overrides the same field from `--config-file`, so a saved
//! config can be reused with one value changed.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{BootProtocol, ConfigError, ConsoleConfig, VmConfig};

const EXAMPLES: &str = "\
Examples:
  ledge run                                   boot the built-in probe guest (no download needed)
  ledge run --vcpus 2 --cmdline probe=count   the probe guest, 2 vCPUs, printing a counter
  ledge run --kernel vmlinux --initrd initramfs.cpio.gz --mem-mib 256
  ledge run --kernel bzImage --cmdline 'console=ttyS0 reboot=k panic=1' --console file:/tmp/con
  ledge run --config-file vm.json --vcpus 4   a config file, with one value overridden
  ledge export-probe probe.elf                write the probe guest for other VMMs
  ledge --api-sock /tmp/ledge.sock            wait for configuration over the API (Firecracker style)
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
    #[command(subcommand)]
    pub command: Option<Command>,
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
    /// A virtio-blk disk: path=P[,ro][,id=ID][,root] (repeatable).
    #[arg(long, value_name = "SPEC")]
    pub disk: Vec<crate::config::DiskConfig>,
    /// A virtio-net interface on a TAP device: tap=NAME[,mac=MAC][,id=ID] (repeatable).
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
