//! The control API: Firecracker-compatible JSON over HTTP/1.1 on a Unix socket.
//!
//! # Threads and the channel
//! [`ApiServer::start`] binds the socket and starts one thread named `api`. That thread only
//! translates: it reads HTTP requests (parsed by `httparse`), routes them with one `match` on
//! (method, path) into a [`Request`] — plain data —, sends an [`ApiRequest`] over an mpsc
//! channel, writes 1 to an eventfd, and waits (at most 30 s, else 503) for the [`Reply`] on the
//! request's own reply channel, which it turns back into HTTP. It never touches VM state.
//!
//! The VMM thread owns the other end, an [`ApiReceiver`]: it registers [`ApiReceiver::event`]
//! in its event loop; when the eventfd is readable it reads it (clearing the count) and then
//! drains [`ApiReceiver::try_recv`] until it returns `None`, answering each request through
//! `ApiRequest::reply`. Requests are served one at a time, in arrival order: the API thread
//! sends the next one only after the previous one was answered (or timed out).
//!
//! # Which requests are legal when
//! The VM states are those of [`crate::vmm::VmState`]: `NotStarted` (Firecracker's
//! "Not started"), `Running`, `Paused`, `Stopped`. Each [`Request`] variant says in which states
//! it is legal; outside them the VMM answers 400 naming the current state
//! (`ApiError::bad_request`). "Pre-boot" means `NotStarted` only. Pre-boot bodies change the one
//! schema, [`crate::config::VmConfig`], through the `apply` methods in [`types`]; they refuse,
//! with 400 naming the field, anything Ledge does not support rather than ignore it.
//!
//! # HTTP
//! Success is 204 with no body (PUT, PATCH) or 200 with JSON (GET); every error carries
//! `{"fault_message": "..."}`. resources/api/ledge-api.json is the OpenAPI description of every
//! route in [`server::ROUTES`] (a test keeps the two equal).

pub mod client;
pub mod server;
pub mod types;

use std::sync::mpsc;

use vmm_sys_util::eventfd::EventFd;

pub use server::{ApiServer, ApiServerError, ServerOptions, ROUTES};

/// One API call, as data. The doc of each variant names the VM states it is legal in.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// `GET /`: always legal. Answer: 200 with `types::InstanceInfo`.
    GetInstanceInfo,
    /// `GET /version`: always legal. Answer: 200 with `types::version_json()`.
    GetVersion,
    /// `GET /vm/config`: always legal. Answer: 200 with `types::vm_config_json(..)` (plus the
    /// `logger` and `metrics` the controller holds).
    GetVmConfig,
    /// `GET /machine-config`: always legal. Answer: 200 with `types::MachineConfig::from_config`.
    GetMachineConfig,
    /// `PUT /machine-config`: pre-boot. `MachineConfig::apply`.
    PutMachineConfig(types::MachineConfig),
    /// `PATCH /machine-config`: pre-boot. `MachineConfigPatch::apply`.
    PatchMachineConfig(types::MachineConfigPatch),
    /// `PUT /boot-source`: pre-boot. `BootSource::apply`.
    PutBootSource(types::BootSource),
    /// `PUT /drives/{drive_id}` (path id checked equal to the body's): pre-boot. `Drive::apply`.
    PutDrive(types::Drive),
    /// `PATCH /drives/{drive_id}`: Running or Paused (as in Firecracker; before boot
    /// `DrivePatch::refuse_before_boot`). Changes the live drive's rate limiter
    /// (`DrivePatch::check`, then `Vmm::update_rate_limiter`) and the config; a new
    /// `path_on_host` is refused.
    PatchDrive(types::DrivePatch),
    /// `PUT /network-interfaces/{iface_id}`: pre-boot. `NetworkInterface::apply`.
    PutNetworkInterface(types::NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}`: like `PatchDrive`, for the interface's
    /// `rx_rate_limiter` and `tx_rate_limiter`.
    PatchNetworkInterface(types::NetworkInterfacePatch),
    /// `PUT /vsock`: pre-boot. `Vsock::apply`.
    PutVsock(types::Vsock),
    /// `PUT /entropy`: pre-boot. `Entropy::apply`.
    PutEntropy(types::Entropy),
    /// `PUT /balloon`: pre-boot. `Balloon::apply`.
    PutBalloon(types::Balloon),
    /// `PATCH /balloon`: pre-boot (`BalloonUpdate::apply`), Running or Paused (the controller
    /// sets the live device's target). 400 when no balloon was configured.
    PatchBalloon(types::BalloonUpdate),
    /// `GET /balloon`: always legal; 400 when no balloon was configured
    /// (`types::balloon_json`).
    GetBalloon,
    /// `GET /balloon/statistics`: Running or Paused, and only if statistics were enabled
    /// (`stats_polling_interval_s` > 0) before boot. Answer: 200 with `types::BalloonStats`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`: pre-boot (`BalloonStatsUpdate::apply`), Running or Paused
    /// (statistics cannot be turned on or off after boot, only their interval changed).
    PatchBalloonStats(types::BalloonStatsUpdate),
    /// `PUT /actions`: `InstanceStart` pre-boot only (NotStarted → Running);
    /// `SendCtrlAltDel` Running only; `FlushMetrics` any state, once `PUT /metrics` was done.
    Action(types::ActionType),
    /// `PATCH /vm`: `Paused` from Running, `Resumed` from Paused (the transition table).
    PatchVm(types::VmStateChange),
    /// `PUT /logger`: any state (Firecracker allows it once, pre-boot; Ledge also later).
    PutLogger(types::Logger),
    /// `PUT /metrics`: any state, once.
    PutMetrics(types::Metrics),
    /// `PUT /snapshot/create`: Paused only (400 otherwise). Writes the state and memory files.
    CreateSnapshot(types::SnapshotCreateParams),
    /// `PUT /snapshot/load`: a fresh process only — NotStarted, before any boot configuration.
    /// The VM comes back Paused, or Running with `resume_vm`.
    LoadSnapshot(types::SnapshotLoadParams),
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    /// 204, no body.
    NoContent,
    /// 200 with this JSON body.
    Json(serde_json::Value),
}

/// A refused or failed call: the HTTP status and the `fault_message` of the body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is wrong or not legal now; the message says what to do.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    /// 400 for a field Ledge does not support (yet), naming it.
    pub fn unsupported(field: &str, why: impl std::fmt::Display) -> Self {
        Self::bad_request(format!("{field} is not supported by Ledge: {why}"))
    }

    /// 400 naming the state a request is not legal in.
    pub fn wrong_state(what: &str, state: crate::vmm::VmState) -> Self {
        Self::bad_request(format!(
            "{what} is not allowed while the VM is {state}",
            state = types::state_name(state)
        ))
    }

    /// 413.
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(413, message)
    }

    /// 500: the VMM failed while doing something legal.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }

    /// 503: the VMM did not answer.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, message)
    }

    /// The JSON body sent with this error.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "fault_message": self.message })
    }
}

impl From<crate::config::ConfigError> for ApiError {
    fn from(e: crate::config::ConfigError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

/// What the VMM answers.
pub type Reply = Result<Response, ApiError>;

/// A request and where to send its answer. The API thread waits for exactly one reply.
#[derive(Debug)]
pub struct ApiRequest {
    pub request: Request,
    pub reply: mpsc::Sender<Reply>,
}

impl ApiRequest {
    /// Sends the answer; a server that stopped waiting (timeout, shutdown) is not an error.
    pub fn respond(self, reply: Reply) {
        let _ = self.reply.send(reply);
    }
}

/// An in-process sending end, for callers in the same process (the library's `VmmHandle`):
/// the same requests and the same answers as over the socket, with no HTTP in between.
#[derive(Clone, Debug)]
pub struct ApiSender {
    requests: mpsc::Sender<ApiRequest>,
    event: std::sync::Arc<EventFd>,
}

/// A connected sender/receiver pair.
pub fn channel() -> std::io::Result<(ApiSender, ApiReceiver)> {
    let event = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    Ok((
        ApiSender {
            requests: tx,
            event: std::sync::Arc::new(event.try_clone()?),
        },
        ApiReceiver {
            requests: rx,
            event,
        },
    ))
}

impl ApiSender {
    /// Sends `request` and waits for the VMM thread's answer.
    pub fn call(&self, request: Request) -> Reply {
        let (tx, rx) = mpsc::channel();
        let gone = || ApiError::unavailable("the VMM thread has stopped");
        self.requests
            .send(ApiRequest { request, reply: tx })
            .map_err(|_| gone())?;
        self.event
            .write(1)
            .map_err(|e| ApiError::unavailable(format!("cannot signal the VMM: {e}")))?;
        rx.recv().map_err(|_| gone())?
    }
}

/// The VMM thread's end: requests from the API thread.
#[derive(Debug)]
pub struct ApiReceiver {
    requests: mpsc::Receiver<ApiRequest>,
    event: EventFd,
}

impl ApiReceiver {
    /// Readable when requests wait. Register it in the event loop; when it fires, `read()` it
    /// and then call `try_recv` until it returns `None`.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// The next waiting request, without blocking.
    pub fn try_recv(&self) -> Option<ApiRequest> {
        self.requests.try_recv().ok()
    }

    /// Waits for the next request; `None` once the server is gone.
    pub fn recv(&self) -> Option<ApiRequest> {
        self.requests.recv().ok()
    }

    /// Waits at most `timeout` for the next request.
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<ApiRequest> {
        self.requests.recv_timeout(timeout).ok()
    }
}
