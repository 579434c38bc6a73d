//! Real third-party clients against a real `ledge --api-sock` process booting the probe guest:
//! the PyPI package firecracker-python (its `firecracker.api.Api`, unchanged) drives a whole
//! lifecycle, and `curl --unix-socket` makes one call.
//!
//! The virtualenv lives in `${LEDGE_VENV:-$HOME/.cache/ledge/venv}` and is made on first use:
//! `python3 -m venv`, then `pip install firecracker-python==0.0.5 requests-unixsocket` plus the
//! modules the package imports at `import firecracker` time without declaring them (paramiko,
//! pyroute2, psutil, Faker). Importing the package also creates /var/lib/firecracker (its
//! data directory) when it can.
//!
//! Skipped, with a message, while the binary has no `--api-sock` (the VMM-side controller).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PIP_PACKAGES: &[&str] = &[
    "firecracker-python==0.0.5",
    "requests-unixsocket",
    // Imported by `firecracker/__init__.py` but not declared by the wheel.
    "paramiko",
    "pyroute2",
    "psutil",
    "Faker",
];

fn api_sock_supported() -> bool {
    let out = Command::new(common::ledge_bin())
        .arg("--help")
        .output()
        .expect("run ledge --help");
    String::from_utf8_lossy(&out.stdout).contains("--api-sock")
}

fn venv_dir() -> PathBuf {
    if let Some(v) = std::env::var_os("LEDGE_VENV") {
        return PathBuf::from(v);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/ledge/venv")
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The virtualenv's python, with the client installed.
fn client_python() -> PathBuf {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    let ready = python.exists()
        && Command::new(&python)
            .args(["-c", "import firecracker.api, requests_unixsocket"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        println!(
            "[api_clients] creating the client virtualenv in {}",
            venv.display()
        );
        run_ok(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
        run_ok(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .args(PIP_PACKAGES),
            "pip install",
        );
    }
    python
}

/// curl, installed from Debian's packages when missing.
fn ensure_curl() {
    let have = |c: &str| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !have("curl") {
        println!("[api_clients] installing curl");
        run_ok(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "curl"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install curl",
        );
    }
}

/// A `ledge --api-sock` process; killed on drop if still running.
struct Vmm {
    child: Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Vmm {
    fn spawn(sock: &Path, id: &str) -> Vmm {
        let mut child = Command::new(common::ledge_bin())
            .arg("--api-sock")
            .arg(sock)
            .args(["--id", id])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ledge --api-sock");
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let collect = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = r.read_to_end(&mut s);
                String::from_utf8_lossy(&s).into_owned()
            })
        };
        Vmm {
            child,
            stdout: Some(collect(Box::new(out))),
            stderr: Some(collect(Box::new(err))),
        }
    }

    /// Waits for the process to exit; None if it did not within `limit`.
    fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&mut self) -> (String, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        (
            self.stdout
                .take()
                .map(|t| t.join().unwrap())
                .unwrap_or_default(),
            self.stderr
                .take()
                .map(|t| t.join().unwrap())
                .unwrap_or_default(),
        )
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stand-in for the VMM-side controller: applies configuration requests to a `VmConfig` and
/// follows the lifecycle table, without KVM. It shows the shape the real controller has.
fn fake_controller(rx: ledge::api::ApiReceiver, id: &str) {
    use ledge::api::types::{self, ActionType, VmStateChange};
    use ledge::api::{ApiError, Request as R, Response};
    use ledge::VmState;
    let mut config = ledge::VmConfig::default();
    let mut state = VmState::NotStarted;
    while let Some(req) = rx.recv() {
        let _ = rx.event().read();
        let pre_boot = |what: &str, state: VmState| {
            if state == VmState::NotStarted {
                Ok(())
            } else {
                Err(ApiError::wrong_state(what, state))
            }
        };
        let json = |v: serde_json::Value| Ok(Response::Json(v));
        let done = |r: Result<(), ApiError>| r.map(|_| Response::NoContent);
        let reply = match &req.request {
            R::GetInstanceInfo => json(types::InstanceInfo::new(id, state).to_json()),
            R::GetVersion => json(types::version_json()),
            R::GetVmConfig => json(types::vm_config_json(&config)),
            R::GetMachineConfig => {
                json(serde_json::to_value(types::MachineConfig::from_config(&config)).unwrap())
            }
            R::PutMachineConfig(m) => {
                done(pre_boot("PUT /machine-config", state).and_then(|_| m.apply(&mut config)))
            }
            R::PatchMachineConfig(m) => {
                done(pre_boot("PATCH /machine-config", state).and_then(|_| m.apply(&mut config)))
            }
            R::PutBootSource(b) => {
                done(pre_boot("PUT /boot-source", state).and_then(|_| b.apply(&mut config)))
            }
            R::Action(ActionType::InstanceStart) => done(
                state
                    .check_transition(VmState::Running)
                    .map_err(|_| ApiError::wrong_state("InstanceStart", state))
                    .map(|_| state = VmState::Running),
            ),
            R::Action(ActionType::SendCtrlAltDel) if state == VmState::Running => done(Ok(())),
            R::PatchVm(VmStateChange::Paused) => done(
                state
                    .check_transition(VmState::Paused)
                    .map_err(|_| ApiError::wrong_state("pausing", state))
                    .map(|_| state = VmState::Paused),
            ),
            R::PatchVm(VmStateChange::Resumed) if state == VmState::Paused => {
                state = VmState::Running;
                done(Ok(()))
            }
            other => Err(ApiError::bad_request(format!(
                "the fake controller does not do {other:?} while {state}"
            ))),
        };
        req.respond(reply);
    }
}

/// firecracker-python against the real server and a fake controller: the client's HTTP (its
/// connection pool, keep-alive, 204 handling) works with Ledge's server, with no KVM needed.
#[test]
fn firecracker_python_drives_the_server() {
    let python = client_python();
    let dir = common::scratch("api-clients-fake");
    let sock = dir.join("api.sock");
    let (server, rx) = ledge::api::ApiServer::start(&sock, "fake-vm").unwrap();
    let controller = std::thread::spawn(move || fake_controller(rx, "fake-vm"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/fc_lifecycle.py");
    let client = common::run(
        Command::new(&python)
            .arg(&script)
            .arg(&sock)
            .arg("/boot/probe.elf"),
        Duration::from_secs(60),
    );
    println!("{}\n{}", client.stdout, client.stderr);
    assert_eq!(client.code, Some(0), "client failed");
    assert!(client.stdout.contains("fc_lifecycle: ok"));
    drop(server);
    controller.join().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn firecracker_python_and_curl_drive_a_probe_vm() {
    if !api_sock_supported() {
        println!(
            "[api_clients] SKIPPED: this ledge binary has no --api-sock yet (the VMM-side API \
             controller); the test runs once `ledge --help` lists it"
        );
        return;
    }
    if !common::require_kvm("api_clients") {
        return;
    }
    let python = client_python();
    ensure_curl();
    let dir = common::scratch("api-clients");
    let probe = dir.join("probe.elf");
    let out = common::ledge(
        &["export-probe", probe.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(out.code, Some(0), "export-probe: {}", out.stderr);
    let sock = dir.join("api.sock");
    let mut vmm = Vmm::spawn(&sock, "fc-client");
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the socket did not appear: {:?}",
            vmm.output()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // curl: one call, as an operator would make it.
    let curl = Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--unix-socket",
        ])
        .arg(&sock)
        .arg("http://localhost/")
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&curl.stdout);
    assert!(
        curl.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let info: serde_json::Value = serde_json::from_str(&body).expect("curl got JSON");
    assert_eq!(info["app_name"], "Ledge");
    assert_eq!(info["id"], "fc-client");
    assert_eq!(info["state"], "Not started");

    // firecracker-python: the whole lifecycle.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/fc_lifecycle.py");
    let client = common::run(
        Command::new(&python).arg(&script).arg(&sock).arg(&probe),
        Duration::from_secs(60),
    );
    println!("{}", client.stdout);
    if client.code != Some(0) || !client.stdout.contains("fc_lifecycle: ok") {
        let (out, err) = vmm.output();
        panic!(
            "the client failed ({:?}):\n{}\n{}\nledge stdout:\n{out}\nledge stderr:\n{err}",
            client.code, client.stdout, client.stderr
        );
    }
    // Ctrl-Alt-Del resets the probe guest; like Firecracker, the process then exits, cleanly,
    // and removes its socket.
    let status = vmm.wait(Duration::from_secs(30));
    let (out, err) = vmm.output();
    let status =
        status.unwrap_or_else(|| panic!("ledge did not exit after Ctrl-Alt-Del:\n{out}\n{err}"));
    assert!(status.success(), "ledge exit {status}:\n{out}\n{err}");
    assert!(!sock.exists(), "the socket is removed on exit");
    let _ = std::fs::remove_dir_all(dir);
}
