//! The API request path: bytes as they arrive on a connection → HTTP framing → routing →
//! JSON bodies (`api::server::parse_request`, the functions the `api` thread runs), then what
//! the VMM thread does with a pre-boot request (`types::*::apply` on a `VmConfig`, then
//! `validate`), and the HTTP answer's bytes. Several requests may follow each other on one
//! connection, as on a keep-alive socket.
#![no_main]

use ledge::api::server::{parse_request, response_bytes, Parsed};
use ledge::api::{types, ApiError, Request, Response};
use ledge::config::VmConfig;
use libfuzzer_sys::fuzz_target;

/// What the controller does with a request before boot, without a VM.
fn apply(c: &mut VmConfig, r: &Request) -> Result<Response, ApiError> {
    use Request as R;
    let done = |r: Result<(), ApiError>| r.map(|()| Response::NoContent);
    match r {
        R::PutMachineConfig(m) => done(m.apply(c)),
        R::PatchMachineConfig(m) => done(m.apply(c)),
        R::PutBootSource(b) => done(b.apply(c)),
        R::PutDrive(d) => done(d.apply(c)),
        // What a running VM would check (ids, rate limiter buckets), then the pre-boot refusal.
        R::PatchDrive(p) => {
            let _ = p.check(c);
            Err(p.refuse_before_boot())
        }
        R::PutNetworkInterface(n) => done(n.apply(c)),
        R::PatchNetworkInterface(p) => {
            let _ = p.check(c);
            Err(p.refuse_before_boot())
        }
        R::PutVsock(v) => done(v.apply(c)),
        R::PutEntropy(e) => done(e.apply(c)),
        R::PutBalloon(b) => done(b.apply(c)),
        R::PatchBalloon(u) => done(u.apply(c)),
        R::PatchBalloonStats(u) => done(u.apply(c)),
        R::GetVmConfig => Ok(Response::Json(types::vm_config_json(c))),
        R::GetBalloon => types::balloon_json(c).map(Response::Json),
        R::GetMachineConfig => Ok(Response::Json(
            serde_json::to_value(types::MachineConfig::from_config(c)).unwrap_or_default(),
        )),
        R::LoadSnapshot(p) => {
            let _ = p.memory_path();
            done(p.apply_overrides(c))
        }
        _ => Ok(Response::NoContent),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut config = VmConfig::default();
    let mut buf = data;
    for _ in 0..16 {
        match parse_request(buf) {
            Parsed::Partial { .. } => break,
            Parsed::Fatal(e) => {
                let _ = response_bytes(&Err(e), true);
                break;
            }
            Parsed::Request {
                routed,
                consumed,
                close,
                ..
            } => {
                assert!(
                    consumed > 0 && consumed <= buf.len(),
                    "framing consumed {consumed}"
                );
                let reply = (*routed).and_then(|r| apply(&mut config, &r));
                let _ = config.validate();
                let _ = response_bytes(&reply, close);
                buf = &buf[consumed..];
                if close {
                    break;
                }
            }
        }
    }
});
