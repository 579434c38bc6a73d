//! A real `ledge` process for end-to-end tests: its console and stderr collected as they
//! come, a raw HTTP/1.1 client for its API socket, and TAP interfaces for network tests.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Generous limits for a loaded two-core machine.
pub const START_LIMIT: Duration = Duration::from_secs(30);
pub const GUEST_LIMIT: Duration = Duration::from_secs(60);
pub const EXIT_LIMIT: Duration = Duration::from_secs(30);
/// A read that takes longer than this is a hang (the API itself gives up after 30 s).
pub const READ_LIMIT: Duration = Duration::from_secs(45);

// ---------------------------------------------------------------------------------------------
// The HTTP client: raw HTTP/1.1 on a UnixStream

/// One HTTP response as the client sees it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }

    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {:?} ({})", self.body, self.head))
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// What happened to a request on a connection that may be gone.
#[derive(Debug)]
pub enum Outcome {
    Answered(Resp),
    /// EOF, reset or broken pipe: the server closed the connection.
    Closed(String),
}

/// One keep-alive connection.
pub struct Conn {
    pub s: UnixStream,
    pub pending: Vec<u8>,
}

impl Conn {
    pub fn open(sock: &Path) -> std::io::Result<Conn> {
        let s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(READ_LIMIT))?;
        s.set_write_timeout(Some(READ_LIMIT))?;
        Ok(Conn {
            s,
            pending: Vec::new(),
        })
    }

    pub fn connect(sock: &Path) -> Conn {
        Conn::open(sock).unwrap_or_else(|e| panic!("connect {}: {e}", sock.display()))
    }

    /// Writes raw bytes, then reads one response.
    pub fn raw(&mut self, bytes: &[u8]) -> Outcome {
        if let Err(e) = self.s.write_all(bytes) {
            return Outcome::Closed(format!("write: {e}"));
        }
        self.read_response()
    }

    pub fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> Outcome {
        let req = match body {
            Some(b) => format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ),
            None => format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"
            ),
        };
        self.raw(req.as_bytes())
    }

    pub fn req(&mut self, method: &str, path: &str, body: Option<&str>) -> Resp {
        match self.send(method, path, body) {
            Outcome::Answered(r) => r,
            Outcome::Closed(why) => panic!("{method} {path}: connection closed ({why})"),
        }
    }

    /// Reads one response; a timeout is a hang and fails the test.
    pub fn read_response(&mut self) -> Outcome {
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = self.pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match self.s.read(&mut chunk) {
                Ok(0) => return Outcome::Closed("EOF".into()),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("no response within {READ_LIMIT:?}: the server hangs")
                }
                Err(e) => return Outcome::Closed(format!("read: {e}")),
            }
        };
        let head = String::from_utf8_lossy(&self.pending[..head_end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().expect("content-length"))
            })
            .unwrap_or(0);
        while self.pending.len() < head_end + len {
            match self.s.read(&mut chunk) {
                Ok(0) => return Outcome::Closed("EOF in the body".into()),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("no body within {READ_LIMIT:?}: the server hangs")
                }
                Err(e) => return Outcome::Closed(format!("read: {e}")),
            }
        }
        let body = String::from_utf8_lossy(&self.pending[head_end..head_end + len]).into_owned();
        self.pending.drain(..head_end + len);
        if status == 100 {
            return self.read_response();
        }
        Outcome::Answered(Resp { status, head, body })
    }
}

/// A request on a fresh connection.
pub fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Resp {
    Conn::connect(sock).req(method, path, body)
}

pub fn get(sock: &Path, path: &str) -> Value {
    let r = call(sock, "GET", path, None);
    assert_eq!(r.status, 200, "GET {path}: {} {}", r.status, r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.contains("application/json")),
        "GET {path}: content type in {}",
        r.head
    );
    r.json()
}

/// A PUT or PATCH that must succeed: 204 and no body.
pub fn ok(sock: &Path, method: &str, path: &str, body: &str) {
    let r = call(sock, method, path, Some(body));
    assert_eq!(
        r.status, 204,
        "{method} {path} {body}: {} {}",
        r.status, r.body
    );
    assert!(r.body.is_empty(), "204 with a body: {:?}", r.body);
}

/// A request that must be refused with `status`; the fault message must contain every needle.
/// Returns the fault message.
pub fn refused(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    status: u16,
    needles: &[&str],
) -> String {
    let r = call(sock, method, path, body);
    assert_eq!(
        r.status, status,
        "{method} {path} {body:?}: expected {status}, got {} {}",
        r.status, r.body
    );
    let fault = r.fault();
    for n in needles {
        assert!(
            fault.contains(n),
            "{method} {path} {body:?}: the fault message should mention {n:?}: {fault}"
        );
    }
    fault
}

pub fn bad(sock: &Path, method: &str, path: &str, body: &str, needles: &[&str]) -> String {
    refused(sock, method, path, Some(body), 400, needles)
}

pub fn state(sock: &Path) -> String {
    get(sock, "/")["state"].as_str().unwrap_or("?").to_string()
}

// ---------------------------------------------------------------------------------------------
// The ledge process

/// A `ledge` process whose stdout (the guest console) and stderr are collected as they come.
pub struct Ledge {
    pub child: Child,
    pub out: Arc<Mutex<Vec<u8>>>,
    pub err: Arc<Mutex<Vec<u8>>>,
    pub readers: Vec<std::thread::JoinHandle<()>>,
    pub status: Option<ExitStatus>,
    /// The guest's COM1 input, when spawned with `spawn_with_input`.
    pub stdin: Option<std::process::ChildStdin>,
}

pub fn collect(
    mut r: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 16384];
        loop {
            match r.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => into.lock().unwrap().extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    })
}

impl Ledge {
    pub fn spawn(args: &[&str]) -> Ledge {
        Ledge::spawn_with(args, false)
    }

    /// As `spawn`, keeping a pipe to the process's stdin (the guest's COM1 input).
    pub fn spawn_with_input(args: &[&str]) -> Ledge {
        Ledge::spawn_with(args, true)
    }

    fn spawn_with(args: &[&str], input: bool) -> Ledge {
        let child = Command::new(super::ledge_bin())
            .args(args)
            .stdin(if input { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ledge");
        Ledge::adopt(child)
    }

    /// Takes over a `ledge` process spawned with stdout and stderr piped (and stdin piped
    /// when the test sends it input): its output is collected from here on.
    pub fn adopt(mut child: Child) -> Ledge {
        let child_stdin = child.stdin.take();
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), out.clone()),
            collect(child.stderr.take().unwrap(), err.clone()),
        ];
        Ledge {
            child,
            out,
            err,
            readers,
            status: None,
            stdin: child_stdin,
        }
    }

    /// `ledge --api-sock SOCK ARGS`, returned once the socket answers `GET /`.
    pub fn serve(sock: &Path, args: &[&str]) -> Ledge {
        let mut all = vec!["--api-sock", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let mut l = Ledge::spawn(&all);
        l.wait_accepting(sock);
        l
    }

    /// As `serve`, with the guest's COM1 input on a pipe (`send_input`).
    pub fn serve_with_input(sock: &Path, args: &[&str]) -> Ledge {
        let mut all = vec!["--api-sock", sock.to_str().unwrap()];
        all.extend_from_slice(args);
        let mut l = Ledge::spawn_with_input(&all);
        l.wait_accepting(sock);
        l
    }

    /// Writes bytes to the guest's COM1 input.
    pub fn send_input(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("spawned without an input pipe");
        stdin.write_all(bytes).expect("write to ledge's stdin");
        stdin.flush().expect("flush ledge's stdin");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_accepting(&mut self, sock: &Path) {
        let start = Instant::now();
        loop {
            if let Ok(mut c) = Conn::open(sock) {
                if let Outcome::Answered(r) = c.send("GET", "/", None) {
                    assert_eq!(r.status, 200, "GET /: {}", r.body);
                    return;
                }
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                self.status = Some(st);
                panic!(
                    "ledge exited ({st}) before serving {}:\n{}",
                    sock.display(),
                    self.diag()
                );
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "{} did not accept a request within {START_LIMIT:?}:\n{}",
                sock.display(),
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn stdout_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// The last lines of stdout and all of stderr, for failure messages.
    pub fn diag(&self) -> String {
        let out = self.stdout();
        let lines: Vec<&str> = out.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        format!(
            "--- ledge stdout (last 30 lines of {}) ---\n{tail}\n--- ledge stderr ---\n{}",
            lines.len(),
            self.stderr()
        )
    }

    /// Whole lines of stdout starting with `prefix`.
    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        let out = self.stdout();
        let whole = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
        whole
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    /// The guest's `count:` values so far, in order.
    pub fn counts(&self) -> Vec<u64> {
        self.lines_with("count: ")
            .iter()
            .filter_map(|l| l["count: ".len()..].trim().parse().ok())
            .collect()
    }

    pub fn last_count(&self) -> Option<u64> {
        self.counts().last().copied()
    }

    /// Waits until the guest printed a count above `n`; returns the last count.
    pub fn wait_count_above(&mut self, n: Option<u64>, what: &str) -> u64 {
        let start = Instant::now();
        loop {
            if let Some(c) = self.last_count() {
                if n.is_none_or(|n| c > n) {
                    return c;
                }
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                self.status = Some(st);
                panic!("{what}: ledge exited ({st}):\n{}", self.diag());
            }
            assert!(
                start.elapsed() < GUEST_LIMIT,
                "{what}: the guest's count did not pass {n:?} within {GUEST_LIMIT:?}:\n{}",
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until stdout has a whole line starting with `prefix`.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines_with(prefix).into_iter().next() {
                return l;
            }
            if self.status.is_none() {
                if let Some(st) = self.child.try_wait().unwrap() {
                    self.status = Some(st);
                }
            }
            // Once the process is gone, only what the reader already has can still come.
            if self.status.is_some() && start.elapsed() > Duration::from_secs(5) {
                panic!("no {prefix:?} line; ledge exited:\n{}", self.diag());
            }
            assert!(
                start.elapsed() < GUEST_LIMIT,
                "no {prefix:?} line within {GUEST_LIMIT:?}:\n{}",
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit (None when it did not within `limit`).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        if let Some(st) = self.status {
            return Some(st);
        }
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.status = Some(st);
                // Let the readers see EOF so the output is complete.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return Some(st);
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.child.id());
    }

    /// SIGTERM, then the exit status (fails the test if it does not exit).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(EXIT_LIMIT)
            .unwrap_or_else(|| panic!("ledge did not exit after SIGTERM:\n{}", self.diag()))
    }

    /// SIGKILL, then the exit status (fails the test if it is not gone within EXIT_LIMIT).
    pub fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(EXIT_LIMIT)
            .unwrap_or_else(|| panic!("ledge did not exit after SIGKILL:\n{}", self.diag()))
    }

    /// The guest's `virtio:` device lines, as (device_id, features).
    pub fn virtio_devices(&mut self) -> Vec<(u64, u64)> {
        self.wait_line("LEDGE-PROBE done");
        self.lines_with("virtio: addr=")
            .iter()
            .map(|l| {
                assert!(l.contains("magic=ok version=2"), "bad device line: {l}");
                (field(l, "device_id="), field(l, "features="))
            })
            .collect()
    }
}

impl Drop for Ledge {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A number after `key` in a report line (decimal, or hex with 0x).
pub fn field(line: &str, key: &str) -> u64 {
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    super::parse_u64(v).unwrap_or_else(|| panic!("{key}{v} in {line:?} is not a number"))
}

pub fn image(path: &Path, bytes: u64) -> String {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
    path.to_str().unwrap().to_string()
}
