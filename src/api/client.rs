//! A minimal client for Ledge's (and Firecracker's) API socket: one request per connection,
//! the answer's status and body. Used by `ledge snapshot create`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors talking to an API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {0}: is the VM running with --api-sock there?")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("the API connection failed")]
    Io(#[from] std::io::Error),
    #[error("the API answered something that is not HTTP/1.1")]
    Response,
}

/// Longest answer accepted (API bodies are small).
const MAX_ANSWER: u64 = 1 << 20;

/// Sends `method path` with an optional JSON body; returns the status and the body.
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    let mut s = UnixStream::connect(sock).map_err(|e| ClientError::Connect(sock.into(), e))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(ClientError::Response);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf).map_err(|_| ClientError::Response)? {
            httparse::Status::Partial => {
                if buf.len() as u64 > MAX_ANSWER {
                    return Err(ClientError::Response);
                }
            }
            httparse::Status::Complete(head) => {
                let status = resp.code.ok_or(ClientError::Response)?;
                let len = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                    .unwrap_or(0)
                    .min(MAX_ANSWER) as usize;
                let mut rest = buf[head..].to_vec();
                while rest.len() < len {
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        return Err(ClientError::Response);
                    }
                    rest.extend_from_slice(&chunk[..n]);
                }
                rest.truncate(len);
                return Ok((status, String::from_utf8_lossy(&rest).into_owned()));
            }
        }
    }
}
