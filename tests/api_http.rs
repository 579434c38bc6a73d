//! The API server over its real Unix socket, with a fake VMM thread in the test process that
//! answers every `Request` with a canned reply. The client side writes raw HTTP by hand.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ledge::api::types::{self, ActionType, VmStateChange};
use ledge::api::{
    ApiError, ApiReceiver, ApiServer, ApiServerError, Request, Response, ServerOptions, ROUTES,
};
use serde_json::{json, Value};

/// The tests that open hundreds of sockets run one at a time, to stay under the fd limit.
static MANY_FDS: Mutex<()> = Mutex::new(());

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ledge-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A server and a fake VMM thread that records every request and answers it.
struct Fixture {
    server: Option<ApiServer>,
    path: PathBuf,
    seen: Arc<Mutex<Vec<Request>>>,
    vmm: Option<JoinHandle<()>>,
}

fn canned(r: &Request) -> Result<Response, ApiError> {
    Ok(match r {
        Request::GetInstanceInfo => Response::Json(
            types::InstanceInfo::new("test-vm", ledge::VmState::NotStarted).to_json(),
        ),
        Request::GetVersion => Response::Json(types::version_json()),
        Request::GetVmConfig => Response::Json(types::vm_config_json(&Default::default())),
        Request::GetMachineConfig => Response::Json(
            serde_json::to_value(types::MachineConfig::from_config(&Default::default())).unwrap(),
        ),
        Request::GetBalloon | Request::GetBalloonStats => {
            return Err(ApiError::bad_request("no balloon device is configured"))
        }
        Request::PatchDrive(p) => return Err(p.refuse_before_boot()),
        _ => Response::NoContent,
    })
}

impl Fixture {
    fn start(name: &str) -> Fixture {
        Self::start_with(name, ServerOptions::default())
    }

    fn start_with(name: &str, options: ServerOptions) -> Fixture {
        let path = scratch(name).join("api.sock");
        let (server, rx) = ApiServer::start_with(&path, "test-vm", options).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let vmm = std::thread::spawn(move || fake_vmm(rx, log));
        Fixture {
            server: Some(server),
            path,
            seen,
            vmm: Some(vmm),
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    fn last(&self) -> Option<Request> {
        self.seen.lock().unwrap().last().cloned()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.server.take());
        if let Some(t) = self.vmm.take() {
            let _ = t.join();
        }
    }
}

/// The fake VMM: answers each request as it comes (`recv` returns None once the server is
/// gone), clearing the eventfd the real event loop would wait on.
fn fake_vmm(rx: ApiReceiver, log: Arc<Mutex<Vec<Request>>>) {
    while let Some(req) = rx.recv() {
        let _ = rx.event().read();
        log.lock().unwrap().push(req.request.clone());
        let reply = canned(&req.request);
        req.respond(reply);
    }
}

/// One HTTP response as the client sees it.
#[derive(Debug)]
struct HttpResponse {
    status: u16,
    head: String,
    body: String,
}

impl HttpResponse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body {:?} is not JSON: {e}", self.body))
    }

    fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message in {}", self.body))
            .to_string()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Reads one response (the client side of the test: a tiny, trusting reader).
fn read_response(s: &mut UnixStream, pending: &mut Vec<u8>) -> Option<HttpResponse> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    while pending.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&pending[head_end..head_end + len]).into_owned();
    pending.drain(..head_end + len);
    Some(HttpResponse { status, head, body })
}

fn raw_request(method: &str, path: &str, body: Option<&str>, extra: &str) -> String {
    match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n"),
    }
}

fn call(s: &mut UnixStream, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    s.write_all(raw_request(method, path, body, "").as_bytes())
        .unwrap();
    read_response(s, &mut Vec::new()).unwrap_or_else(|| panic!("{method} {path}: no response"))
}

/// A fresh connection for one request.
fn call1(f: &Fixture, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
    call(&mut f.connect(), method, path, body)
}

#[test]
fn every_route_parses_to_the_right_request() {
    let f = Fixture::start("routes");
    let mut s = f.connect();
    let cases: Vec<(&str, &str, Option<&str>, Request)> = vec![
        ("GET", "/", None, Request::GetInstanceInfo),
        ("GET", "/version", None, Request::GetVersion),
        ("GET", "/vm/config", None, Request::GetVmConfig),
        ("GET", "/machine-config", None, Request::GetMachineConfig),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2,"mem_size_mib":256}"#),
            Request::PutMachineConfig(types::MachineConfig {
                vcpu_count: 2,
                mem_size_mib: 256,
                smt: false,
                cpu_template: None,
                track_dirty_pages: false,
                huge_pages: types::HugePages::None,
            }),
        ),
        (
            "PATCH",
            "/machine-config",
            Some(r#"{"mem_size_mib":512}"#),
            Request::PatchMachineConfig(types::MachineConfigPatch {
                mem_size_mib: Some(512),
                ..Default::default()
            }),
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/k","boot_args":"probe=count"}"#),
            Request::PutBootSource(types::BootSource {
                kernel_image_path: "/k".into(),
                boot_args: Some("probe=count".into()),
                initrd_path: None,
            }),
        ),
        (
            "PUT",
            "/drives/rootfs",
            Some(
                r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false}"#,
            ),
            Request::PutDrive(types::Drive {
                drive_id: "rootfs".into(),
                path_on_host: Some("/r".into()),
                is_root_device: true,
                is_read_only: Some(false),
                partuuid: None,
                cache_type: types::CacheType::Unsafe,
                rate_limiter: None,
                io_engine: None,
                socket: None,
            }),
        ),
        (
            "PATCH",
            "/drives/rootfs",
            Some(r#"{"drive_id":"rootfs","path_on_host":"/r2"}"#),
            Request::PatchDrive(types::DrivePatch {
                drive_id: "rootfs".into(),
                path_on_host: Some("/r2".into()),
                rate_limiter: None,
            }),
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:ac:10:00:02"}"#),
            Request::PutNetworkInterface(types::NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "tap0".into(),
                guest_mac: Some("06:00:ac:10:00:02".into()),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            }),
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id":"eth0"}"#),
            Request::PatchNetworkInterface(types::NetworkInterfacePatch {
                iface_id: "eth0".into(),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            }),
        ),
        (
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid":3,"uds_path":"/v.sock"}"#),
            Request::PutVsock(types::Vsock {
                guest_cid: 3,
                uds_path: "/v.sock".into(),
                vsock_id: None,
            }),
        ),
        (
            "PUT",
            "/entropy",
            Some("{}"),
            Request::PutEntropy(types::Entropy::default()),
        ),
        (
            "PUT",
            "/balloon",
            Some(r#"{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":1}"#),
            Request::PutBalloon(types::Balloon {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 1,
            }),
        ),
        (
            "PATCH",
            "/balloon",
            Some(r#"{"amount_mib":32}"#),
            Request::PatchBalloon(types::BalloonUpdate { amount_mib: 32 }),
        ),
        ("GET", "/balloon", None, Request::GetBalloon),
        ("GET", "/balloon/statistics", None, Request::GetBalloonStats),
        (
            "PATCH",
            "/balloon/statistics",
            Some(r#"{"stats_polling_interval_s":5}"#),
            Request::PatchBalloonStats(types::BalloonStatsUpdate {
                stats_polling_interval_s: 5,
            }),
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            Request::Action(ActionType::InstanceStart),
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"SendCtrlAltDel"}"#),
            Request::Action(ActionType::SendCtrlAltDel),
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"FlushMetrics"}"#),
            Request::Action(ActionType::FlushMetrics),
        ),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state":"Paused"}"#),
            Request::PatchVm(VmStateChange::Paused),
        ),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state":"Resumed"}"#),
            Request::PatchVm(VmStateChange::Resumed),
        ),
        (
            "PUT",
            "/logger",
            Some(r#"{"log_path":"/l","level":"Info","show_level":true}"#),
            Request::PutLogger(types::Logger {
                log_path: Some("/l".into()),
                level: Some(types::LogLevel::Info),
                show_level: Some(true),
                ..Default::default()
            }),
        ),
        (
            "PUT",
            "/metrics",
            Some(r#"{"metrics_path":"/m"}"#),
            Request::PutMetrics(types::Metrics {
                metrics_path: "/m".into(),
            }),
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Diff"}"#),
            Request::CreateSnapshot(types::SnapshotCreateParams {
                snapshot_path: "/s".into(),
                mem_file_path: "/m".into(),
                snapshot_type: ledge::snapshot::SnapshotType::Diff,
                version: None,
            }),
        ),
        (
            "PUT",
            "/snapshot/load",
            Some(
                r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"File","backend_path":"/m"},"resume_vm":true,"network_overrides":[{"iface_id":"n","host_dev_name":"tap9"}]}"#,
            ),
            Request::LoadSnapshot(types::SnapshotLoadParams {
                snapshot_path: "/s".into(),
                mem_file_path: None,
                mem_backend: Some(types::MemBackend {
                    backend_type: types::MemBackendType::File,
                    backend_path: "/m".into(),
                }),
                enable_diff_snapshots: false,
                track_dirty_pages: false,
                resume_vm: true,
                network_overrides: vec![types::NetworkOverride {
                    iface_id: "n".into(),
                    host_dev_name: "tap9".into(),
                }],
                vsock_override: None,
            }),
        ),
    ];
    let mut covered = BTreeSet::new();
    for (method, path, body, want) in cases {
        let r = call(&mut s, method, path, body);
        let expect = canned(&want);
        match &expect {
            Ok(Response::NoContent) => {
                assert_eq!(r.status, 204, "{method} {path}: {r:?}");
                assert!(r.body.is_empty());
            }
            Ok(Response::Json(v)) => {
                assert_eq!(r.status, 200, "{method} {path}: {r:?}");
                assert_eq!(
                    r.header("content-type").as_deref(),
                    Some("application/json")
                );
                assert_eq!(&r.json(), v);
            }
            Err(e) => {
                assert_eq!(r.status, e.status, "{method} {path}: {r:?}");
                assert_eq!(r.fault(), e.message);
            }
        }
        assert_eq!(f.last().as_ref(), Some(&want), "{method} {path}");
        covered.insert(template_of(method, path));
    }
    let all: BTreeSet<_> = ROUTES.iter().map(|(m, p)| format!("{m} {p}")).collect();
    assert_eq!(covered, all, "every route is exercised");
    // GET / answers Firecracker's InstanceInfo.
    let info = call(&mut s, "GET", "/", None).json();
    assert_eq!(info["app_name"], "Ledge");
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "test-vm");
    assert!(info["vmm_version"].is_string());
}

fn template_of(method: &str, path: &str) -> String {
    let t = if let Some(rest) = path.strip_prefix("/drives/") {
        let _ = rest;
        "/drives/{drive_id}".to_string()
    } else if path.starts_with("/network-interfaces/") {
        "/network-interfaces/{iface_id}".to_string()
    } else {
        path.to_string()
    };
    format!("{method} {t}")
}

#[test]
fn bad_requests_get_a_400_naming_the_problem_and_the_server_keeps_serving() {
    let f = Fixture::start("bad");
    let mut s = f.connect();
    let before = f.count();
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        (
            "PUT",
            "/machine-config",
            Some("{not json"),
            "not valid JSON",
        ),
        ("PUT", "/machine-config", Some(""), "Empty PUT request"),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":"two","mem_size_mib":128}"#),
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2,"mem_size_mib":128,"vcpus":2}"#),
            "unknown field `vcpus`",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2}"#),
            "missing field `mem_size_mib`",
        ),
        (
            "PUT",
            "/drives/rootfs",
            Some(r#"{"drive_id":"other","path_on_host":"/r","is_root_device":true}"#),
            "does not match",
        ),
        (
            "PUT",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#),
            "does not match",
        ),
        (
            "PUT",
            "/drives/bad%20id",
            Some(r#"{"drive_id":"bad%20id","path_on_host":"/r","is_root_device":true}"#),
            "invalid",
        ),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"Reboot"}"#),
            "unknown variant `Reboot`",
        ),
        (
            "PATCH",
            "/vm",
            Some(r#"{"state":"Stopped"}"#),
            "unknown variant",
        ),
        (
            "GET",
            "/nothing-here",
            None,
            "Invalid request method and/or path: GET /nothing-here",
        ),
        (
            "DELETE",
            "/",
            None,
            "Invalid request method and/or path: DELETE /",
        ),
        (
            "POST",
            "/actions",
            Some("{}"),
            "Invalid request method and/or path: POST /actions",
        ),
        (
            "PUT",
            "/version",
            Some("{}"),
            "Invalid request method and/or path",
        ),
        ("GET", "/", Some("{}"), "GET request cannot have a body"),
        ("PUT", "/drives", Some("{}"), "ID cannot be empty"),
    ];
    for (method, path, body, needle) in cases {
        let r = call(&mut s, method, path, *body);
        assert_eq!(r.status, 400, "{method} {path} {body:?}: {r:?}");
        let fault = r.fault();
        assert!(
            fault.contains(needle),
            "{method} {path}: {fault:?} lacks {needle:?}"
        );
        // Still served on the same connection.
        assert_eq!(call(&mut s, "GET", "/", None).status, 200);
    }
    // None of the bad requests reached the VMM: only the GETs in between did.
    assert_eq!(f.count() - before, cases.len());
    assert!(f
        .seen
        .lock()
        .unwrap()
        .iter()
        .skip(before)
        .all(|r| *r == Request::GetInstanceInfo));
}

#[test]
fn oversized_bodies_get_413_and_chunked_bodies_411() {
    let f = Fixture::start("big");
    // Announced too big: refused before the body is read, and the client can read the answer
    // even while it is still sending.
    let mut s = f.connect();
    let body = "x".repeat(60_000);
    s.write_all(raw_request("PUT", "/machine-config", Some(&body), "").as_bytes())
        .unwrap();
    let r = read_response(&mut s, &mut Vec::new()).unwrap();
    assert_eq!(r.status, 413);
    assert!(r.fault().contains("51200"), "{}", r.fault());
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    drop(s);
    // Exactly at the limit is accepted.
    let prefix = r#"{"vcpu_count":1,"mem_size_mib":128"#;
    let body = format!("{prefix}{}}}", " ".repeat(51200 - prefix.len() - 1));
    assert_eq!(body.len(), 51200);
    let r = call1(&f, "PUT", "/machine-config", Some(&body));
    assert_eq!(r.status, 204, "{r:?}");
    let mut s = f.connect();
    s.write_all(
        b"PUT /machine-config HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .unwrap();
    let r = read_response(&mut s, &mut Vec::new()).unwrap();
    assert_eq!(r.status, 411);
    assert!(r.fault().contains("Content-Length"));
    // Headers over 8 KiB.
    let mut s = f.connect();
    let junk = format!("GET / HTTP/1.1\r\nX-Junk: {}\r\n\r\n", "j".repeat(9000));
    s.write_all(junk.as_bytes()).unwrap();
    let r = read_response(&mut s, &mut Vec::new()).unwrap();
    assert_eq!(r.status, 431);
    // Not HTTP at all.
    let mut s = f.connect();
    s.write_all(b"\x16\x03\x01 hello there\r\n\r\n").unwrap();
    let r = read_response(&mut s, &mut Vec::new()).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.fault().contains("malformed"));
    assert_eq!(call1(&f, "GET", "/", None).status, 200);
}

#[test]
fn keep_alive_pipelining_and_connection_close() {
    let f = Fixture::start("keepalive");
    let mut s = f.connect();
    for _ in 0..5 {
        let r = call(&mut s, "GET", "/version", None);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection").as_deref(), Some("keep-alive"));
        assert_eq!(
            r.json()["firecracker_version"],
            types::FIRECRACKER_API_VERSION
        );
    }
    // Three requests in one write, one of them split from its body.
    let mut burst = raw_request("GET", "/", None, "");
    burst += &raw_request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#), "");
    burst += &raw_request("GET", "/machine-config", None, "");
    s.write_all(burst.as_bytes()).unwrap();
    let mut pending = Vec::new();
    let statuses: Vec<u16> = (0..3)
        .map(|_| read_response(&mut s, &mut pending).unwrap().status)
        .collect();
    assert_eq!(statuses, [200, 204, 200]);
    // A request that arrives in many small pieces.
    let req = raw_request(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
        "",
    );
    for piece in req.as_bytes().chunks(7) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_response(&mut s, &mut Vec::new()).unwrap().status, 204);
    assert_eq!(f.last(), Some(Request::Action(ActionType::FlushMetrics)));
    // Connection: close is answered, then the server closes.
    s.write_all(raw_request("GET", "/", None, "Connection: close\r\n").as_bytes())
        .unwrap();
    let mut pending = Vec::new();
    let r = read_response(&mut s, &mut pending).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // HTTP/1.0 closes too.
    let mut s = f.connect();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.1 200 OK\r\n"), "{all}");
    // Expect: 100-continue (curl sends it for larger bodies).
    let mut s = f.connect();
    let body = r#"{"metrics_path":"/m"}"#;
    s.write_all(
        format!(
            "PUT /metrics HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut s, &mut pending).unwrap().status, 100);
    s.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s, &mut pending).unwrap().status, 204);
}

#[test]
fn slowloris_is_closed_after_5_s_while_others_are_served() {
    let f = Fixture::start("slow");
    let mut slow = f.connect();
    slow.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Le")
        .unwrap();
    let mut dribble = f.connect();
    dribble
        .write_all(b"PUT /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{")
        .unwrap();
    let start = Instant::now();
    // Others are served at once, repeatedly, meanwhile.
    for _ in 0..10 {
        let t = Instant::now();
        assert_eq!(call1(&f, "GET", "/", None).status, 200);
        assert!(t.elapsed() < Duration::from_secs(1));
        // The dribbler keeps sending a byte now and then: that does not extend its time.
        let _ = dribble.write_all(b" ");
        std::thread::sleep(Duration::from_millis(300));
    }
    for s in [&mut slow, &mut dribble] {
        let r = read_response(s, &mut Vec::new()).expect("a 408 before the close");
        assert_eq!(r.status, 408);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(4) && waited < Duration::from_secs(9),
            "closed after {waited:?}"
        );
    }
    assert_eq!(call1(&f, "GET", "/", None).status, 200);
}

#[test]
fn two_hundred_clients_at_once_are_all_served() {
    let _one_at_a_time = MANY_FDS.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start("many");
    let path = f.path.clone();
    let barrier = Arc::new(std::sync::Barrier::new(200));
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let path = path.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let mut s = UnixStream::connect(&path).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let r = if i % 2 == 0 {
                    call(&mut s, "GET", "/", None)
                } else {
                    call(&mut s, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#))
                };
                r.status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 100);
    assert_eq!(statuses.iter().filter(|s| **s == 204).count(), 100);
}

#[test]
fn connections_past_256_are_refused_with_503() {
    let _one_at_a_time = MANY_FDS.lock().unwrap_or_else(|e| e.into_inner());
    let f = Fixture::start("limit");
    let mut held: Vec<UnixStream> = (0..256).map(|_| f.connect()).collect();
    // Let the server accept them all before the extra ones arrive.
    assert_eq!(call(&mut held[0], "GET", "/", None).status, 200);
    for _ in 0..4 {
        let mut extra = f.connect();
        let r = read_response(&mut extra, &mut Vec::new()).expect("a 503 before the close");
        assert_eq!(r.status, 503);
        assert!(r.fault().contains("256"));
    }
    // The held ones still work; closing some frees slots.
    assert_eq!(call(&mut held[255], "GET", "/", None).status, 200);
    held.truncate(200);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(call1(&f, "GET", "/", None).status, 200);
}

#[test]
fn a_vmm_that_does_not_answer_gives_503() {
    let path = scratch("silent").join("api.sock");
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let (server, rx) = ApiServer::start_with(&path, "silent", options).unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = call(&mut s, "GET", "/", None);
    assert_eq!(r.status, 503);
    assert!(r.fault().contains("did not answer"), "{}", r.fault());
    // The request did arrive, and the eventfd says so.
    assert!(rx.event().read().unwrap() >= 1);
    assert_eq!(rx.try_recv().unwrap().request, Request::GetInstanceInfo);
    // A VMM that went away: 503 at once.
    drop(rx);
    let r = call(&mut s, "GET", "/", None);
    assert_eq!(r.status, 503);
    assert!(r.fault().contains("not running"), "{}", r.fault());
    drop(server);
}

#[test]
fn socket_mode_stale_and_live_sockets_and_removal() {
    let dir = scratch("socket");
    let path = dir.join("api.sock");
    // A stale socket (nobody listening) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(std::fs::metadata(&path).unwrap().file_type().is_socket());
    let (server, rx) = ApiServer::start(&path, "vm1").unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(server.path(), path.as_path());
    // No stray temporary directory is left behind.
    let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(entries.len(), 1);
    // A live one is an error naming the path.
    let e = ApiServer::start(&path, "vm2").unwrap_err();
    assert!(matches!(e, ApiServerError::InUse(_)));
    assert!(e.to_string().contains(path.to_str().unwrap()), "{e}");
    assert!(e.to_string().contains("another process serves it"));
    // Still serving after the refused second start.
    assert!(UnixStream::connect(&path).is_ok());
    drop(server);
    drop(rx);
    assert!(!path.exists(), "the socket is removed on drop");
    // A regular file is not replaced.
    std::fs::write(&path, "data").unwrap();
    let e = ApiServer::start(&path, "vm3").unwrap_err();
    assert!(matches!(e, ApiServerError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    // Bad instance ids are refused.
    assert!(matches!(
        ApiServer::start(&dir.join("x.sock"), "bad id"),
        Err(ApiServerError::InstanceId(_))
    ));
    // A missing directory is an error naming the path.
    let e = ApiServer::start(Path::new("/nonexistent/dir/api.sock"), "vm4").unwrap_err();
    assert!(e.to_string().contains("/nonexistent/dir/api.sock"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The spec and the server agree: every route in resources/api/ledge-api.json is in ROUTES
/// and every route in ROUTES is in the spec.
#[test]
fn spec_and_route_table_match() {
    let spec_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/api/ledge-api.json");
    let text = std::fs::read_to_string(&spec_path).unwrap();
    let spec: Value = serde_json::from_str(&text).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    let mut in_spec = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "put", "patch", "post", "delete"].contains(&method.as_str()) {
                in_spec.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    let served: BTreeSet<_> = ROUTES.iter().map(|(m, p)| format!("{m} {p}")).collect();
    assert_eq!(in_spec, served);
    // Every schema a request body refers to exists.
    let schemas = spec["components"]["schemas"].as_object().unwrap();
    let refs: Vec<&str> = text
        .match_indices("#/components/schemas/")
        .map(|(i, m)| {
            let rest = &text[i + m.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect();
    assert!(!refs.is_empty());
    for r in refs {
        assert!(schemas.contains_key(r), "missing schema {r}");
    }
    let responses = spec["components"]["responses"].as_object().unwrap();
    for (i, m) in text.match_indices("#/components/responses/") {
        let rest = &text[i + m.len()..];
        let name = &rest[..rest.find('"').unwrap()];
        assert!(responses.contains_key(name), "missing response {name}");
    }
    // The version the spec claims is the one GET /version reports.
    assert_eq!(
        spec["info"]["x-firecracker-api-version"],
        json!(types::FIRECRACKER_API_VERSION)
    );
}

/// Request body schemas in the spec list exactly the fields the server's types accept: an
/// object with every property of the schema parses, and the schema's required fields are the
/// ones the server requires.
#[test]
fn spec_body_schemas_match_the_types() {
    let spec_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/api/ledge-api.json");
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(spec_path).unwrap()).unwrap();
    let f = Fixture::start("schemas");
    let mut s = f.connect();
    for (method, template) in ROUTES {
        if *method == "GET" {
            continue;
        }
        let op = &spec["paths"][template][method.to_lowercase()];
        let schema_ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {template}: no request body schema"));
        let name = schema_ref.rsplit('/').next().unwrap();
        let schema = &spec["components"]["schemas"][name];
        let example = schema["example"].clone();
        assert!(example.is_object(), "schema {name} needs an example");
        let path = template
            .replace("{drive_id}", example["drive_id"].as_str().unwrap_or("x"))
            .replace("{iface_id}", example["iface_id"].as_str().unwrap_or("x"));
        // The example parses (the fake VMM may still refuse it, as for PATCH /drives).
        let r = call(&mut s, method, &path, Some(&example.to_string()));
        assert!(
            r.status == 204 || !r.fault().contains("does not match the API"),
            "{method} {path} example {example}: {r:?}"
        );
        // Every property of the schema is known to the server, and no other is.
        let props = schema["properties"].as_object().unwrap();
        for (k, _) in props {
            if example.get(k).is_none() {
                continue;
            }
            let mut without = example.clone();
            without.as_object_mut().unwrap().remove(k);
            let required = schema["required"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == k));
            let r = call(&mut s, method, &path, Some(&without.to_string()));
            let missing = r.status == 400 && r.fault().contains(&format!("missing field `{k}`"));
            assert_eq!(missing, required, "{method} {path} without {k}: {r:?}");
        }
        let mut extra = example.clone();
        extra
            .as_object_mut()
            .unwrap()
            .insert("not_a_field".into(), json!(1));
        let r = call(&mut s, method, &path, Some(&extra.to_string()));
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("not_a_field"), "{}", r.fault());
    }
}
