use super::*;
use crate::arch::x86_64::state::{HostCpu, VmArchState};
use crate::devices::state::{I8042Snapshot, SerialSnapshot};

fn header() -> SnapshotHeader {
    SnapshotHeader {
        ledge_version: "0.1.0".into(),
        id: new_id(),
        kind: SnapshotType::Full,
        parent: None,
        created_unix_ms: 1,
        host_cpu: HostCpu {
            vendor: "AuthenticAMD".into(),
            family: 0x19,
            model: 1,
            stepping: 1,
            brand: "test".into(),
        },
        kvm_caps: vec!["Irqchip".into()],
        memory: MemoryInfo {
            size: 1 << 20,
            regions: vec![(0, 1 << 20)],
            written: 4096,
        },
    }
}

fn body() -> VmSnapshot {
    VmSnapshot {
        config: VmConfig::default(),
        vm: VmArchState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: Vec::new(),
        serial: SerialSnapshot::default(),
        i8042: I8042Snapshot::default(),
        devices: Vec::new(),
    }
}

fn p() -> &'static Path {
    Path::new("vm.snap")
}

#[test]
fn round_trip() {
    let h = header();
    let bytes = encode(&h, &body()).unwrap();
    assert_eq!(&bytes[..8], MAGIC);
    let f = decode(p(), &bytes).unwrap();
    assert_eq!(f.format_version, FORMAT_VERSION);
    assert_eq!(f.header, h);
    assert_eq!(f.body.config, VmConfig::default());
}

#[test]
fn every_damage_is_refused_with_its_cause() {
    let good = encode(&header(), &body()).unwrap();

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(decode(p(), &bad), Err(SnapshotError::Magic(_))));

    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let e = decode(p(), &newer).unwrap_err();
    assert!(matches!(e, SnapshotError::Version { .. }), "{e}");
    assert!(e.to_string().contains("use a newer Ledge"), "{e}");

    for cut in [good.len() - 1, good.len() / 2, 30, 9] {
        let e = decode(p(), &good[..cut]).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        decode(p(), &longer),
        Err(SnapshotError::Truncated { .. })
    ));

    // A flipped bit anywhere in the header, body or checksum.
    for at in [30, good.len() / 2, good.len() - 2] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        let e = decode(p(), &flipped).unwrap_err();
        assert!(matches!(e, SnapshotError::Checksum { .. }), "at {at}: {e}");
    }

    // Lengths that overflow when added.
    let mut huge = good.clone();
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode(p(), &huge),
        Err(SnapshotError::Truncated { .. })
    ));
}

#[test]
fn a_valid_checksum_over_garbage_json_is_a_parse_error() {
    let bytes = frame(b"{}", b"{}");
    let e = decode(p(), &bytes).unwrap_err();
    assert!(
        matches!(e, SnapshotError::Parse { part: "header", .. }),
        "{e}"
    );
}

#[test]
fn staged_files_appear_only_on_commit() {
    let dir = std::env::temp_dir().join(format!("ledge-snap-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    std::fs::write(&path, b"old").unwrap();
    let staged = StagedFile::write(&path, b"new").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"old");
    staged.commit().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        1,
        "no temporary left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_files_skip_untouched_and_zero_pages_and_diffs_merge() {
    use vm_memory::Bytes;
    let dir = std::env::temp_dir().join(format!("ledge-mem-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    mem.write_slice(&[1u8; 4096], GuestAddress(0x3000)).unwrap();
    mem.write_slice(&[0u8; 4096], GuestAddress(0x5000)).unwrap(); // touched, all zero
    let full = dir.join("full.mem");
    let (w, written) = MemoryWriter::write(&full, &mem, None, None, "a:full").unwrap();
    assert!(!full.exists(), "only the temporary exists before commit");
    w.commit().unwrap();
    assert_eq!(written, 4096, "one non-zero touched page");
    let f = File::open(&full).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    let ext = memory::data_extents(&f, 0, 1 << 20).unwrap();
    assert_eq!(ext, vec![(0x3000, 0x4000)]);

    // A diff of one page, with a state file naming `a` as its parent.
    mem.write_slice(&[2u8; 4096], GuestAddress(0x8000)).unwrap();
    let mut dirty = vec![0u64; (1 << 20) / 4096 / 64];
    dirty[0] |= 1 << 8;
    let diff = dir.join("diff.mem");
    let (w, written) = MemoryWriter::write(&diff, &mem, Some(&[dirty]), None, "b:diff").unwrap();
    w.commit().unwrap();
    assert_eq!(written, 4096);
    let mut h = header();
    h.id = "b".into();
    h.kind = SnapshotType::Diff;
    h.parent = Some("a".into());
    let state = dir.join("diff.snap");
    StagedFile::write(&state, &encode(&h, &body()).unwrap())
        .unwrap()
        .commit()
        .unwrap();
    merge(&full, &diff, &state).unwrap();
    let merged = std::fs::read(&full).unwrap();
    assert_eq!(merged[0x3000], 1);
    assert_eq!(merged[0x8000], 2);
    assert_eq!(merged[0x9000], 0);
    // Merging twice is out of order when tags are supported (tmpfs may lack user xattrs).
    if memory::memory_tag(&File::open(&full).unwrap()).is_some() {
        assert_eq!(
            memory::memory_tag(&File::open(&full).unwrap()).as_deref(),
            Some("b:full")
        );
        let e = merge(&full, &diff, &state).unwrap_err();
        assert!(matches!(e, SnapshotError::DiffOrder { .. }), "{e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_sweep_removes_only_temporaries_nobody_writes() {
    let dir = std::env::temp_dir().join(format!("ledge-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("vm.snap");
    // A live writer (this process, or a jailed VMM that is also "PID 1"): its file stays.
    let (live_tmp, live) = create_temp(&target).unwrap();
    // A dead writer's leftover: the file exists, nobody holds its lock.
    let (dead_tmp, dead) = create_temp(&target).unwrap();
    assert_ne!(live_tmp, dead_tmp, "two writers get two names");
    drop(dead);
    // An old-style name from an earlier Ledge, also unlocked.
    let old = dir.join(format!(".vm.snap.ledge-tmp.{}", u32::MAX));
    std::fs::write(&old, b"x").unwrap();
    remove_stale_temps(&target);
    assert!(
        live_tmp.exists(),
        "a file under a live writer's lock was removed"
    );
    assert!(!dead_tmp.exists() && !old.exists(), "leftovers stayed");
    drop(live);
    remove_stale_temps(&target);
    assert!(!live_tmp.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_new_temporary_swept_before_its_lock_is_not_claimed() {
    let dir = std::env::temp_dir().join(format!("ledge-claim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join("vm.snap");
    let create = |tmp: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(tmp)
            .unwrap()
    };
    // Nobody else: claimed.
    let tmp = temp_path(&target);
    assert!(claim(create(&tmp), &tmp).unwrap().is_some());
    // A sweep removed it between the create and the lock.
    let tmp = temp_path(&target);
    let f = create(&tmp);
    std::fs::remove_file(&tmp).unwrap();
    assert!(claim(f, &tmp).unwrap().is_none());
    // A sweep holds its lock (and is about to remove it).
    let tmp = temp_path(&target);
    let f = create(&tmp);
    let sweeper = std::fs::File::open(&tmp).unwrap();
    sweeper.try_lock().unwrap();
    assert!(claim(f, &tmp).unwrap().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}
