//! The API thread: a Unix socket, HTTP/1.1 (parsed by `httparse`), routing to `Request`s.
//!
//! One thread named `api` runs an epoll loop (vmm-sys-util) over the non-blocking listener, a
//! stop eventfd and every connection. Each connection has its own read buffer, so requests may
//! arrive in pieces and several may follow each other on one keep-alive connection. Requests
//! are served one at a time: the thread routes a complete request to a `Request`, hands it to
//! the VMM thread (channel + eventfd) and waits for the reply before reading on.
//!
//! Limits, so no client can hurt the VMM or other clients: headers at most 8 KiB (431), bodies
//! at most 51200 bytes (413) and only with Content-Length (chunked: 411), at most 256 open
//! connections (more are answered 503 and closed), a request must be complete within 5 s of
//! its first byte (else 408 and closed: slowloris), and a reply the client does not read for
//! 5 s closes the connection. No client input can panic this thread.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::Value;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::types;
use super::{ApiError, ApiReceiver, ApiRequest, Reply, Request, Response};
use crate::config::SeccompLevel;
use crate::seccomp::ThreadKind;

/// Largest request head (request line and headers).
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Largest request body, as in Firecracker.
pub const MAX_BODY_BYTES: usize = 51200;
/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 256;

/// Every route served: method and path template. resources/api/ledge-api.json describes
/// exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/vm/config"),
    ("PATCH", "/vm"),
    ("PUT", "/actions"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/vsock"),
    ("PUT", "/entropy"),
    ("GET", "/balloon"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
];

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("{0} is in use: another process serves it")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot check the existing socket {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the api socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("instance id {0:?} must be 1 to 64 letters, digits, '-' or '_'")]
    InstanceId(String),
    #[error("cannot set up the api event loop")]
    EventLoop(#[source] io::Error),
    #[error("cannot start the api thread")]
    Start(#[source] crate::seccomp::SpawnError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Tunables; the defaults are the documented limits.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// How long a request waits for the VMM's answer before 503.
    pub reply_timeout: Duration,
    /// How long a request may take to arrive, from its first byte (slowloris guard).
    pub request_timeout: Duration,
    pub max_connections: usize,
    /// The api thread's seccomp filter, installed before it accepts a connection.
    pub seccomp: SeccompLevel,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            reply_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            max_connections: MAX_CONNECTIONS,
            seccomp: SeccompLevel::default(),
        }
    }
}

/// The running API server. Dropping it stops the thread and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of the socket we created, so drop removes only our own.
    socket_id: Option<(u64, u64)>,
    instance_id: String,
    stop: EventFd,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const LISTENER: u64 = 0;
const STOP: u64 = 1;
const FIRST_CONNECTION: u64 = 2;

impl ApiServer {
    /// Binds `path` (mode 0600; a stale socket is replaced, a live one is an error) and starts
    /// the `api` thread.
    pub fn start(
        path: &Path,
        instance_id: &str,
    ) -> Result<(ApiServer, ApiReceiver), ApiServerError> {
        Self::start_with(path, instance_id, ServerOptions::default())
    }

    pub fn start_with(
        path: &Path,
        instance_id: &str,
        options: ServerOptions,
    ) -> Result<(ApiServer, ApiReceiver), ApiServerError> {
        let id_ok = !instance_id.is_empty()
            && instance_id.len() <= 64
            && instance_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return Err(ApiServerError::InstanceId(instance_id.to_string()));
        }
        let listener = bind_socket(path)?;
        let socket_id = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
        let remove_on_error = |e| {
            let _ = std::fs::remove_file(path);
            e
        };
        let event = EventFd::new(EFD_NONBLOCK)
            .map_err(ApiServerError::EventLoop)
            .map_err(remove_on_error)?;
        let vmm_event = event
            .try_clone()
            .map_err(ApiServerError::EventLoop)
            .map_err(remove_on_error)?;
        let stop = EventFd::new(EFD_NONBLOCK)
            .map_err(ApiServerError::EventLoop)
            .map_err(remove_on_error)?;
        let filter = crate::seccomp::filter(ThreadKind::Api, options.seccomp)
            .map_err(ApiServerError::Seccomp)
            .map_err(remove_on_error)?;
        let (tx, rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut server = Server::new(
            listener,
            stop.try_clone()
                .map_err(ApiServerError::EventLoop)
                .map_err(remove_on_error)?,
            tx,
            vmm_event,
            stopping.clone(),
            options,
        )
        .map_err(ApiServerError::EventLoop)
        .map_err(remove_on_error)?;
        // The filter goes on before the first connection is accepted.
        let thread =
            crate::seccomp::spawn_filtered("api".into(), ThreadKind::Api, filter, move || {
                server.run()
            })
            .map_err(ApiServerError::Start)
            .map_err(remove_on_error)?;
        Ok((
            ApiServer {
                path: path.to_path_buf(),
                socket_id,
                instance_id: instance_id.to_string(),
                stop,
                stopping,
                thread: Some(thread),
            },
            ApiReceiver {
                requests: rx,
                event,
            },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let ours = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.socket_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates the listening socket at `path` with mode 0600, with no window in which another
/// user could connect: it is bound inside a fresh 0700 directory next to `path`, made 0600,
/// then renamed into place.
fn bind_socket(path: &Path) -> Result<UnixListener, ApiServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ApiServerError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiServerError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| ApiServerError::Probe {
                    path: path.to_path_buf(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(ApiServerError::Probe {
                    path: path.to_path_buf(),
                    source,
                })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiServerError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let bind_err = |source| ApiServerError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = parent.join(format!(
        ".l{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(bind_err)?;
    let tmp = dir.join("s");
    let result = UnixListener::bind(&tmp).and_then(|l| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        l.set_nonblocking(true)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result.map_err(bind_err)
}

// ---------------------------------------------------------------------------------------------
// Routing

/// A parsed HTTP request.
#[derive(Debug)]
struct HttpRequest {
    method: String,
    path: String,
    body: Option<Vec<u8>>,
}

/// Turns (method, path, body) into a `Request`: the whole routing table is this `match`.
pub fn route(method: &str, path: &str, body: Option<&[u8]>) -> Result<Request, ApiError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split_terminator('/').collect();
    let first = segments.first().copied().unwrap_or("");
    let known = ROUTES
        .iter()
        .any(|(_, p)| p.trim_start_matches('/').split('/').next() == Some(first));
    let get = || match body {
        Some(_) => Err(ApiError::bad_request("GET request cannot have a body.")),
        None => Ok(()),
    };
    let need_body =
        || body.ok_or_else(|| ApiError::bad_request(format!("Empty {method} request.")));
    let parse = || -> Result<_, ApiError> { Ok((need_body()?, method, path)) };
    use Request as R;
    match (method, segments.as_slice()) {
        ("GET", []) => get().map(|_| R::GetInstanceInfo),
        ("GET", ["version"]) => get().map(|_| R::GetVersion),
        ("GET", ["vm", "config"]) => get().map(|_| R::GetVmConfig),
        ("GET", ["machine-config"]) => get().map(|_| R::GetMachineConfig),
        ("GET", ["balloon"]) => get().map(|_| R::GetBalloon),
        ("GET", ["balloon", "statistics"]) => get().map(|_| R::GetBalloonStats),
        ("PATCH", ["vm"]) => {
            let v: types::Vm = json(parse()?)?;
            Ok(R::PatchVm(v.state))
        }
        ("PUT", ["actions"]) => {
            let a: types::InstanceActionInfo = json(parse()?)?;
            Ok(R::Action(a.action_type))
        }
        ("PUT", ["machine-config"]) => json(parse()?).map(R::PutMachineConfig),
        ("PATCH", ["machine-config"]) => json(parse()?).map(R::PatchMachineConfig),
        ("PUT", ["boot-source"]) => json(parse()?).map(R::PutBootSource),
        ("PUT", ["drives", id]) => {
            let d: types::Drive = json(parse()?)?;
            same_id(id, "drive_id", &d.drive_id)?;
            Ok(R::PutDrive(d))
        }
        ("PATCH", ["drives", id]) => {
            let d: types::DrivePatch = json(parse()?)?;
            same_id(id, "drive_id", &d.drive_id)?;
            Ok(R::PatchDrive(d))
        }
        ("PUT", ["network-interfaces", id]) => {
            let n: types::NetworkInterface = json(parse()?)?;
            same_id(id, "iface_id", &n.iface_id)?;
            Ok(R::PutNetworkInterface(n))
        }
        ("PATCH", ["network-interfaces", id]) => {
            let n: types::NetworkInterfacePatch = json(parse()?)?;
            same_id(id, "iface_id", &n.iface_id)?;
            Ok(R::PatchNetworkInterface(n))
        }
        ("PUT" | "PATCH", ["drives" | "network-interfaces"]) => Err(ApiError::bad_request(
            format!("The ID cannot be empty: use {method} /{first}/{{id}}."),
        )),
        ("PUT", ["vsock"]) => json(parse()?).map(R::PutVsock),
        ("PUT", ["entropy"]) => json(parse()?).map(R::PutEntropy),
        ("PUT", ["balloon"]) => json(parse()?).map(R::PutBalloon),
        ("PATCH", ["balloon"]) => json(parse()?).map(R::PatchBalloon),
        ("PATCH", ["balloon", "statistics"]) => json(parse()?).map(R::PatchBalloonStats),
        ("PUT", ["logger"]) => json(parse()?).map(R::PutLogger),
        ("PUT", ["metrics"]) => json(parse()?).map(R::PutMetrics),
        ("PUT", ["snapshot", "create"]) => json(parse()?).map(R::CreateSnapshot),
        ("PUT", ["snapshot", "load"]) => json(parse()?).map(R::LoadSnapshot),
        _ => {
            let hint = if known {
                format!(" (see GET/PUT/PATCH on /{first} in Ledge's API spec)")
            } else {
                String::new()
            };
            Err(ApiError::bad_request(format!(
                "Invalid request method and/or path: {method} {path}.{hint}"
            )))
        }
    }
}

/// Deserialises a body, naming the route and the problem (unknown field, wrong type, ...).
fn json<T: DeserializeOwned>((body, method, path): (&[u8], &str, &str)) -> Result<T, ApiError> {
    let refuse = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::bad_request(format!(
            "the body of {method} {path} {what}: {e}; send a JSON object with the fields \
             listed in resources/api/ledge-api.json"
        ))
    };
    // Parse as plain JSON first, so a wrong-typed field is not mistaken for bad syntax, and
    // only an object is accepted (serde would also take a struct as an array of its fields).
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| refuse("is not valid JSON", &e))?;
    if !value.is_object() {
        return Err(refuse("is not an object", &"got another JSON value"));
    }
    serde_json::from_value(value).map_err(|e| refuse("does not match the API", &e))
}

/// Path ids: Firecracker's rule (alphanumeric and '_'), and equal to the body's id.
fn same_id(path_id: &str, field: &str, body_id: &str) -> Result<(), ApiError> {
    if !path_id
        .chars()
        .all(|c| c == '_' || c.is_ascii_alphanumeric())
    {
        return Err(ApiError::bad_request(format!(
            "id {path_id:?} is invalid: API resource ids can only contain letters, digits and '_'"
        )));
    }
    if path_id != body_id {
        return Err(ApiError::bad_request(format!(
            "The id from the path ({path_id:?}) does not match {field} in the body ({body_id:?}): use the same id in both"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HTTP framing

/// What the bytes at the start of a read buffer are.
#[derive(Debug)]
enum Framing {
    /// Not a whole request yet; `send_continue` when the client waits for "100 Continue".
    Partial { send_continue: bool },
    Complete {
        request: HttpRequest,
        consumed: usize,
        close: bool,
    },
    /// An answer and then close the connection (the stream cannot be resynchronised).
    Fatal(ApiError),
}

fn header_error(message: &str) -> ApiError {
    ApiError::new(431, message)
}

/// Frames one request with httparse: head, then exactly Content-Length body bytes.
fn frame(buf: &[u8]) -> Framing {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEADER_BYTES {
                return Framing::Fatal(header_error(&format!(
                    "request headers are larger than {MAX_HEADER_BYTES} bytes"
                )));
            }
            return Framing::Partial {
                send_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Framing::Fatal(header_error("too many request headers (at most 64)"))
        }
        Err(e) => {
            return Framing::Fatal(ApiError::bad_request(format!(
                "malformed HTTP request: {e}"
            )))
        }
    };
    if head_len > MAX_HEADER_BYTES {
        return Framing::Fatal(header_error(&format!(
            "request headers are larger than {MAX_HEADER_BYTES} bytes"
        )));
    }
    let method = req.method.unwrap_or("").to_string();
    let raw_path = req.path.unwrap_or("/");
    let mut close = req.version != Some(1);
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = match value.parse::<usize>() {
                Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    return Framing::Fatal(ApiError::bad_request(format!(
                        "invalid Content-Length {value:?}"
                    )))
                }
            };
            if content_length.is_some_and(|old| old != n) {
                return Framing::Fatal(ApiError::bad_request("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Framing::Fatal(ApiError::new(
                411,
                format!(
                    "Transfer-Encoding {value:?} is not supported: send the body with a Content-Length header"
                ),
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect")
            && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Framing::Fatal(ApiError::payload_too_large(format!(
            "the request body has {body_len} bytes; the limit is {MAX_BODY_BYTES}"
        )));
    }
    let Some(total) = head_len.checked_add(body_len) else {
        return Framing::Fatal(ApiError::payload_too_large("request too large"));
    };
    if buf.len() < total {
        return Framing::Partial {
            send_continue: expect_continue,
        };
    }
    let body = (body_len > 0).then(|| buf[head_len..total].to_vec());
    Framing::Complete {
        request: HttpRequest {
            method,
            path: normalise_path(raw_path),
            body,
        },
        consumed: total,
        close,
    }
}

/// What the API thread makes of the bytes at the start of a connection's buffer: the same
/// framing (`frame`) and routing (`route`) it runs, with no socket and no VMM. Public for the
/// fuzz targets (fuzz/) and for tests; the server itself calls `frame` and `route` directly.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole request yet; `send_continue` when the client waits for "100 Continue".
    Partial { send_continue: bool },
    /// One whole request of `consumed` bytes: routed to a `Request`, or the error answer
    /// (boxed: a `Request` is large, the other variants are small).
    Request {
        method: String,
        path: String,
        routed: Box<Result<Request, ApiError>>,
        consumed: usize,
        close: bool,
    },
    /// A framing error: the server answers it and closes the connection.
    Fatal(ApiError),
}

/// Frames and routes the first request in `buf` (see [`Parsed`]).
pub fn parse_request(buf: &[u8]) -> Parsed {
    match frame(buf) {
        Framing::Partial { send_continue } => Parsed::Partial { send_continue },
        Framing::Fatal(e) => Parsed::Fatal(e),
        Framing::Complete {
            request,
            consumed,
            close,
        } => Parsed::Request {
            routed: Box::new(route(
                &request.method,
                &request.path,
                request.body.as_deref(),
            )),
            method: request.method,
            path: request.path,
            consumed,
            close,
        },
    }
}

/// The HTTP bytes the server sends for `reply` (`close`: with "Connection: close").
pub fn response_bytes(reply: &Reply, close: bool) -> Vec<u8> {
    reply_to_http(reply, close).1
}

/// The absolute path of a request target: origin form as is, absolute form without scheme and
/// authority; query and fragment dropped.
fn normalise_path(target: &str) -> String {
    let mut p = target;
    for scheme in ["http://", "https://"] {
        if let Some(rest) = p.strip_prefix(scheme) {
            p = rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    let end = p.find(['?', '#']).unwrap_or(p.len());
    p[..end].to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The bytes of one HTTP response.
fn http_response(status: u16, body: Option<&Value>, close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: Ledge API\r\nConnection: {}\r\n",
        reason(status),
        if close { "close" } else { "keep-alive" }
    );
    let text = body.map(|b| b.to_string());
    if let Some(t) = &text {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", t.len()));
    } else if status != 204 {
        out.push_str("Content-Length: 0\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if let Some(t) = text {
        bytes.extend_from_slice(t.as_bytes());
    }
    bytes
}

fn reply_to_http(reply: &Reply, close: bool) -> (u16, Vec<u8>) {
    match reply {
        Ok(Response::NoContent) => (204, http_response(204, None, close)),
        Ok(Response::Json(v)) => (200, http_response(200, Some(v), close)),
        Err(e) => (e.status, http_response(e.status, Some(&e.body()), close)),
    }
}

// ---------------------------------------------------------------------------------------------
// The connection loop

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// When the current partial request, or the unread reply, started waiting.
    waiting_since: Option<Instant>,
    continue_sent: bool,
    close_after_output: bool,
    /// After a fatal framing error: our side is shut down and unread input is discarded until
    /// the client closes (or the request timeout), so it gets to read our answer.
    draining: bool,
    /// The interest currently registered with epoll.
    interest: EventSet,
}

struct Server {
    epoll: Epoll,
    listener: UnixListener,
    stop: EventFd,
    requests: mpsc::Sender<ApiRequest>,
    vmm_event: EventFd,
    stopping: Arc<AtomicBool>,
    options: ServerOptions,
    connections: HashMap<u64, Connection>,
    next_token: u64,
}

/// Bytes read per `read` call, and the most a connection buffers before it is parsed.
const READ_CHUNK: usize = 16 * 1024;
const MAX_INPUT: usize = MAX_HEADER_BYTES + MAX_BODY_BYTES + READ_CHUNK;

impl Server {
    fn new(
        listener: UnixListener,
        stop: EventFd,
        requests: mpsc::Sender<ApiRequest>,
        vmm_event: EventFd,
        stopping: Arc<AtomicBool>,
        options: ServerOptions,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        Ok(Server {
            epoll,
            listener,
            stop,
            requests,
            vmm_event,
            stopping,
            options,
            connections: HashMap::new(),
            next_token: FIRST_CONNECTION,
        })
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let timeout_ms = if self.connections.values().any(|c| c.waiting_since.is_some()) {
                250
            } else {
                -1
            };
            let n = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("api: epoll failed, the api thread stops: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    LISTENER => self.accept_all(),
                    STOP => {
                        let _ = self.stop.read();
                        return;
                    }
                    token => self.serve(token, ev.event_set()),
                }
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
            }
            self.expire();
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_connection(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the pending client stays in the backlog; try later.
                    log::warn!("api: cannot accept a connection: {e}");
                    return;
                }
            }
        }
    }

    fn add_connection(&mut self, mut stream: UnixStream) {
        if self.connections.len() >= self.options.max_connections {
            let e = ApiError::unavailable(format!(
                "too many open connections (at most {}): close idle ones and retry",
                self.options.max_connections
            ));
            let _ = stream.set_nonblocking(true);
            let _ = stream.write(&http_response(503, Some(&e.body()), true));
            return;
        }
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .is_err()
        {
            return;
        }
        self.connections.insert(
            token,
            Connection {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                waiting_since: None,
                continue_sent: false,
                close_after_output: false,
                draining: false,
                interest: EventSet::IN,
            },
        );
    }

    fn close(&mut self, token: u64) {
        if let Some(c) = self.connections.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Handles readiness of one connection.
    fn serve(&mut self, token: u64, events: EventSet) {
        let Some(conn) = self.connections.get_mut(&token) else {
            return;
        };
        if conn.draining && conn.output.is_empty() {
            let open = read_some(conn);
            conn.input.clear();
            if !open {
                self.close(token);
            }
            return;
        }
        if events.contains(EventSet::OUT) && !conn.output.is_empty() && !flush(conn) {
            self.close(token);
            return;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
            && conn.output.is_empty()
        {
            let open = read_some(conn);
            self.process(token);
            if !open {
                // The peer closed its side: whatever was not a whole request is dropped.
                let done = self
                    .connections
                    .get(&token)
                    .is_none_or(|c| c.output.is_empty());
                if done {
                    self.close(token);
                    return;
                }
                if let Some(c) = self.connections.get_mut(&token) {
                    c.close_after_output = true;
                }
            }
        }
        self.settle(token);
    }

    /// Serves every whole request in the connection's buffer, in order.
    fn process(&mut self, token: u64) {
        loop {
            let Some(conn) = self.connections.get_mut(&token) else {
                return;
            };
            if conn.close_after_output || !conn.output.is_empty() || conn.input.is_empty() {
                return;
            }
            match frame(&conn.input) {
                Framing::Partial { send_continue } => {
                    if send_continue && !conn.continue_sent {
                        conn.continue_sent = true;
                        conn.output
                            .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    conn.waiting_since.get_or_insert_with(Instant::now);
                    return;
                }
                Framing::Fatal(e) => {
                    log::debug!("api: bad request: {e}");
                    conn.input.clear();
                    conn.output
                        .extend(http_response(e.status, Some(&e.body()), true));
                    conn.close_after_output = true;
                    conn.draining = true;
                    conn.waiting_since = Some(Instant::now());
                    return;
                }
                Framing::Complete {
                    request,
                    consumed,
                    close,
                } => {
                    conn.input.drain(..consumed);
                    conn.continue_sent = false;
                    conn.waiting_since = (!conn.input.is_empty()).then(Instant::now);
                    let reply = self.answer(&request);
                    let (status, bytes) = reply_to_http(&reply, close);
                    log::debug!("api: {} {} -> {status}", request.method, request.path);
                    let Some(conn) = self.connections.get_mut(&token) else {
                        return;
                    };
                    conn.output.extend(bytes);
                    if close {
                        conn.close_after_output = true;
                    }
                    if !flush(conn) {
                        self.close(token);
                        return;
                    }
                }
            }
        }
    }

    /// Routes a request and, if it is valid, waits for the VMM's answer.
    fn answer(&self, http: &HttpRequest) -> Reply {
        let request = route(&http.method, &http.path, http.body.as_deref())?;
        let (tx, rx) = mpsc::channel();
        self.requests
            .send(ApiRequest { request, reply: tx })
            .map_err(|_| ApiError::unavailable("the VMM is not running: nothing can answer"))?;
        self.vmm_event
            .write(1)
            .map_err(|e| ApiError::unavailable(format!("cannot signal the VMM: {e}")))?;
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(reply) => return reply,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(ApiError::unavailable(
                        "the VMM dropped the request without answering",
                    ))
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        return Err(ApiError::unavailable("the API server is shutting down"));
                    }
                    if start.elapsed() >= self.options.reply_timeout {
                        return Err(ApiError::unavailable(format!(
                            "the VMM did not answer within {} s; the request may still take effect: check with GET /",
                            self.options.reply_timeout.as_secs()
                        )));
                    }
                }
            }
        }
    }

    /// After serving: close a finished connection, or register the interest it needs now.
    fn settle(&mut self, token: u64) {
        let Some(conn) = self.connections.get_mut(&token) else {
            return;
        };
        if conn.output.is_empty() && conn.close_after_output {
            if !conn.draining {
                self.close(token);
                return;
            }
            // Linger: the client may still be sending the body we refused.
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            conn.input.clear();
            conn.waiting_since.get_or_insert_with(Instant::now);
        }
        let want = if conn.output.is_empty() {
            EventSet::IN
        } else {
            EventSet::OUT
        };
        if !conn.output.is_empty() {
            conn.waiting_since.get_or_insert_with(Instant::now);
        }
        if want != conn.interest {
            conn.interest = want;
            let fd = conn.stream.as_raw_fd();
            if self
                .epoll
                .ctl(ControlOperation::Modify, fd, EpollEvent::new(want, token))
                .is_err()
            {
                self.close(token);
                return;
            }
        }
        // Bytes already buffered behind a reply that just drained.
        if conn.output.is_empty() && !conn.input.is_empty() && !conn.close_after_output {
            let before = conn.input.len();
            self.process(token);
            if self
                .connections
                .get(&token)
                .is_some_and(|c| c.input.len() != before || !c.output.is_empty())
            {
                self.settle(token);
            }
        }
    }

    /// Closes connections whose request or unread reply has waited too long.
    fn expire(&mut self) {
        let limit = self.options.request_timeout;
        let late: Vec<u64> = self
            .connections
            .iter()
            .filter(|(_, c)| c.waiting_since.is_some_and(|t| t.elapsed() > limit))
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            if let Some(c) = self.connections.get_mut(&token) {
                if c.output.is_empty() && !c.input.is_empty() {
                    let e = ApiError::new(
                        408,
                        format!(
                            "the request did not arrive completely within {} s",
                            limit.as_secs()
                        ),
                    );
                    let _ = c.stream.write(&http_response(408, Some(&e.body()), true));
                }
            }
            self.close(token);
        }
    }
}

/// Reads what is available; false when the peer closed or the connection failed.
fn read_some(conn: &mut Connection) -> bool {
    let mut chunk = [0u8; READ_CHUNK];
    while conn.input.len() < MAX_INPUT {
        match conn.stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                conn.input.extend_from_slice(&chunk[..n]);
                conn.waiting_since.get_or_insert_with(Instant::now);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

/// Writes what the socket takes; false when the connection failed.
fn flush(conn: &mut Connection) -> bool {
    while !conn.output.is_empty() {
        match conn.stream.write(&conn.output) {
            Ok(0) => return false,
            Ok(n) => {
                conn.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    if conn.input.is_empty() {
        conn.waiting_since = None;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body each route accepts.
    fn example_body(method: &str, path: &str) -> Option<&'static str> {
        Some(match (method, path) {
            ("GET", _) => return None,
            (_, "/vm") => r#"{"state":"Paused"}"#,
            (_, "/actions") => r#"{"action_type":"InstanceStart"}"#,
            ("PUT", "/machine-config") => r#"{"vcpu_count":1,"mem_size_mib":128}"#,
            ("PATCH", "/machine-config") => r#"{"vcpu_count":2}"#,
            (_, "/boot-source") => r#"{"kernel_image_path":"/k"}"#,
            ("PUT", "/drives/{drive_id}") => {
                r#"{"drive_id":"x1","path_on_host":"/d","is_root_device":false}"#
            }
            ("PATCH", "/drives/{drive_id}") => r#"{"drive_id":"x1"}"#,
            ("PUT", "/network-interfaces/{iface_id}") => {
                r#"{"iface_id":"x1","host_dev_name":"tap0"}"#
            }
            ("PATCH", "/network-interfaces/{iface_id}") => r#"{"iface_id":"x1"}"#,
            (_, "/vsock") => r#"{"guest_cid":3,"uds_path":"/v"}"#,
            (_, "/entropy") => "{}",
            ("PUT", "/balloon") => r#"{"amount_mib":1,"deflate_on_oom":false}"#,
            ("PATCH", "/balloon") => r#"{"amount_mib":1}"#,
            ("PATCH", "/balloon/statistics") => r#"{"stats_polling_interval_s":1}"#,
            (_, "/logger") => r#"{"log_path":"/l"}"#,
            (_, "/metrics") => r#"{"metrics_path":"/m"}"#,
            (_, "/snapshot/create") => r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#,
            (_, "/snapshot/load") => {
                r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"}}"#
            }
            _ => panic!("no example for {method} {path}"),
        })
    }

    #[test]
    fn every_route_in_the_table_is_routed() {
        for (method, template) in ROUTES {
            let path = template
                .replace("{drive_id}", "x1")
                .replace("{iface_id}", "x1");
            let body = example_body(method, template).map(str::as_bytes);
            route(method, &path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        }
    }

    #[test]
    fn unknown_routes_and_bodies() {
        let e = route("GET", "/nope", None).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e
            .message
            .starts_with("Invalid request method and/or path: GET /nope"));
        assert!(route("DELETE", "/", None).is_err());
        assert!(route("POST", "/actions", Some(b"{}")).is_err());
        let e = route("GET", "/", Some(b"{}")).unwrap_err();
        assert!(e.message.contains("cannot have a body"));
        let e = route("PUT", "/boot-source", None).unwrap_err();
        assert_eq!(e.message, "Empty PUT request.");
        let e = route("PUT", "/drives", Some(b"{}")).unwrap_err();
        assert!(e.message.contains("ID cannot be empty"));
        let e = route(
            "PUT",
            "/drives/a",
            Some(br#"{"drive_id":"b","path_on_host":"/d","is_root_device":false}"#),
        )
        .unwrap_err();
        assert!(e.message.contains("does not match"), "{e}");
        let e = route(
            "PUT",
            "/drives/a-b",
            Some(br#"{"drive_id":"a-b","path_on_host":"/d","is_root_device":false}"#),
        )
        .unwrap_err();
        assert!(e.message.contains("invalid"), "{e}");
        // Trailing slash and leading slashes are tolerated, as in Firecracker.
        assert_eq!(
            route("GET", "/vm/config/", None).unwrap(),
            Request::GetVmConfig
        );
        assert_eq!(route("GET", "//", None).unwrap(), Request::GetInstanceInfo);
    }

    #[test]
    fn parse_request_frames_then_routes() {
        let head = b"GET /version HTTP/1.1\r\n\r\n";
        let mut two = head.to_vec();
        two.extend_from_slice(b"PATCH /vm HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"state\":1}");
        let Parsed::Request {
            routed, consumed, ..
        } = parse_request(&two)
        else {
            panic!("a whole request");
        };
        assert_eq!(consumed, head.len());
        assert_eq!(routed.unwrap(), Request::GetVersion);
        let Parsed::Request { routed, close, .. } = parse_request(&two[consumed..]) else {
            panic!("a whole request");
        };
        assert!(!close);
        let e = routed.unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("does not match the API"), "{e}");
        let bytes = response_bytes(&Err(e), true);
        assert!(bytes.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\n"),
            Parsed::Partial { .. }
        ));
        assert!(
            matches!(parse_request(b"\x00 / HTTP/1.1\r\n\r\n"), Parsed::Fatal(e) if e.status == 400)
        );
    }

    #[test]
    fn framing() {
        let r = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        match frame(r) {
            Framing::Complete {
                consumed, close, ..
            } => {
                assert_eq!(consumed, r.len());
                assert!(!close);
            }
            f => panic!("{f:?}"),
        }
        assert!(matches!(
            frame(b"GET / HTTP/1.1\r\nHost"),
            Framing::Partial { .. }
        ));
        let put = b"PUT /vm HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nab";
        assert!(matches!(
            frame(put),
            Framing::Partial {
                send_continue: true
            }
        ));
        let big = format!(
            "PUT /vm HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert!(matches!(frame(big.as_bytes()), Framing::Fatal(e) if e.status == 413));
        let chunked = b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(frame(chunked), Framing::Fatal(e) if e.status == 411));
        assert!(matches!(frame(b"\x00\x01garbage\r\n\r\n"), Framing::Fatal(e) if e.status == 400));
        let http10 = b"GET / HTTP/1.0\r\n\r\n";
        assert!(matches!(
            frame(http10),
            Framing::Complete { close: true, .. }
        ));
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEADER_BYTES));
        assert!(matches!(frame(long.as_bytes()), Framing::Fatal(e) if e.status == 431));
        assert_eq!(normalise_path("http://localhost/vm?x=1"), "/vm");
        assert_eq!(normalise_path("/a#b"), "/a");
    }
}
