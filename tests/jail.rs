//! `ledge jail`, checked from the outside: the VMM's /proc entries (ids, capabilities,
//! no_new_privs, namespaces, mounts, root, fds), its cgroup files, and that the jailed VM
//! still boots and serves its API on the socket the host sees under the jail root.
//!
//! These need root (namespaces, device nodes, cgroups): without it they print that they
//! skipped. The VM parts follow the KVM gate.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::probe_io::{ip, is_root, require_root};
use common::vm::{get, ok, Ledge, EXIT_LIMIT, START_LIMIT};
use common::{ledge_bin, require_kvm, run, scratch, wait_until};

const UID: u32 = 40000;
const GID: u32 = 40001;
const LIMIT: Duration = Duration::from_secs(60);
/// The fd number the test leaks into the jailer, without close-on-exec.
const LEAKED_FD: i32 = 57;

fn need_root(test: &str) -> bool {
    require_root(
        test,
        "ledge jail needs root (namespaces, device nodes, cgroups)",
    )
}

/// For a test that runs a jailed VM, past the root and KVM gates (None: skipped): its scratch
/// directory `jail-TAG`, the jails' --root-base in it, and a jail id `t<pid>-TAG` no other test
/// run uses.
fn jail_test(test: &str, tag: &str) -> Option<(PathBuf, PathBuf, String)> {
    if !need_root(test) || !require_kvm(test) {
        return None;
    }
    let dir = scratch(&format!("jail-{tag}"));
    let base = dir.join("base");
    Some((dir, base, format!("t{}-{tag}", std::process::id())))
}

/// `jail --id ID --root-base BASE --uid UID --gid GID JAIL... -- VMM...`
fn jail_args(base: &Path, id: &str, jail: &[&str], vmm: &[&str]) -> Vec<String> {
    let (u, g) = (UID.to_string(), GID.to_string());
    let mut v = vec![
        "jail",
        "--id",
        id,
        "--root-base",
        base.to_str().unwrap(),
        "--uid",
        &u,
        "--gid",
        &g,
    ];
    v.extend_from_slice(jail);
    v.push("--");
    v.extend_from_slice(vmm);
    v.into_iter().map(String::from).collect()
}

/// True when cgroup v2 at /sys/fs/cgroup has the controllers (the jail then uses v2).
fn cgroup_v2() -> bool {
    fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").is_ok_and(|c| {
        ["memory", "cpu", "pids"]
            .iter()
            .all(|x| c.split_whitespace().any(|y| y == *x))
    })
}

/// The parent cgroup for test jails: under the test's own cgroup where cgroups are v1 (so a
/// jailed VMM stays inside whatever cgroup this test runs in), from the root on v2 (whose
/// "no internal processes" rule forbids nesting under a cgroup with processes).
fn parent_cgroup() -> &'static str {
    if cgroup_v2() {
        "/ledge-test"
    } else {
        "ledge-test"
    }
}

/// Unmounts a mount the jail left on the host (failing the test if it is not one).
fn umount(at: &Path) {
    let c = std::ffi::CString::new(at.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path alive for the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    assert_eq!(rc, 0, "{} is not a mount", at.display());
}

/// Removes the test jails' parent cgroup once no test uses it (best effort: a test running
/// beside this one keeps it busy, and the last one to finish removes it).
fn tidy_parent_cgroup() {
    if cgroup_v2() {
        let _ = fs::remove_dir(cgroup_mount(None).join("ledge-test"));
    } else {
        for c in ["memory", "cpu", "pids"] {
            let _ = fs::remove_dir(own_cgroup(c).join("ledge-test"));
        }
    }
}

/// `ledge jail` (see `jail_args`), with `LEAKED_FD` open in the jailer without close-on-exec.
fn spawn_jail(base: &Path, id: &str, jail: &[&str], vmm: &[&str], leak: &Path) -> Ledge {
    let leak = fs::File::open(leak).unwrap();
    let leak_fd = leak.as_raw_fd();
    let mut cmd = Command::new(ledge_bin());
    cmd.args(jail_args(base, id, jail, vmm))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it only makes LEAKED_FD a copy (without
    // FD_CLOEXEC) of a file the parent keeps open until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(leak_fd, LEAKED_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn ledge jail");
    drop(leak);
    Ledge::adopt(child)
}

/// The VMM's host PID, once the jailer wrote it.
fn wait_vmm_pid(l: &mut Ledge, jail_dir: &Path) -> u32 {
    let start = Instant::now();
    loop {
        if let Ok(s) = fs::read_to_string(jail_dir.join("vmm.pid")) {
            return s.trim().parse().expect("vmm.pid holds a number");
        }
        if let Some(st) = l.child.try_wait().unwrap() {
            l.status = Some(st);
            panic!("the jailer exited ({st}) before the VMM ran:\n{}", l.diag());
        }
        assert!(
            start.elapsed() < START_LIMIT,
            "no {}/vmm.pid within {START_LIMIT:?}:\n{}",
            jail_dir.display(),
            l.diag()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: u32, key: &str) -> String {
    common::proc_status(pid, key).unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn ns(pid: &str, which: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{which}"))
        .unwrap()
        .display()
        .to_string()
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// (mount point, root within its file system, mount options, fs type) of each mount in a
/// mountinfo.
fn mounts(pid: u32) -> Vec<(String, String, String, String)> {
    fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (_, post) = l.split_once(" - ").unwrap();
            let fstype = post.split(' ').next().unwrap();
            (f[4].into(), f[3].into(), f[5].into(), fstype.into())
        })
        .collect()
}

/// Where a cgroup hierarchy is mounted (`None`: the v2 one), from the test's own mountinfo.
fn cgroup_mount(controller: Option<&str>) -> PathBuf {
    let mi = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mi.lines() {
        let (pre, post) = l.split_once(" - ").unwrap();
        let mnt = pre.split(' ').nth(4).unwrap();
        let post: Vec<&str> = post.split(' ').collect();
        let hit = match controller {
            None => post[0] == "cgroup2",
            Some(c) => post[0] == "cgroup" && post[2].split(',').any(|o| o == c),
        };
        if hit {
            return PathBuf::from(mnt);
        }
    }
    panic!("no cgroup mount for {controller:?}");
}

/// The test's own cgroup directory in a v1 hierarchy.
fn own_cgroup(controller: &str) -> PathBuf {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    for l in own.lines() {
        let f: Vec<&str> = l.splitn(3, ':').collect();
        if f[1].split(',').any(|x| x == controller) {
            return cgroup_mount(Some(controller)).join(f[2].trim_start_matches('/'));
        }
    }
    panic!("the test is in no {controller:?} cgroup");
}

/// The VMM's cgroup directories as (controller or "" for v2, directory), from its
/// /proc/<pid>/cgroup (read from here, so the paths are from the test's cgroup namespace).
fn vmm_cgroups(pid: u32) -> Vec<(String, PathBuf)> {
    let s = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut v = Vec::new();
    for l in s.lines() {
        let f: Vec<&str> = l.splitn(3, ':').collect();
        let rel = f[2].trim_start_matches('/');
        if cgroup_v2() {
            if f[1].is_empty() {
                v.push((String::new(), cgroup_mount(None).join(rel)));
            }
        } else {
            for c in ["memory", "cpu", "pids"] {
                if f[1].split(',').any(|x| x == c) {
                    v.push((c.to_string(), cgroup_mount(Some(c)).join(rel)));
                }
            }
        }
    }
    v
}

fn read_trim(p: &Path) -> String {
    fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[test]
fn jail_confines_the_vmm_and_the_vm_still_runs() {
    let test = "jail_confines_the_vmm_and_the_vm_still_runs";
    let Some((dir, base, id)) = jail_test(test, "confine") else {
        return;
    };
    let probe = dir.join("probe.elf");
    let o = common::ledge(&["export-probe", probe.to_str().unwrap()], LIMIT);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let leak = dir.join("leaked-into-the-jailer");
    fs::write(&leak, "x").unwrap();
    let file = format!("{}:/k/probe.elf", probe.display());
    let mut l = spawn_jail(
        &base,
        &id,
        &[
            "--parent-cgroup",
            parent_cgroup(),
            "--cgroup",
            "memory.max=512M",
            "--cgroup",
            "cpu.max=50000/100000",
            "--cgroup",
            "pids.max=64",
            "--rlimit",
            "nofile=512",
            "--file",
            &file,
        ],
        &[
            "--id",
            "jailed-vm",
            "run",
            "--kernel",
            "/k/probe.elf",
            "--cmdline",
            "probe=count",
            "--api-sock",
            "/run/api.sock",
        ],
        &leak,
    );
    let jail_dir = base.join(&id);
    let root = jail_dir.join("root");
    let pid = wait_vmm_pid(&mut l, &jail_dir);
    let me = std::process::id().to_string();
    let vmm = pid.to_string();

    // The VM boots (the probe's counter on the console, through the jailer's stdout) and the
    // API answers on the socket the host sees under the jail root.
    l.wait_count_above(None, "the jailed guest runs");
    let sock = root.join("run/api.sock");
    l.wait_accepting(&sock);
    let info = get(&sock, "/");
    assert_eq!(info["id"], "jailed-vm", "{info}");
    assert_eq!(info["state"], "Running", "{info}");
    ok(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#);
    assert_eq!(get(&sock, "/")["state"], "Paused");
    ok(&sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#);
    assert_eq!(get(&sock, "/")["state"], "Running");
    let before = l.last_count();
    l.wait_count_above(before, "the guest runs on after resume");

    // Credentials and capabilities.
    let (u, g) = (UID.to_string(), GID.to_string());
    assert_eq!(status_field(pid, "Uid"), [&u[..]; 4].join(" "));
    assert_eq!(status_field(pid, "Gid"), [&g[..]; 4].join(" "));
    assert_eq!(status_field(pid, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Resource limits: the one asked for, and no core dumps (they would hold guest memory).
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        let l = limits.lines().find(|l| l.starts_with(name)).unwrap();
        l[name.len()..]
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(limit("Max open files"), "512 512", "{limits}");
    assert_eq!(limit("Max core file size"), "0 0", "{limits}");
    // PID 1 in its own PID namespace.
    assert_eq!(status_field(pid, "NSpid"), format!("{pid} 1"));

    // Namespaces: all its own.
    for which in ["mnt", "pid", "net", "ipc", "uts", "cgroup"] {
        assert_ne!(ns(&vmm, which), ns(&me, which), "{which} namespace");
    }

    // Mounts: the jail root read-only at /, and only the jail's own mounts.
    let m = mounts(pid);
    let (_, root_src, root_opts, _) = m.iter().find(|(at, ..)| at == "/").expect("a / mount");
    assert!(
        root_src.ends_with(&format!("/{id}/root")),
        "the VMM's / is {root_src}"
    );
    assert!(root_opts.split(',').any(|o| o == "ro"), "/ is {root_opts}");
    let (.., run_opts, run_fs) = m.iter().find(|(at, ..)| at == "/run").expect("a /run");
    assert_eq!(run_fs, "tmpfs", "/run must be bounded");
    assert!(run_opts.contains("noexec"), "/run is {run_opts}");
    for (at, src, opts, _) in &m {
        let allowed = ["/", "/run", "/dev", "/proc", "/ledge", "/k/probe.elf"]
            .contains(&at.as_str())
            || at.starts_with("/lib")
            || at.starts_with("/usr/lib");
        assert!(allowed, "unexpected mount {at} ({src}) in the jail");
        if at != "/run" && at != "/proc" {
            assert!(opts.split(',').any(|o| o == "ro"), "{at} is {opts}");
        }
    }

    // Its root: only the jail's files.
    let proc_root = PathBuf::from(format!("/proc/{pid}/root"));
    let top = names(&proc_root);
    for must in ["dev", "proc", "run", "ledge", "k"] {
        assert!(top.contains(must), "no /{must} in {top:?}");
    }
    for n in &top {
        assert!(
            ["dev", "proc", "run", "ledge", "k", "lib", "lib64", "usr"].contains(&n.as_str()),
            "unexpected /{n} in the jail: {top:?}"
        );
    }
    assert_eq!(
        names(&proc_root.join("dev")),
        ["kvm", "null", "urandom"].map(String::from).into()
    );
    let kvm = fs::metadata(proc_root.join("dev/kvm")).unwrap();
    assert_eq!(
        (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
        (UID, GID, 0o600)
    );
    // Its /proc shows its own PID namespace: itself as 1 and nothing else.
    let procs: Vec<String> = names(&proc_root.join("proc"))
        .into_iter()
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert_eq!(procs, ["1"]);
    let proc_super = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let proc_line = proc_super
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/proc"))
        .unwrap();
    if proc_line.contains("subset=pid") {
        // Only process directories: nothing host-wide.
        let all = names(&proc_root.join("proc"));
        for hidden in ["sys", "kallsyms", "kcore", "sysrq-trigger", "meminfo"] {
            assert!(
                !all.contains(hidden),
                "/proc/{hidden} is visible in the jail"
            );
        }
    } else {
        println!("[{test}] NOTE: this kernel's proc has no subset=pid");
    }

    // File descriptors: the jailer had the leaked one, the VMM does not.
    let jailer_leak = fs::read_link(format!("/proc/{}/fd/{LEAKED_FD}", l.pid()));
    assert_eq!(
        jailer_leak.as_deref().ok(),
        Some(leak.as_path()),
        "the test's leak did not reach the jailer"
    );
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        let target = fs::read_link(e.path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().contains("leaked-into-the-jailer"),
            "the VMM has the leaked fd as {:?}",
            e.file_name()
        );
    }

    // Its cgroup: the limits, and the VMM in it.
    let cgroups = vmm_cgroups(pid);
    assert!(!cgroups.is_empty());
    for (c, d) in &cgroups {
        assert!(d.ends_with(&id), "the VMM's {c} cgroup is {}", d.display());
        let procs = read_trim(&d.join("cgroup.procs"));
        assert!(procs.lines().any(|p| p == vmm), "{}: {procs}", d.display());
        match c.as_str() {
            "" => {
                assert_eq!(read_trim(&d.join("memory.max")), "536870912");
                assert_eq!(read_trim(&d.join("cpu.max")), "50000 100000");
                assert_eq!(read_trim(&d.join("pids.max")), "64");
            }
            "memory" => assert_eq!(read_trim(&d.join("memory.limit_in_bytes")), "536870912"),
            "cpu" => {
                assert_eq!(read_trim(&d.join("cpu.cfs_quota_us")), "50000");
                assert_eq!(read_trim(&d.join("cpu.cfs_period_us")), "100000");
            }
            _ => assert_eq!(read_trim(&d.join("pids.max")), "64"),
        }
    }
    if !cgroup_v2() {
        assert_eq!(cgroups.len(), 3, "memory, cpu and pids: {cgroups:?}");
    }

    // SIGTERM to the jailer reaches the VMM, which stops cleanly; the jailer then removes the
    // jail directory and the cgroup.
    let st = l.terminate();
    assert_eq!(st.code(), Some(0), "{}", l.diag());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM outlived the jailer"
    );
    assert!(!jail_dir.exists(), "{} is left behind", jail_dir.display());
    for (_, d) in &cgroups {
        assert!(!d.exists(), "{} is left behind", d.display());
    }
    assert!(probe.exists(), "the host's file must survive the jail");
    tidy_parent_cgroup();
    let _ = fs::remove_dir_all(&dir);
}

/// A network namespace made for one test, deleted when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

#[test]
fn jail_joins_a_given_network_namespace() {
    let test = "jail_joins_a_given_network_namespace";
    let Some((dir, base, id)) = jail_test(test, "netns") else {
        return;
    };
    let name = format!("ledge-jt-{}", std::process::id());
    let _ = ip(&["netns", "del", &name]);
    assert!(ip(&["netns", "add", &name]), "ip netns add {name}");
    let netns = Netns(name.clone());
    let ns_path = PathBuf::from(format!("/var/run/netns/{name}"));
    // A TAP in that namespace, owned by the VMM's uid, so that it can attach without
    // capabilities: the jail then also needs /dev/net/tun.
    let tap = "ljt0";
    assert!(
        ip(&[
            "-n",
            &name,
            "tuntap",
            "add",
            "dev",
            tap,
            "mode",
            "tap",
            "user",
            &UID.to_string()
        ]),
        "ip tuntap add in {name}"
    );
    let leak = dir.join("unused");
    fs::write(&leak, "").unwrap();
    let mut l = spawn_jail(
        &base,
        &id,
        &["--netns", ns_path.to_str().unwrap(), "--no-cgroup"],
        &[
            "run",
            "--cmdline",
            "probe=count",
            "--net",
            &format!("tap={tap}"),
            "--api-sock",
            "/run/api.sock",
        ],
        &leak,
    );
    let jail_dir = base.join(&id);
    let pid = wait_vmm_pid(&mut l, &jail_dir);
    l.wait_count_above(None, "the jailed guest runs");
    l.wait_accepting(&jail_dir.join("root/run/api.sock"));
    let vmm_net = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
    assert_eq!(
        vmm_net,
        fs::metadata(&ns_path).unwrap().ino(),
        "the VMM is not in {}",
        ns_path.display()
    );
    let me = std::process::id().to_string();
    assert_ne!(ns(&pid.to_string(), "pid"), ns(&me, "pid"));
    assert!(names(&PathBuf::from(format!("/proc/{pid}/root/dev/net"))).contains("tun"));
    // The guest sees its network card (virtio device id 1).
    assert!(
        l.virtio_devices().iter().any(|(dev, _)| *dev == 1),
        "no virtio-net in the guest:\n{}",
        l.diag()
    );
    // --no-cgroup: the VMM stays in the jailer's cgroups, which are the test's.
    let own = |p: &str| fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap();
    assert_eq!(own(&pid.to_string()), own(&me));
    let st = l.terminate();
    assert_eq!(st.code(), Some(0), "{}", l.diag());
    assert!(!jail_dir.exists());
    drop(netns);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn jail_forwards_the_vmm_failure_and_cleans_up() {
    let test = "jail_forwards_the_vmm_failure_and_cleans_up";
    let Some((dir, base, id)) = jail_test(test, "fail") else {
        return;
    };
    let o = jail_to_end(&base, &id, &[], &["run", "--kernel", "/not/in/the/jail"]);
    // The VMM's own one-line error, its exit status passed on.
    o.assert_clean_error("/not/in/the/jail");
    assert!(
        !base.join(&id).exists(),
        "the jail directory is left behind"
    );

    // With --keep, the jail directory and the cgroup stay for a post-mortem, and the id stays
    // taken until they are removed.
    let o = jail_to_end(
        &base,
        &id,
        &["--keep"],
        &["run", "--kernel", "/not/in/the/jail"],
    );
    o.assert_clean_error("/not/in/the/jail");
    let kept = base.join(&id);
    assert!(kept.join("root/run").is_dir() && kept.join("vmm.pid").is_file());
    // Where parent_cgroup() puts it: from the root on v2, under the test's own cgroup on v1.
    let cgs: Vec<PathBuf> = if cgroup_v2() {
        vec![cgroup_mount(None).join("ledge-test").join(&id)]
    } else {
        ["memory", "cpu", "pids"]
            .map(|c| own_cgroup(c).join("ledge-test").join(&id))
            .to_vec()
    };
    for cg in &cgs {
        assert!(cg.is_dir(), "{} was not kept", cg.display());
    }
    jail_err(&["--id", &id], &base, "is in use");
    for cg in &cgs {
        fs::remove_dir(cg).unwrap();
    }
    // Its /run tmpfs stays mounted on the host too.
    let run = kept.join("root/run");
    umount(&run);
    fs::remove_dir_all(&kept).unwrap();
    tidy_parent_cgroup();
    let _ = fs::remove_dir_all(&dir);
}

fn jail_err(extra: &[&str], base: &Path, needle: &str) {
    let mut v = vec!["jail", "--root-base", base.to_str().unwrap()];
    for (flag, default) in [
        ("--id", "bad-options"),
        ("--uid", "40000"),
        ("--gid", "40001"),
    ] {
        if !extra.contains(&flag) {
            v.extend_from_slice(&[flag, default]);
        }
    }
    v.extend_from_slice(extra);
    if !v.contains(&"--") {
        v.extend_from_slice(&["--", "run"]);
    }
    common::ledge(&v, LIMIT).assert_clean_error(needle);
}

#[test]
fn jail_bad_options_get_one_line_errors() {
    let test = "jail_bad_options_get_one_line_errors";
    // Not root: refused (as root, the check runs as nobody).
    let mut cmd = Command::new(ledge_bin());
    cmd.args(["jail", "--id", "x", "--uid", "1", "--gid", "1", "--", "run"]);
    if is_root() {
        cmd.uid(65534).gid(65534);
    }
    run(&mut cmd, LIMIT).assert_clean_error("must run as root");
    if !need_root(test) {
        return;
    }
    let dir = scratch("jail-bad");
    let base = dir.join("base");
    jail_err(&["--id", "a/b"], &base, "bad --id \"a/b\"");
    jail_err(&["--id", &"x".repeat(65)], &base, "bad --id");
    jail_err(&["--uid", "0"], &base, "refusing --uid 0");
    jail_err(&["--gid", "0"], &base, "refusing --gid 0");
    jail_err(
        &["--file", "/nonexistent/disk.img"],
        &base,
        "/nonexistent/disk.img",
    );
    jail_err(&["--file", "/etc/hostname:/dev/x"], &base, "the jail's own");
    jail_err(&["--file", "/dev/null"], &base, "regular files");
    jail_err(&["--"], &base, "nothing to run");
    jail_err(&["--", "ledge", "run"], &base, "drop the leading \"ledge\"");
    jail_err(&["--cgroup", "io.max=1"], &base, "unknown key \"io.max\"");
    jail_err(
        &["--cgroup", "memory.max=lots"],
        &base,
        "bad --cgroup \"memory.max=lots\"",
    );
    jail_err(&["--cgroup", "cpu.max=10"], &base, "at least 1000");
    jail_err(&["--parent-cgroup", "a/../b"], &base, "bad --parent-cgroup");
    jail_err(&["--run-size", "1K"], &base, "bad --run-size");
    jail_err(&["--rlimit", "as=1G"], &base, "unknown key \"as\"");
    jail_err(
        &["--netns", "/etc/hostname"],
        &base,
        "not a network namespace",
    );
    jail_err(&["--netns", "/nonexistent/ns"], &base, "/nonexistent/ns");
    if !cgroup_v2() {
        jail_err(&["--cgroup-version", "2"], &base, "cgroup v2");
    }
    let rel = [
        "jail",
        "--root-base",
        "rel",
        "--id",
        "x",
        "--uid",
        "1",
        "--gid",
        "1",
        "--",
        "run",
    ];
    common::ledge(&rel, LIMIT).assert_clean_error("bad --root-base \"rel\"");
    // Nothing was made by any of them.
    assert!(!base.exists() || names(&base).is_empty());

    // A jail directory that exists (a running or kept jail) is refused, and left alone.
    let busy = base.join("in-use");
    fs::create_dir_all(busy.join("root/run")).unwrap();
    fs::write(busy.join("vmm.pid"), "1\n").unwrap();
    jail_err(&["--id", "in-use"], &base, "jail \"in-use\" is in use");
    assert!(
        busy.join("vmm.pid").exists(),
        "the other jail's files were touched"
    );

    // Usage errors stay clap's (exit status 2).
    let o = common::ledge(&["jail", "--id", "x", "--uid", "many", "--gid", "1"], LIMIT);
    assert_eq!(o.code, Some(2), "{}", o.stderr);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn jailer_sigkill_takes_the_vmm_with_it() {
    let test = "jailer_sigkill_takes_the_vmm_with_it";
    let Some((dir, base, id)) = jail_test(test, "kill") else {
        return;
    };
    let leak = dir.join("unused");
    fs::write(&leak, "").unwrap();
    let mut l = spawn_jail(
        &base,
        &id,
        &["--no-cgroup"],
        &["run", "--cmdline", "probe=count"],
        &leak,
    );
    let pid = wait_vmm_pid(&mut l, &base.join(&id));
    l.wait_count_above(None, "the jailed guest runs");
    l.signal(libc::SIGKILL);
    l.wait_exit(EXIT_LIMIT).expect("the jailer dies");
    // Gone, or a zombie waiting for whoever reaps orphans here.
    let alive = || {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
    };
    wait_until(
        EXIT_LIMIT,
        || format!("the VMM {pid} outlived its jailer"),
        || !alive(),
    );
    // Killed outright, the jailer could not clean up: the directory and its /run mount stay,
    // as documented.
    let run = base.join(&id).join("root/run");
    umount(&run);
    let _ = fs::remove_dir_all(&dir);
}

/// `key=value` from a probe report line.
fn kv<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Runs a jail under `parent_cgroup()` to the end (the probe stops by itself); returns its
/// output.
fn jail_to_end(base: &Path, id: &str, jail: &[&str], vmm: &[&str]) -> common::Output {
    let mut opts = vec!["--parent-cgroup", parent_cgroup()];
    opts.extend_from_slice(jail);
    run(
        Command::new(ledge_bin()).args(jail_args(base, id, &opts, vmm)),
        LIMIT,
    )
}

/// Files given with --file: a writable disk (:rw) the guest writes, a read-only one it
/// cannot; a read-only bind holds even when the VMM asks for the disk read-write; the rng
/// device reads the jail's /dev/urandom; pids.max is enforced inside.
#[test]
fn jail_files_devices_and_limits_work_inside() {
    let test = "jail_files_devices_and_limits_work_inside";
    let Some((dir, base, id)) = jail_test(test, "files") else {
        return;
    };
    let (rw, ro) = (dir.join("rw.img"), dir.join("ro.img"));
    for f in [&rw, &ro] {
        fs::write(f, vec![0x5au8; 1 << 20]).unwrap();
    }
    // The VMM's uid must be able to write the rw disk: the jail keeps host ownership.
    std::os::unix::fs::chown(&rw, Some(UID), Some(GID)).unwrap();
    std::os::unix::fs::chown(&ro, Some(UID), Some(GID)).unwrap();
    let ro_before = fs::read(&ro).unwrap();
    let rw_file = format!("{}:/disks/rw.img:rw", rw.display());
    let ro_file = format!("{}:/disks/ro.img", ro.display());
    let out = jail_to_end(
        &base,
        &id,
        &["--file", &rw_file, "--file", &ro_file],
        &[
            "run",
            "--console",
            "stdio",
            "--disk",
            "path=/disks/rw.img",
            "--disk",
            "path=/disks/ro.img,ro",
            "--cmdline",
            "probe=blk",
        ],
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let l0 = out.line("blk: dev=0");
    assert_eq!(kv(&l0, "write"), "ok", "{l0}");
    assert_eq!(kv(&l0, "read"), "ok", "{l0}");
    let l1 = out.line("blk: dev=1");
    assert_eq!(kv(&l1, "write"), "ioerr", "{l1}");
    assert_ne!(
        fs::read(&rw).unwrap(),
        vec![0x5au8; 1 << 20],
        "the guest wrote nothing"
    );
    assert_eq!(
        fs::read(&ro).unwrap(),
        ro_before,
        "a read-only file changed"
    );
    assert!(!base.join(&id).exists());

    // The host file is writable by the uid, but bound read-only: the VMM cannot open it
    // read-write.
    let out = jail_to_end(
        &base,
        &id,
        &["--file", &ro_file],
        &[
            "run",
            "--disk",
            "path=/disks/ro.img",
            "--cmdline",
            "probe=blk",
        ],
    );
    out.assert_clean_error("Read-only file system");
    assert_eq!(fs::read(&ro).unwrap(), ro_before);

    let out = jail_to_end(&base, &id, &[], &["run", "--rng", "--cmdline", "probe=rng"]);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let l = out.line("rng:");
    assert_eq!(kv(&l, "bytes"), "65536", "{l}");

    // pids.max=1: the VMM cannot start its vCPU thread.
    let out = jail_to_end(&base, &id, &["--cgroup", "pids.max=1"], &["run"]);
    out.assert_clean_error("cannot start the thread for vcpu 0");
    assert!(!base.join(&id).exists());
    tidy_parent_cgroup();
    let _ = fs::remove_dir_all(&dir);
}

/// --daemonize: the command returns once the VMM runs; the detached supervisor (its PID in
/// jailer.pid) stops the VMM on SIGTERM and cleans up.
#[test]
fn jail_daemonize_returns_once_the_vmm_runs() {
    let test = "jail_daemonize_returns_once_the_vmm_runs";
    let Some((dir, base, id)) = jail_test(test, "daemon") else {
        return;
    };
    let out = jail_to_end(
        &base,
        &id,
        &["--daemonize"],
        &[
            "run",
            "--console",
            "file:/run/console.log",
            "--cmdline",
            "probe=count",
            "--api-sock",
            "/run/api.sock",
        ],
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    let jail_dir = base.join(&id);
    // Both PIDs are there when it returns.
    let vmm = read_trim(&jail_dir.join("vmm.pid"));
    let sup: i32 = read_trim(&jail_dir.join("jailer.pid")).parse().unwrap();
    assert_eq!(
        status_field(vmm.parse().unwrap(), "NSpid"),
        format!("{vmm} 1")
    );
    // The supervisor is in its own session, the VMM its child.
    let stat = fs::read_to_string(format!("/proc/{vmm}/stat")).unwrap();
    let ppid = stat.rsplit_once(") ").unwrap().1.split(' ').nth(1).unwrap();
    assert_eq!(ppid, sup.to_string());
    let sock = jail_dir.join("root/run/api.sock");
    wait_until(
        START_LIMIT,
        || format!("no {}", sock.display()),
        || sock.exists(),
    );
    assert_eq!(get(&sock, "/")["state"], "Running");
    let console = jail_dir.join("root/run/console.log");
    wait_until(
        START_LIMIT,
        || format!("no count in {}", console.display()),
        || {
            fs::read_to_string(&console)
                .unwrap_or_default()
                .contains("count: 1\n")
        },
    );
    // SAFETY: kill(2) on the supervisor this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(sup, libc::SIGTERM) }, 0);
    wait_until(
        EXIT_LIMIT,
        || "the supervisor did not clean up after SIGTERM".into(),
        || !jail_dir.exists(),
    );
    // The supervisor reaped it before cleaning up.
    assert!(!Path::new(&format!("/proc/{vmm}")).exists());
    tidy_parent_cgroup();
    let _ = fs::remove_dir_all(&dir);
}

/// The Seccomp mode (0 none, 2 filter) of every thread of `pid`.
fn seccomp_modes(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let s = fs::read_to_string(t.unwrap().path().join("status")).unwrap();
            common::proc_field(&s, "Seccomp").expect("a Seccomp: line")
        })
        .collect()
}

/// `ledge --seccomp ACTION jail ...` / `ledge --no-seccomp jail ...`: the flag reaches the
/// jailed VMM (it used to be dropped, leaving the VMM on the default kill filters); given on
/// both sides of `--` it is refused.
#[test]
fn jail_passes_the_global_seccomp_flags_on() {
    let test = "jail_passes_the_global_seccomp_flags_on";
    let Some((dir, base, id)) = jail_test(test, "seccomp") else {
        return;
    };
    let jail_dir = base.join(&id);
    for (global, want_mode) in [(&["--no-seccomp"][..], "0"), (&["--seccomp", "log"], "2")] {
        let mut cmd = Command::new(ledge_bin());
        cmd.args(global)
            .args(jail_args(
                &base,
                &id,
                &["--no-cgroup"],
                &["run", "--cmdline", "probe=count"],
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut l = Ledge::adopt(cmd.spawn().expect("spawn ledge jail"));
        let pid = wait_vmm_pid(&mut l, &jail_dir);
        l.wait_count_above(None, "the jailed guest runs");
        // The VMM's own command line: the flag in front of the arguments after --.
        let cmdline = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
        let argv: Vec<&str> = cmdline.split_terminator('\0').collect();
        let mut want = vec!["ledge"];
        want.extend_from_slice(global);
        want.extend_from_slice(&["run", "--cmdline", "probe=count"]);
        assert_eq!(argv, want, "{global:?}");
        // And in force: no filter at all with --no-seccomp, filters on every thread with log.
        let modes = seccomp_modes(pid);
        assert!(modes.len() >= 2, "a VMM and a vCPU thread: {modes:?}");
        assert!(
            modes.iter().all(|m| m == want_mode),
            "{global:?}: {modes:?}"
        );
        // Its /run (the tmpfs the jailer mounts with the VMM's ids) is the VMM's alone.
        let run = fs::metadata(format!("/proc/{pid}/root/run")).unwrap();
        assert_eq!(
            (run.uid(), run.gid(), run.mode() & 0o777),
            (UID, GID, 0o750)
        );
        let st = l.terminate();
        assert_eq!(st.code(), Some(0), "{}", l.diag());
        assert!(!jail_dir.exists(), "{} is left behind", jail_dir.display());
    }
    let mut v = vec!["--seccomp", "log"];
    let args = jail_args(&base, &id, &["--no-cgroup"], &["run", "--no-seccomp"]);
    v.extend(args.iter().map(String::as_str));
    common::ledge(&v, LIMIT).assert_clean_error("on one side only");
    assert!(!jail_dir.exists());
    let _ = fs::remove_dir_all(&dir);
}
