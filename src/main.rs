//! The `ledge` binary: parse the command line, pick the logger, run, turn the outcome into an
//! exit status. Exit status: 0 when the guest reset or powered off, 1 with a one-line reason
//! on any error (bad input, KVM, a guest fault such as a triple fault), 2 for usage errors.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use ledge::cli::{Cli, Command};

/// Makes sure fds 0, 1 and 2 are open (on /dev/null if they were closed), so that no file
/// Ledge opens later — an eventfd, the console file — lands on "stdin" and gets read as
/// console input, or on "stdout" and gets the guest's output.
fn fill_standard_fds() {
    use std::os::fd::AsRawFd;
    while let Ok(f) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        if f.as_raw_fd() > 2 {
            break; // dropped: closes it
        }
        std::mem::forget(f); // keeps 0, 1 or 2 pointing at /dev/null for the process lifetime
    }
}

fn main() -> ExitCode {
    fill_standard_fds();
    let cli = Cli::parse();
    ledge::logger::init(cli.log_level.parse().unwrap_or(log::LevelFilter::Warn));
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ledge: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::ExportProbe { path } => {
            std::fs::write(&path, ledge::probe::PROBE_ELF)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let config = args.to_config()?;
            let mut vmm = ledge::build(&config)?;
            let exit = vmm.run()?;
            log::info!("vcpu exits to userspace: {}", vmm.exit_counts());
            if exit.is_clean() {
                log::info!("{exit}");
                Ok(ExitCode::SUCCESS)
            } else {
                anyhow::bail!("{exit}")
            }
        }
    }
}
