//! `VmConfig`: the one schema every front end produces.
//!
//! The CLI flags, a JSON config file and library callers all end in a `VmConfig`; nothing else
//! builds a VM. `validate()` runs before anything touches KVM, so a bad value is refused with a
//! message that names the field, without side effects. Every struct denies unknown keys: a key
//! Ledge does not understand is an error, never silently ignored.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::arch::x86_64::layout::{MAX_MEM_MIB, MIN_MEM_MIB};
use crate::arch::x86_64::MAX_VCPUS;
pub use crate::boot::BootProtocol;

/// Kernel command line used for a Linux kernel when the caller gives none.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Largest config file Ledge reads; a real one is a few hundred bytes.
const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Errors in a configuration, each naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("vcpus must be between 1 and {max} (got {0})", max = MAX_VCPUS)]
    Vcpus(u32),
    #[error("mem_mib must be between {min} and {max} (got {0})", min = MIN_MEM_MIB, max = MAX_MEM_MIB)]
    MemSize(u64),
    #[error("{field} is empty: give a file path")]
    EmptyPath { field: &'static str },
    #[error("initrd needs a kernel: the built-in probe guest takes no initrd")]
    InitrdWithoutKernel,
    #[error("cmdline contains a NUL byte")]
    CmdlineNul,
    #[error("cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is larger than {max} bytes", max = MAX_CONFIG_FILE_BYTES)]
    FileTooLarge { path: PathBuf },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid console {0:?}: use stdio, off or file:PATH")]
    Console(String),
}

/// The whole description of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub machine: MachineConfig,
    #[serde(default)]
    pub boot: BootConfig,
    #[serde(default)]
    pub console: ConsoleConfig,
}

/// vCPUs and memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u64,
}

fn default_vcpus() -> u32 {
    1
}

fn default_mem_mib() -> u64 {
    128
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: default_vcpus(),
            mem_mib: default_mem_mib(),
        }
    }
}

/// What to boot. No kernel means the built-in probe guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Replaces the default command line entirely when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub protocol: BootProtocol,
}

impl BootConfig {
    /// The command line the guest gets: the caller's, or the default for the kind of guest.
    pub fn effective_cmdline(&self) -> String {
        match (&self.cmdline, &self.kernel) {
            (Some(c), _) => c.clone(),
            (None, Some(_)) => DEFAULT_LINUX_CMDLINE.to_string(),
            (None, None) => String::new(),
        }
    }
}

/// Where the guest's COM1 goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ConsoleConfig {
    /// Output to stdout; input from stdin when stdin can be polled.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded.
    Off,
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "off" => Ok(ConsoleConfig::Off),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(p))),
                _ => Err(ConfigError::Console(s.to_string())),
            },
        }
    }
}

impl TryFrom<String> for ConsoleConfig {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl From<ConsoleConfig> for String {
    fn from(c: ConsoleConfig) -> String {
        c.to_string()
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConsoleConfig::Stdio => f.write_str("stdio"),
            ConsoleConfig::Off => f.write_str("off"),
            ConsoleConfig::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl VmConfig {
    /// Checks every field; nothing has touched KVM or the files yet.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.machine;
        if m.vcpus == 0 || m.vcpus > u32::from(MAX_VCPUS) {
            return Err(ConfigError::Vcpus(m.vcpus));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&m.mem_mib) {
            return Err(ConfigError::MemSize(m.mem_mib));
        }
        let b = &self.boot;
        check_path("kernel", b.kernel.as_deref())?;
        check_path("initrd", b.initrd.as_deref())?;
        if b.initrd.is_some() && b.kernel.is_none() {
            return Err(ConfigError::InitrdWithoutKernel);
        }
        if b.cmdline.as_deref().is_some_and(|c| c.contains('\0')) {
            return Err(ConfigError::CmdlineNul);
        }
        if let ConsoleConfig::File(p) = &self.console {
            check_path("console file", Some(p))?;
        }
        Ok(())
    }

    /// Parses a JSON config file (the same keys `VmConfig` serialises to).
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a config file, refusing absurdly large ones.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read;
        let read_err = |source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_FILE_BYTES {
            return Err(ConfigError::FileTooLarge {
                path: path.to_path_buf(),
            });
        }
        Self::from_json(&text, path)
    }
}

fn check_path(field: &'static str, p: Option<&Path>) -> Result<(), ConfigError> {
    match p {
        Some(p) if p.as_os_str().is_empty() => Err(ConfigError::EmptyPath { field }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_json(s, Path::new("t.json"))
    }

    #[test]
    fn empty_object_is_the_default_probe_vm() {
        let c = parse("{}").unwrap();
        assert_eq!(c, VmConfig::default());
        assert_eq!(c.machine.vcpus, 1);
        assert_eq!(c.machine.mem_mib, 128);
        assert!(c.boot.kernel.is_none());
        c.validate().unwrap();
    }

    #[test]
    fn full_config_round_trips() {
        let c = parse(
            r#"{"machine":{"vcpus":4,"mem_mib":512},
                "boot":{"kernel":"/k","initrd":"/i","cmdline":"console=ttyS0","protocol":"pvh"},
                "console":"file:/tmp/out"}"#,
        )
        .unwrap();
        assert_eq!(c.machine.vcpus, 4);
        assert_eq!(c.boot.protocol, BootProtocol::Pvh);
        assert_eq!(c.console, ConsoleConfig::File("/tmp/out".into()));
        let again = parse(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn unknown_keys_are_refused_and_named() {
        for bad in [
            r#"{"machin":{}}"#,
            r#"{"machine":{"vcpu":2}}"#,
            r#"{"boot":{"kernal":"/k"}}"#,
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("unknown field"), "{bad}: {e}");
        }
    }

    #[test]
    fn vcpu_bounds() {
        let mut c = VmConfig::default();
        for (n, ok) in [(0, false), (1, true), (32, true), (33, false), (300, false)] {
            c.machine.vcpus = n;
            assert_eq!(c.validate().is_ok(), ok, "vcpus={n}");
        }
        c.machine.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("vcpus"));
    }

    #[test]
    fn mem_bounds() {
        let mut c = VmConfig::default();
        c.machine.mem_mib = 0;
        assert!(c.validate().unwrap_err().to_string().contains("mem_mib"));
        c.machine.mem_mib = MAX_MEM_MIB + 1;
        assert!(c.validate().is_err());
        c.machine.mem_mib = 2048;
        c.validate().unwrap();
    }

    #[test]
    fn console_forms() {
        assert_eq!(
            "stdio".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::Stdio
        );
        assert_eq!("off".parse::<ConsoleConfig>().unwrap(), ConsoleConfig::Off);
        assert_eq!(
            "file:/a/b".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::File("/a/b".into())
        );
        for bad in ["file:", "tty", ""] {
            assert!(bad.parse::<ConsoleConfig>().is_err(), "{bad}");
        }
        assert!(parse(r#"{"console":"serial"}"#).is_err());
    }

    #[test]
    fn initrd_needs_kernel_and_paths_not_empty() {
        let mut c = VmConfig::default();
        c.boot.initrd = Some("/i".into());
        assert!(matches!(
            c.validate(),
            Err(ConfigError::InitrdWithoutKernel)
        ));
        c.boot.kernel = Some("".into());
        assert!(matches!(c.validate(), Err(ConfigError::EmptyPath { .. })));
    }

    #[test]
    fn default_cmdline_depends_on_guest() {
        let mut b = BootConfig::default();
        assert_eq!(b.effective_cmdline(), "");
        b.kernel = Some("/k".into());
        assert_eq!(b.effective_cmdline(), DEFAULT_LINUX_CMDLINE);
        b.cmdline = Some("x=1".into());
        assert_eq!(b.effective_cmdline(), "x=1");
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let e = VmConfig::from_file(Path::new("/nonexistent/vm.json")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vm.json"));
        let e = parse("{not json").unwrap_err();
        assert!(e.to_string().contains("t.json"));
    }
}
