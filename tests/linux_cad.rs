//! Ctrl-Alt-Del through the API, end to end: inside the KVM lab (see tests/linux_lab.rs), a
//! `ledge --api-sock` boots the Linux test guest with `PUT /boot-source` and `PUT /actions
//! InstanceStart`, the guest runs `sleep 600`, and `PUT /actions SendCtrlAltDel` must make it
//! shut down within seconds: the i8042 delivers the keys on IRQ 1, Linux's atkbd and VT keyboard
//! handler turn them into ctrl_alt_del(), the guest init gets SIGINT, prints LEDGE-GUEST-CAD and
//! reboots (reboot=k: the i8042 reset line), and `ledge` exits 0.
//!
//! The lab has no curl, so the HTTP client is this test binary itself: copied into the lab and
//! run as `<exe> --exact lab_api_client` with `LEDGE_CAD_REQUEST="METHOD PATH [BODY]"`, it makes
//! one request on `LEDGE_CAD_SOCK` and prints `API-STATUS <code>`. Without that variable the
//! `lab_api_client` test does nothing.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Seconds the guest may take from SendCtrlAltDel to the end of `ledge` (the lab's L1 runs
/// under TCG, so this is generous; on hardware KVM it takes well under a second).
const CAD_LIMIT_S: u64 = 30;

/// One HTTP/1.1 request over a Unix socket; returns the status code and the body.
fn http(sock: &str, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if rest.len() >= len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The client role (see the module doc); a no-op in a normal test run.
#[test]
fn lab_api_client() {
    let Ok(req) = std::env::var("LEDGE_CAD_REQUEST") else {
        return;
    };
    let sock = std::env::var("LEDGE_CAD_SOCK").expect("LEDGE_CAD_SOCK");
    let mut parts = req.splitn(3, ' ');
    let method = parts.next().unwrap_or("GET");
    let path = parts.next().unwrap_or("/");
    let body = parts.next().unwrap_or("");
    match http(&sock, method, path, body) {
        Ok((code, body)) => println!("API-STATUS {code} {method} {path} {body}"),
        Err(e) => println!("API-STATUS 0 {method} {path} ({e})"),
    }
}

/// The lab script: boot over the API, wait for the guest's command, Ctrl-Alt-Del, time it.
fn lab_script(client: &str) -> String {
    // Inside a JSON string inside a double-quoted bash word: \\\" becomes \" for JSON.
    let cmdline = r#"console=ttyS0 reboot=k panic=1 ledge_cmd=\\\"sleep 600\\\""#;
    format!(
        r#"G="$LEDGE_GUEST_DIR"
export LEDGE_CAD_SOCK=/tmp/cad.sock
api() {{ LEDGE_CAD_REQUEST="$1" {client} --exact lab_api_client --nocapture --test-threads 1 2>&1 | grep -o 'API-STATUS.*'; }}
# Milliseconds since boot (busybox date has no %N).
ms() {{ read -r up _ </proc/uptime; echo $(( ${{up%.*}} * 1000 + 10#${{up#*.}} * 10 )); }}
rm -f "$LEDGE_CAD_SOCK"
ledge --api-sock "$LEDGE_CAD_SOCK" >/tmp/cad-console.log 2>&1 &
pid=$!
api "PUT /boot-source {{\"kernel_image_path\":\"$G/vmlinux\",\"initrd_path\":\"$G/initramfs.cpio.gz\",\"boot_args\":\"{cmdline}\"}}"
api 'PUT /actions {{"action_type":"SendCtrlAltDel"}}'
api 'PUT /actions {{"action_type":"InstanceStart"}}'
i=0
until grep -q LEDGE-CMD-BEGIN /tmp/cad-console.log; do
    i=$((i + 1))
    if [ "$i" -gt 1800 ] || ! kill -0 "$pid" 2>/dev/null; then echo "=== NO-BEGIN"; break; fi
    sleep 0.1
done
# Let the guest's keyboard settle into its normal state before the keys arrive.
sleep 2
t0=$(ms)
api 'PUT /actions {{"action_type":"SendCtrlAltDel"}}'
i=0
while kill -0 "$pid" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt {limit_ticks} ]; then echo "=== TIMEOUT"; kill -9 "$pid"; break; fi
    sleep 0.1
done
wait "$pid"
rc=$?
t1=$(ms)
echo "=== LEDGE rc=$rc ms=$((t1 - t0))"
echo "=== CONSOLE"
cat /tmp/cad-console.log
echo "=== END"
"#,
        limit_ticks = CAD_LIMIT_S * 10,
    )
}

#[test]
fn linux_guest_shuts_down_on_send_ctrl_alt_del() {
    if !common::require_kvm("linux_guest_shuts_down_on_send_ctrl_alt_del") {
        return;
    }
    let Some(g) = common::require_guest_artifacts(&["vmlinux", "initramfs.cpio.gz"]) else {
        return;
    };

    let client = std::env::current_exe().expect("test binary path");
    let client = client.to_str().expect("UTF-8 test binary path");
    let dir = common::scratch("cad-lab");
    let script_path = dir.join("cad.sh");
    std::fs::write(&script_path, lab_script(client)).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = common::run(
        Command::new("bash")
            .arg(root.join("tools/kvm-lab.sh"))
            .arg("--copy")
            .arg(client)
            .arg("--script")
            .arg(&script_path)
            .env("LEDGE_BIN", common::ledge_bin())
            .env("LEDGE_GUEST_DIR", &g),
        Duration::from_secs(1200),
    );
    println!("{}\n--- stderr\n{}", out.stdout, out.stderr);
    assert_eq!(out.code, Some(0), "the lab run failed");

    // The L1's own kernel messages share its console and may land mid-line: look anywhere.
    let status: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.find("API-STATUS").map(|i| &l[i..]))
        .collect();
    assert_eq!(status.len(), 4, "four API calls: {status:#?}");
    assert!(
        status[0].starts_with("API-STATUS 204 PUT /boot-source"),
        "{status:#?}"
    );
    assert!(
        status[1].starts_with("API-STATUS 400 PUT /actions"),
        "SendCtrlAltDel before InstanceStart is refused: {status:#?}"
    );
    assert!(
        status[2].starts_with("API-STATUS 204 PUT /actions"),
        "{status:#?}"
    );
    assert!(
        status[3].starts_with("API-STATUS 204 PUT /actions"),
        "{status:#?}"
    );
    assert!(
        !out.stdout.contains("=== NO-BEGIN"),
        "the guest never ran its command"
    );
    assert!(
        !out.stdout.contains("=== TIMEOUT"),
        "no shutdown within {CAD_LIMIT_S} s"
    );

    let console = out
        .stdout
        .split("=== CONSOLE")
        .nth(1)
        .and_then(|s| s.split("=== END").next())
        .expect("console log");
    assert!(console.contains("LEDGE-CMD-BEGIN"), "{console}");
    assert!(
        console.contains("LEDGE-GUEST-CAD"),
        "the guest init did not see Ctrl-Alt-Del"
    );
    assert!(
        !console.contains("LEDGE-CMD-END"),
        "the command should not have finished"
    );
    let result = out
        .stdout
        .lines()
        .find_map(|l| l.find("=== LEDGE rc=").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no result line"));
    let mut fields = result.split_whitespace().skip(2);
    let rc = fields.next().unwrap_or("");
    assert_eq!(rc, "rc=0", "`ledge` exit status: {result}");
    let ms: u64 = fields
        .next()
        .and_then(|f| f.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    println!("SendCtrlAltDel → ledge exit 0 in {ms} ms (KVM lab)");
    assert!(ms < CAD_LIMIT_S * 1000);
}
