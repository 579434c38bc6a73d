//! The `ledge` binary: parse the command line, pick the logger, run, turn the outcome into an
//! exit status. Exit status: 0 when the guest reset or powered off, 1 with a one-line reason
//! on any error (bad input, KVM, a guest fault such as a triple fault), 2 for usage errors.

use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Context;
use clap::Parser;
use std::time::Duration;

use ledge::api::{client, ApiServer, ServerOptions};
use ledge::cli::{Cli, Command, RestoreArgs, SnapshotCommand};
use ledge::config::SeccompLevel;
use ledge::controller::{load_config_file, Controller, LoadedConfig};
use ledge::seccomp::ThreadKind;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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

/// The eventfd the termination signal handler writes to (-1 until installed).
static TERMINATE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_: libc::c_int) {
    let fd = TERMINATE_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a live 8-byte value and `fd` an
        // eventfd that stays open for the life of the process.
        unsafe { libc::write(fd, std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// SIGTERM, SIGINT and SIGHUP stop the VM cleanly (sockets removed, exit status 0) instead of
/// killing the process mid-write. The handler only writes an eventfd; the VMM loop does the rest.
fn install_termination_handler() -> anyhow::Result<EventFd> {
    let evt = EventFd::new(EFD_NONBLOCK).context("cannot create the termination eventfd")?;
    let keep = evt
        .try_clone()
        .context("cannot create the termination eventfd")?;
    TERMINATE_FD.store(std::os::fd::IntoRawFd::into_raw_fd(keep), Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid value to fill in; the handler only calls
        // async-signal-safe functions; the pointers passed are valid for the call.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_terminate as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            anyhow::bail!("cannot install the handler for signal {sig}");
        }
    }
    Ok(evt)
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
    let terminate = install_termination_handler()?;
    let seccomp = cli.seccomp_level();
    let seccomp_args = cli.seccomp_args();
    match cli.command {
        Some(Command::ExportProbe { path }) => {
            std::fs::write(&path, ledge::probe::PROBE_ELF)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Snapshot(cmd)) => snapshot_command(cmd),
        Some(Command::Restore(args)) => restore(&cli.id, &args, seccomp, terminate),
        Some(Command::Jail(mut args)) => {
            // The jailer installs no filter of its own: the flags are the VMM's.
            args.vmm_flags = seccomp_args;
            let status = ledge::jail::run(&args, std::os::fd::AsRawFd::as_raw_fd(&terminate))?;
            Ok(ExitCode::from(u8::try_from(status).unwrap_or(1)))
        }
        Some(Command::Run(args)) => {
            let mut config = args.to_config()?;
            config.seccomp = seccomp;
            match &args.api_sock {
                Some(sock) => serve(
                    sock,
                    &cli.id,
                    LoadedConfig {
                        config,
                        ..Default::default()
                    },
                    true,
                    terminate,
                ),
                None => {
                    let mut vmm = ledge::build(&config)?;
                    vmm.stop_on(terminate);
                    ledge::seccomp::install(ThreadKind::Vmm, seccomp)?;
                    finish(vmm.run()?, Some(&vmm))
                }
            }
        }
        None => {
            let mut loaded = match &cli.config_file {
                Some(p) => load_config_file(p)?,
                None => LoadedConfig::default(),
            };
            loaded.config.seccomp = seccomp;
            if cli.no_api {
                // clap makes --no-api require --config-file.
                let mut vmm = ledge::build(&loaded.config)?;
                vmm.stop_on(terminate);
                ledge::seccomp::install(ThreadKind::Vmm, seccomp)?;
                return finish(vmm.run()?, Some(&vmm));
            }
            let Some(sock) = &cli.api_sock else {
                anyhow::bail!(
                    "nothing to do: give --api-sock PATH to serve the API, or a command (ledge run, see --help)"
                );
            };
            serve(sock, &cli.id, loaded, cli.config_file.is_some(), terminate)
        }
    }
}

fn snapshot_command(cmd: SnapshotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::Create {
            api_sock,
            snapshot,
            mem,
            kind,
            pause,
        } => {
            let api = |method: &str, path: &str, body: String| -> anyhow::Result<()> {
                let (status, answer) = client::call(
                    &api_sock,
                    method,
                    path,
                    Some(&body),
                    Duration::from_secs(600),
                )?;
                if !(200..300).contains(&status) {
                    let msg = serde_json::from_str::<serde_json::Value>(&answer)
                        .ok()
                        .and_then(|v| v["fault_message"].as_str().map(str::to_string))
                        .unwrap_or(answer);
                    anyhow::bail!("{method} {path}: {status}: {msg}");
                }
                Ok(())
            };
            if pause {
                api("PATCH", "/vm", r#"{"state":"Paused"}"#.into())?;
            }
            let body = serde_json::json!({
                "snapshot_path": snapshot,
                "mem_file_path": mem,
                "snapshot_type": if kind == "diff" { "Diff" } else { "Full" },
            });
            let made = api("PUT", "/snapshot/create", body.to_string());
            if pause {
                api("PATCH", "/vm", r#"{"state":"Resumed"}"#.into())?;
            }
            made?;
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Merge {
            base,
            diff,
            diff_snapshot,
        } => {
            ledge::snapshot::merge(&base, &diff, &diff_snapshot)?;
            Ok(ExitCode::SUCCESS)
        }
        SnapshotCommand::Info { path } => {
            let f = ledge::snapshot::read_state(&path)?;
            let info = serde_json::json!({
                "format_version": f.format_version,
                "header": f.header,
                "vcpus": f.body.vcpus.len(),
                "devices": f.body.devices.iter().map(|(n, _)| n).collect::<Vec<_>>(),
                "config": f.body.config,
            });
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `ledge restore`: the snapshot/load request from flags; in the foreground, or serving the API.
fn restore(
    id: &str,
    args: &RestoreArgs,
    seccomp: SeccompLevel,
    terminate: EventFd,
) -> anyhow::Result<ExitCode> {
    let params = args.to_load_params().map_err(|e| anyhow::anyhow!(e))?;
    let console = args.console.clone().unwrap_or_default();
    match &args.api_sock {
        Some(sock) => {
            let (server, requests) = api_server(sock, id, seccomp)?;
            let config = ledge::VmConfig {
                console,
                seccomp,
                ..Default::default()
            };
            let mut controller = Controller::new(id, config, requests);
            controller.stop_on(terminate);
            controller
                .load_snapshot(&params)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            let exit = controller.run()?;
            drop(server);
            finish(exit, None)
        }
        None => {
            let (mut config, source) = ledge::controller::prepare_restore(&params, &console)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            config.seccomp = seccomp;
            let mut vmm = ledge::builder::restore(&config, source, None)?;
            vmm.stop_on(terminate);
            ledge::seccomp::install(ThreadKind::Vmm, seccomp)?;
            vmm.resume()?;
            finish(vmm.run()?, Some(&vmm))
        }
    }
}

/// Serves the control API on `sock` until the VM stops; boots at once when `boot_now`.
fn serve(
    sock: &std::path::Path,
    id: &str,
    loaded: LoadedConfig,
    boot_now: bool,
    terminate: EventFd,
) -> anyhow::Result<ExitCode> {
    let (server, requests) = api_server(sock, id, loaded.config.seccomp)?;
    let mut controller = Controller::new(id, loaded.config, requests);
    controller.stop_on(terminate);
    controller
        .apply_file_sections(loaded.logger, loaded.metrics)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    if boot_now {
        controller.boot()?;
    }
    let exit = controller.run()?;
    drop(server);
    finish(exit, None)
}

/// Starts the API thread; it installs its seccomp filter before serving.
fn api_server(
    sock: &std::path::Path,
    id: &str,
    seccomp: SeccompLevel,
) -> anyhow::Result<(ApiServer, ledge::api::ApiReceiver)> {
    let options = ServerOptions {
        seccomp,
        ..Default::default()
    };
    Ok(ApiServer::start_with(sock, id, options)?)
}

fn finish(exit: ledge::VmExit, vmm: Option<&ledge::Vmm>) -> anyhow::Result<ExitCode> {
    if let Some(v) = vmm {
        log::info!("vcpu exits to userspace: {}", v.exit_counts());
    }
    if exit.is_clean() {
        log::info!("{exit}");
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("{exit}")
    }
}
