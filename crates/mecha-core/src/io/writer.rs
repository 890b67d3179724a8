//! Streaming safetensors writer. The header is written first, from the planned names, shapes and
//! dtypes, so tensors can be written in any order and in pieces, straight to their final offsets:
//! the whole model is never held in memory. The file is built under a temporary name in the
//! target folder and renamed into place only when complete, so a failure or a cancel never leaves
//! a partial file at the target path.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dtype::DType;
use crate::error::{ErrorKind, MechaError, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.dtype.byte_len(self.numel()).expect("planned tensors have whole-byte sizes")
    }
}

/// Where each planned tensor lands in a safetensors file, and the header that says so.
#[derive(Debug, Clone)]
pub struct FileLayout {
    /// Header JSON, space-padded so that tensor data starts 8-byte aligned.
    pub header: Vec<u8>,
    /// Offset of each planned tensor's data from the start of the file, in plan order.
    pub offsets: Vec<u64>,
    pub total_len: u64,
}

impl FileLayout {
    /// Orders tensors by descending alignment (stable, so plan order holds within a dtype
    /// size) which keeps every tensor naturally aligned for zero-copy readers.
    pub fn new(tensors: &[PlannedTensor], metadata: &[(String, String)]) -> FileLayout {
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.alignment()));

        let mut relative = vec![0u64; tensors.len()];
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            let meta: serde_json::Map<String, serde_json::Value> =
                metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
            header.insert("__metadata__".into(), meta.into());
        }
        let mut cursor = 0u64;
        for &i in &order {
            let t = &tensors[i];
            let end = cursor + t.byte_len() as u64;
            relative[i] = cursor;
            header.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype.safetensors_name(),
                    "shape": t.shape,
                    "data_offsets": [cursor, end],
                }),
            );
            cursor = end;
        }
        let mut header = serde_json::to_vec(&header).expect("plain JSON values serialize");
        header.resize(header.len().next_multiple_of(8), b' ');
        let data_start = 8 + header.len() as u64;
        FileLayout {
            offsets: relative.into_iter().map(|r| data_start + r).collect(),
            total_len: data_start + cursor,
            header,
        }
    }
}

/// Refuses an output path that names one of the inputs (also through links or hard links).
pub fn ensure_not_an_input(target: &Path, inputs: &[PathBuf]) -> Result<()> {
    let Ok(target_meta) = std::fs::metadata(target) else {
        return Ok(()); // a file that does not exist yet cannot be an input
    };
    let target_canon = std::fs::canonicalize(target).ok();
    for input in inputs {
        let same_path = target_canon.is_some() && std::fs::canonicalize(input).ok() == target_canon;
        if same_path || same_inode(&target_meta, input) {
            return Err(MechaError::new(
                ErrorKind::Output,
                format!(
                    "refusing to write the output to {}: it is one of the merge's inputs ({}); \
                     choose another output path",
                    target.display(),
                    input.display()
                ),
            )
            .with_file(target));
        }
    }
    Ok(())
}

#[cfg(unix)]
fn same_inode(target: &std::fs::Metadata, input: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(input).is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
}

#[cfg(not(unix))]
fn same_inode(_: &std::fs::Metadata, _: &Path) -> bool {
    false
}

pub struct SafetensorsWriter {
    target: PathBuf,
    temp: PathBuf,
    file: File,
    layout: FileLayout,
    committed: bool,
}

impl SafetensorsWriter {
    pub fn create(target: &Path, layout: FileLayout) -> Result<Self> {
        let output_error = |problem: String| {
            MechaError::new(ErrorKind::Output, format!("cannot write {}: {problem}", target.display()))
                .with_file(target)
        };
        let file_name = target.file_name().ok_or_else(|| output_error("the output path has no file name".into()))?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(output_error(format!("the folder {} does not exist; create it first", dir.display())));
        }
        if let Ok(meta) = std::fs::metadata(target) {
            if meta.is_dir() {
                return Err(output_error("it is a folder; give the path of the file to write".into()));
            }
            if !meta.is_file() {
                return Err(output_error("it is not a regular file (a FIFO, socket or device)".into()));
            }
        }
        remove_stale_partials(&dir);
        let temp = dir.join(partial_name(&file_name.to_string_lossy()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| output_error(format!("cannot create a file in {}: {e}", dir.display())))?;
        let writer = SafetensorsWriter { target: target.to_path_buf(), temp, file, layout, committed: false };
        let header_len = writer.layout.header.len() as u64;
        let mut head = Vec::with_capacity(8 + writer.layout.header.len());
        head.extend_from_slice(&header_len.to_le_bytes());
        head.extend_from_slice(&writer.layout.header);
        writer.pwrite(0, &head)?;
        // Reserve the full size now so a full disk fails before the merge, not after.
        reserve(&writer.file, writer.layout.total_len).map_err(|e| writer.io_error("reserving space for", e))?;
        Ok(writer)
    }

    pub fn layout(&self) -> &FileLayout {
        &self.layout
    }

    /// Writes bytes of planned tensor `index`, starting `offset` bytes into its data.
    /// Safe to call from many threads at once for disjoint ranges.
    pub fn write_at(&self, index: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        self.pwrite(self.layout.offsets[index] + offset as u64, bytes)
    }

    fn pwrite(&self, at: u64, bytes: &[u8]) -> Result<()> {
        write_all_at(&self.file, bytes, at).map_err(|e| self.io_error("writing", e))
    }

    /// Names the path the user asked for (disk full, permissions), with the temporary file.
    fn io_error(&self, doing: &str, e: std::io::Error) -> MechaError {
        MechaError::io(format!("{doing} {} (in its temporary file {})", self.target.display(), self.temp.display()), e)
            .with_file(&self.target)
    }

    /// Writes the header again with other metadata of the same serialized length (hashes known
    /// only once the tensors are written), so every tensor keeps its offset.
    pub fn rewrite_metadata(&mut self, tensors: &[PlannedTensor], metadata: &[(String, String)]) -> Result<()> {
        let layout = FileLayout::new(tensors, metadata);
        if layout.header.len() != self.layout.header.len() || layout.offsets != self.layout.offsets {
            return Err(MechaError::new(
                ErrorKind::Internal,
                format!("the final metadata of {} does not fit its reserved header", self.target.display()),
            ));
        }
        self.pwrite(8, &layout.header)?;
        self.layout = layout;
        Ok(())
    }

    /// Flushes the file to disk and renames it onto the target path.
    pub fn commit(mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| self.io_error("flushing", e))?;
        std::fs::rename(&self.temp, &self.target)
            .map_err(|e| MechaError::io(format!("renaming the finished file onto {}", self.target.display()), e))?;
        self.committed = true;
        #[cfg(unix)]
        if let Some(dir) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            // Persist the rename itself; failure here cannot lose data, so it is not an error.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// The temporary name an output is built under, next to it: `.<name>.<pid>-<n>.partial`.
pub(crate) fn partial_name(file_name: &str) -> String {
    format!(".{file_name}.{}-{}.partial", std::process::id(), unique_suffix())
}

/// Temporary files (and sharded outputs' folders) of merges that were killed (SIGKILL, power
/// loss) cannot clean up after themselves; the next merge into the folder removes them. One is
/// stale when the process named in it (`.<name>.<pid>-<n>.partial`) is gone and it has not been
/// written to for a minute (so a live merge in another PID namespace sharing the folder is left
/// alone).
pub(crate) fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(partial_owner) else { continue };
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > std::time::Duration::from_secs(60));
        if pid != std::process::id() && idle && !process_alive(pid) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir_all(entry.path());
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The pid in a temporary file name written by [`SafetensorsWriter::create`].
fn partial_owner(name: &str) -> Option<u32> {
    let stem = name.strip_prefix('.')?.strip_suffix(".partial")?;
    let (_, owner) = stem.rsplit_once('.')?;
    let (pid, unique) = owner.split_once('-')?;
    unique.parse::<u64>().ok()?;
    pid.parse().ok()
}

#[cfg(unix)]
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return true };
    // Signal 0 checks existence only; EPERM means it exists but belongs to someone else.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_alive(_: u32) -> bool {
    true // no portable check: keep the file
}

fn unique_suffix() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() as u64);
    nanos ^ (COUNTER.fetch_add(1, Ordering::Relaxed) << 32)
}

/// Sizes the file to `len` bytes. On Linux the blocks are allocated too (`fallocate`), so a
/// disk that cannot hold the output refuses it here, before any tensor is read; `set_len`
/// alone makes a sparse file that fails midway. File systems without `fallocate` keep the
/// sparse file.
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)) {
                return Err(e);
            }
        }
    }
    file.set_len(len)
}

#[cfg(unix)]
fn write_all_at(file: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, at)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut bytes: &[u8], mut at: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !bytes.is_empty() {
        let n = file.seek_write(bytes, at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
        at += n as u64;
    }
    Ok(())
}
