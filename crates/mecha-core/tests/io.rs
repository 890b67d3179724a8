mod common;

use common::*;
use mecha_core::dtype::ALL_DTYPES;
use mecha_core::io::reader::SafetensorsFile;
use mecha_core::io::writer::{ensure_not_an_input, FileLayout, PlannedTensor, SafetensorsWriter};
use mecha_core::{DType, ErrorKind};

fn raw_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn reads_every_dtype_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.safetensors");
    let tensors: Vec<(String, Raw)> = ALL_DTYPES
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let numel = 8;
            let n = d.byte_len(numel).unwrap();
            (format!("t.{}", d.safetensors_name()), Raw { dtype: *d, shape: vec![2, 4], data: raw_bytes(n, i as u8) })
        })
        .collect();
    let refs: Vec<(&str, Raw)> = tensors
        .iter()
        .map(|(n, r)| (n.as_str(), Raw { dtype: r.dtype, shape: r.shape.clone(), data: r.data.clone() }))
        .collect();
    write_file(&path, &refs);

    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.tensors().len(), ALL_DTYPES.len());
    for (name, raw) in &tensors {
        let entry = file.entry(name).unwrap();
        assert_eq!(entry.dtype, raw.dtype);
        assert_eq!(entry.shape, raw.shape);
        assert_eq!(file.read_tensor(entry).unwrap(), raw.data, "{name}");
    }
}

#[test]
fn writer_output_is_read_back_by_the_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.safetensors");
    let planned = vec![
        PlannedTensor { name: "weight".into(), dtype: DType::F16, shape: vec![3, 5] },
        PlannedTensor { name: "empty".into(), dtype: DType::F32, shape: vec![0, 4] },
        PlannedTensor { name: "scalar".into(), dtype: DType::F32, shape: vec![] },
        PlannedTensor { name: "position_ids".into(), dtype: DType::I64, shape: vec![1, 77] },
        PlannedTensor { name: "mask".into(), dtype: DType::Bool, shape: vec![3] },
        PlannedTensor { name: "fp8".into(), dtype: DType::F8E4M3, shape: vec![7] },
        PlannedTensor { name: "bf16".into(), dtype: DType::BF16, shape: vec![2, 2] },
    ];
    let metadata = vec![("mecha_recipe".to_string(), "version 0.1.0\nmodel \"a\"".to_string())];
    let writer = SafetensorsWriter::create(&target, FileLayout::new(&planned, &metadata)).unwrap();
    let payloads: Vec<Vec<u8>> = planned.iter().enumerate().map(|(i, t)| raw_bytes(t.byte_len(), i as u8)).collect();
    // Write out of order and in pieces, as parallel workers do.
    for i in (0..planned.len()).rev() {
        let data = &payloads[i];
        let half = data.len() / 2;
        writer.write_at(i, half, &data[half..]).unwrap();
        writer.write_at(i, 0, &data[..half]).unwrap();
    }
    assert!(!target.exists(), "nothing appears at the target before commit");
    writer.commit().unwrap();

    let (tensors, meta) = read_file(&target);
    assert_eq!(meta.get("mecha_recipe").map(String::as_str), Some("version 0.1.0\nmodel \"a\""));
    for (i, t) in planned.iter().enumerate() {
        let (dtype, shape, data) = &tensors[&t.name];
        assert_eq!((dtype, shape), (&t.dtype, &t.shape), "{}", t.name);
        assert_eq!(data, &payloads[i], "{}", t.name);
    }
    // Data is aligned for zero-copy readers: header padded to 8, wide dtypes first.
    let file = SafetensorsFile::open(&target).unwrap();
    assert_eq!((8 + file.header_len()) % 8, 0);
    assert_eq!(file.entry("position_ids").unwrap().start % 8, 0);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn an_unfinished_writer_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.safetensors");
    let planned = vec![PlannedTensor { name: "w".into(), dtype: DType::F32, shape: vec![4] }];
    {
        let writer = SafetensorsWriter::create(&target, FileLayout::new(&planned, &[])).unwrap();
        writer.write_at(0, 0, &[0u8; 16]).unwrap();
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn refuses_to_write_over_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("a.safetensors");
    write_file(&input, &[("w", f32_tensor(DType::F32, &[2], &[1.0, 2.0]))]);
    let err = ensure_not_an_input(&input, std::slice::from_ref(&input)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Output);
    assert!(err.message.contains("one of the merge's inputs"), "{}", err.message);
    // Through another spelling of the same path.
    let odd = dir.path().join(".").join("a.safetensors");
    assert!(ensure_not_an_input(&odd, std::slice::from_ref(&input)).is_err());
    #[cfg(unix)]
    {
        let link = dir.path().join("hard.safetensors");
        std::fs::hard_link(&input, &link).unwrap();
        assert!(ensure_not_an_input(&link, std::slice::from_ref(&input)).is_err());
    }
    assert!(ensure_not_an_input(&dir.path().join("new.safetensors"), &[input]).is_ok());
}

fn header_file(dir: &std::path::Path, name: &str, header: &str, data_len: usize) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open_err(path: &std::path::Path) -> String {
    let err = SafetensorsFile::open(path).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Safetensors, "{}", err.message);
    assert_eq!(err.file.as_deref(), Some(path));
    assert!(err.message.contains(&path.display().to_string()), "{}", err.message);
    err.message
}

#[test]
fn malformed_files_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let missing = d.join("missing.safetensors");
    assert!(open_err(&missing).contains("file not found"));

    let empty = d.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    assert!(open_err(&empty).contains("too short"));

    let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    let truncated = header_file(d, "truncated.safetensors", ok, 12);
    assert!(open_err(&truncated).contains("truncated"), "{}", open_err(&truncated));

    let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
    let lies = header_file(d, "overlap.safetensors", overlap, 12);
    let msg = open_err(&lies);
    assert!(msg.contains("'b'") && msg.contains("overlaps"), "{msg}");

    let hole = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#;
    let msg = open_err(&header_file(d, "hole.safetensors", hole, 20));
    assert!(msg.contains("'b'") && msg.contains("hole"), "{msg}");

    let wrong_size = r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
    let msg = open_err(&header_file(d, "size.safetensors", wrong_size, 8));
    assert!(msg.contains("'a'") && msg.contains("need 12"), "{msg}");

    let msg = open_err(&header_file(d, "json.safetensors", "{not json", 0));
    assert!(msg.contains("not a valid safetensors JSON"), "{msg}");

    let mut huge = (u64::MAX / 2).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    let huge_path = d.join("huge.safetensors");
    std::fs::write(&huge_path, huge).unwrap();
    assert!(open_err(&huge_path).contains("limit"));

    let short_header = d.join("short.safetensors");
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&short_header, bytes).unwrap();
    assert!(open_err(&short_header).contains("truncated"));
}

#[test]
fn odd_but_valid_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.safetensors");
    let ids: Vec<u8> = (0..77i64).flat_map(|v| v.to_le_bytes()).collect();
    write_file(
        &path,
        &[
            ("v_pred", Raw { dtype: DType::F32, shape: vec![0], data: vec![] }),
            ("sigma", Raw { dtype: DType::F32, shape: vec![], data: 2.5f32.to_le_bytes().to_vec() }),
            ("position_ids", Raw { dtype: DType::I64, shape: vec![1, 77], data: ids.clone() }),
        ],
    );
    let file = SafetensorsFile::open(&path).unwrap();
    assert_eq!(file.entry("v_pred").unwrap().byte_len, 0);
    assert_eq!(file.entry("sigma").unwrap().shape, Vec::<usize>::new());
    assert_eq!(file.read_tensor(file.entry("position_ids").unwrap()).unwrap(), ids);
}

#[test]
fn temporary_files_of_dead_merges_are_removed_by_the_next_merge_into_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let dead = {
        let mut child = std::process::Command::new("true").spawn().expect("`true` runs");
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    let partial = |name: &str, pid: u32, idle_secs: u64| {
        let path = dir.path().join(format!(".{name}.{pid}-42.partial"));
        let file = std::fs::File::create(&path).unwrap();
        file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(idle_secs)).unwrap();
        path
    };
    let stale = partial("old.safetensors", dead, 600);
    let recent = partial("busy.safetensors", dead, 0); // maybe a live merge in another PID namespace
    let alive = partial("slow.safetensors", std::process::id(), 600); // this process: alive
    let unrelated = dir.path().join(".notes.partial");
    std::fs::write(&unrelated, b"not ours").unwrap();

    let layout = FileLayout::new(&[PlannedTensor { name: "w".into(), dtype: DType::F32, shape: vec![1] }], &[]);
    let writer = SafetensorsWriter::create(&dir.path().join("out.safetensors"), layout).unwrap();
    writer.write_at(0, 0, &1f32.to_le_bytes()).unwrap();
    writer.commit().unwrap();

    assert!(!stale.exists(), "the dead merge's file is removed");
    assert!(recent.exists() && alive.exists() && unrelated.exists());
}

#[test]
fn folders_fifos_devices_and_duplicate_names_are_refused_by_name_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(open_err(d).contains("is a folder"), "{}", open_err(d));

    let fifo = d.join("pipe.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Opening a FIFO without a writer would block forever; it is refused from its metadata.
    assert!(open_err(&fifo).contains("FIFO"), "{}", open_err(&fifo));
    let device = std::path::Path::new("/dev/null");
    let err = SafetensorsFile::open(device).unwrap_err();
    assert!(err.message.contains("is a device"), "{}", err.message);

    let twice = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
    let path = header_file(d, "twice.safetensors", twice, 16);
    let msg = open_err(&path);
    assert!(msg.contains("names tensor 'a' twice"), "{msg}");
    let same = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    assert!(open_err(&header_file(d, "same.safetensors", same, 8)).contains("twice"));

    let reversed = r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#;
    let msg = open_err(&header_file(d, "reversed.safetensors", reversed, 8));
    assert!(msg.contains("'a' ends (offset 0) before it begins (8)"), "{msg}");
}

#[test]
fn an_output_path_that_is_a_folder_or_special_file_is_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let layout = || FileLayout::new(&[PlannedTensor { name: "w".into(), dtype: DType::F32, shape: vec![1] }], &[]);
    let folder = dir.path().join("out.safetensors");
    std::fs::create_dir(&folder).unwrap();
    let err = SafetensorsWriter::create(&folder, layout()).err().expect("refused");
    assert_eq!(err.kind, ErrorKind::Output);
    assert!(err.message.contains("is a folder"), "{}", err.message);
    let err = SafetensorsWriter::create(std::path::Path::new("/dev/null"), layout()).err().expect("refused");
    assert!(err.message.contains("not a regular file"), "{}", err.message);
    let err = SafetensorsWriter::create(&dir.path().join("missing/out.safetensors"), layout()).err().expect("refused");
    assert!(err.message.contains("does not exist"), "{}", err.message);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing written");
}
