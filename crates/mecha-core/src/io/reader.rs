//! safetensors reader. The header is validated before any tensor is exposed; tensor data is
//! read on demand with positioned reads into the caller's buffers.
//!
//! Data is deliberately not memory-mapped: with the large page-cache folios of current kernels,
//! one fault maps a whole folio, so pages released with `madvise` come back when a neighbouring
//! range is touched and resident memory creeps up to the size of the inputs. Positioned reads
//! cost one copy from the page cache and keep resident memory at the size of the buffers.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use indexmap::IndexMap;
use memmap2::Mmap;
use safetensors::{SafeTensorError, SafeTensors};

use crate::dtype::DType;
use crate::error::{MechaError, Result};

/// Header limit shared with the `safetensors` crate; larger headers are refused.
pub const MAX_HEADER_BYTES: usize = 100_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in the file.
    pub start: usize,
    pub byte_len: usize,
    /// Which file of a sharded checkpoint holds it (0 for a single file).
    pub shard: usize,
}

impl TensorEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where a safetensors file's bytes are.
enum Backing {
    File(File),
    /// A whole file held in memory (a state dict given by the host application).
    Memory(Vec<u8>),
    /// The files of a sharded checkpoint (`TensorEntry::shard` indexes them), each validated
    /// as a file is.
    Shards {
        index: PathBuf,
        files: Vec<(PathBuf, File)>,
    },
}

/// An open, validated safetensors file, or a sharded checkpoint read as one state dict.
pub struct SafetensorsFile {
    /// The file's path, the folder or index of a sharded checkpoint, or the label of an
    /// in-memory file.
    path: PathBuf,
    backing: Backing,
    file_len: usize,
    header_len: usize,
    /// Tensors in data-offset order, which is also the order that reads the file sequentially.
    tensors: IndexMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl SafetensorsFile {
    /// Opens a `.safetensors` file, or a sharded checkpoint: its `*.safetensors.index.json`, or
    /// a folder holding one (or holding a single `.safetensors` file). See `io::shards`.
    pub fn open(path: &Path) -> Result<Self> {
        match super::shards::locate(path)? {
            super::shards::Located::File(file) => Self::open_file(&file),
            super::shards::Located::Index(index) => super::shards::open_sharded(path, &index),
        }
    }

    /// The shards of a checkpoint as one state dict (`io::shards` has checked that they agree
    /// with the index).
    pub(super) fn from_shards(
        path: &Path,
        index: &Path,
        shards: Vec<SafetensorsFile>,
        tensors: IndexMap<String, TensorEntry>,
        metadata: BTreeMap<String, String>,
    ) -> SafetensorsFile {
        let file_len = shards.iter().map(|s| s.file_len).sum();
        let header_len = shards.iter().map(|s| s.header_len).sum();
        let files = shards
            .into_iter()
            .map(|s| match s.backing {
                Backing::File(f) => (s.path, f),
                _ => unreachable!("shards are opened from files"),
            })
            .collect();
        let backing = Backing::Shards { index: index.to_path_buf(), files };
        SafetensorsFile { path: path.to_path_buf(), backing, file_len, header_len, tensors, metadata }
    }

    /// The index of a sharded checkpoint (an output must not overwrite it either).
    pub fn index_path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Shards { index, .. } => Some(index),
            _ => None,
        }
    }

    /// The files the data is read from: the file itself, or every shard.
    pub fn files(&self) -> Vec<PathBuf> {
        match &self.backing {
            Backing::Shards { files, .. } => files.iter().map(|(p, _)| p.clone()).collect(),
            _ => vec![self.path.clone()],
        }
    }

    /// How many files hold the data (1 unless sharded).
    pub fn shard_count(&self) -> usize {
        match &self.backing {
            Backing::Shards { files, .. } => files.len(),
            _ => 1,
        }
    }

    pub(super) fn open_file(path: &Path) -> Result<Self> {
        // Checked before opening: opening a FIFO blocks until a writer appears.
        refuse_non_regular(path)?;
        let file = File::open(path).map_err(|e| {
            let problem = if e.kind() == std::io::ErrorKind::NotFound {
                "file not found; check the path (relative paths are resolved against the \
                 current directory)"
                    .to_string()
            } else {
                format!("cannot open: {e}")
            };
            MechaError::safetensors(path, problem)
        })?;
        let file_len =
            file.metadata().map_err(|e| MechaError::safetensors(path, format!("cannot read file size: {e}")))?.len()
                as usize;
        if file_len < 8 {
            return Err(MechaError::safetensors(
                path,
                format!(
                    "file is {file_len} bytes long, too short to be safetensors (the 8-byte header \
                     length is missing); the file is empty or truncated"
                ),
            ));
        }
        // The safetensors crate validates against the whole file as one buffer; a map lets it
        // do so touching only the header pages. The map is dropped once the header is read.
        // SAFETY: the map is read-only and only the header is read through it.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| MechaError::safetensors(path, format!("cannot memory-map: {e}")))?;
        let parsed = parse_header(path, &map);
        drop(map);
        let (header_len, tensors, metadata) = parsed?;
        advise_sequential(&file);
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            backing: Backing::File(file),
            file_len,
            header_len,
            tensors,
            metadata,
        })
    }

    /// A safetensors file held in memory, validated as a file on disk is; `label` names it in
    /// errors and reports.
    pub fn from_bytes(label: &str, bytes: Vec<u8>) -> Result<Self> {
        let path = Path::new(label);
        if bytes.len() < 8 {
            return Err(MechaError::safetensors(path, format!("{} bytes is too short to be safetensors", bytes.len())));
        }
        let (header_len, tensors, metadata) = parse_header(path, &bytes)?;
        let file_len = bytes.len();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            backing: Backing::Memory(bytes),
            file_len,
            header_len,
            tensors,
            metadata,
        })
    }

    /// Whether the data is held in memory rather than read from a file.
    pub fn in_memory(&self) -> bool {
        matches!(self.backing, Backing::Memory(_))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header_len(&self) -> usize {
        self.header_len
    }

    pub fn file_len(&self) -> usize {
        self.file_len
    }

    pub fn tensors(&self) -> &IndexMap<String, TensorEntry> {
        &self.tensors
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Reads `out.len()` bytes of a tensor's data, starting `offset` bytes into it.
    pub fn read(&self, entry: &TensorEntry, offset: usize, out: &mut [u8]) -> Result<()> {
        debug_assert!(offset + out.len() <= entry.byte_len);
        let at = entry.start + offset;
        let (file, path) = match &self.backing {
            Backing::File(file) => (file, &self.path),
            Backing::Shards { files, .. } => (&files[entry.shard].1, &files[entry.shard].0),
            Backing::Memory(bytes) => {
                // Entries were validated against the buffer's length when it was opened.
                out.copy_from_slice(&bytes[at..at + out.len()]);
                return Ok(());
            }
        };
        read_exact_at(file, out, at as u64).map_err(|e| {
            MechaError::safetensors(
                path,
                format!("reading tensor data failed ({e}); was the file changed or truncated during the merge?"),
            )
        })
    }

    /// The length prefix and header JSON of each file the data is read from, as they are on
    /// disk now (read again, so a file changed since it was opened shows).
    pub fn raw_headers(&self) -> Result<Vec<u8>> {
        let read_head = |file: &File, path: &Path| -> Result<Vec<u8>> {
            let fail = |e: std::io::Error| MechaError::safetensors(path, format!("reading the header failed ({e})"));
            let mut prefix = [0u8; 8];
            read_exact_at(file, &mut prefix, 0).map_err(fail)?;
            let len = u64::from_le_bytes(prefix) as usize;
            if len > MAX_HEADER_BYTES {
                return Err(MechaError::safetensors(path, "the header changed since the file was opened"));
            }
            let mut head = vec![0u8; 8 + len];
            read_exact_at(file, &mut head, 0).map_err(fail)?;
            Ok(head)
        };
        match &self.backing {
            Backing::File(file) => read_head(file, &self.path),
            Backing::Memory(bytes) => Ok(bytes[..8 + self.header_len].to_vec()),
            Backing::Shards { files, .. } => {
                let mut all = vec![];
                for (path, file) in files {
                    all.extend(read_head(file, path)?);
                }
                Ok(all)
            }
        }
    }

    /// A whole tensor's bytes (for small tensors, tools and tests).
    pub fn read_tensor(&self, entry: &TensorEntry) -> Result<Vec<u8>> {
        let mut out = vec![0u8; entry.byte_len];
        self.read(entry, 0, &mut out)?;
        Ok(out)
    }
}

type Header = (usize, IndexMap<String, TensorEntry>, BTreeMap<String, String>);

/// Validates a safetensors header (`bytes` holds at least the header) and lists its tensors.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    // The JSON parser keeps the last of two equal names silently (and the layout check would
    // then blame offsets): which tensor is meant? Checked first.
    let declared = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if let Some(name) = bytes.get(8..8usize.saturating_add(declared)).and_then(duplicate_name) {
        return Err(MechaError::safetensors(
            path,
            format!("the header names tensor '{name}' twice; the file is corrupt (re-save it)"),
        )
        .with_key(&name));
    }
    let (header_len, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| MechaError::safetensors(path, explain_header_error(bytes, &e)))?;

    let infos = meta.tensors();
    let mut tensors = IndexMap::with_capacity(infos.len());
    for name in meta.offset_keys() {
        let info = infos[&name];
        let dtype = DType::from_safetensors_name(&format!("{}", info.dtype)).ok_or_else(|| {
            MechaError::safetensors(
                path,
                format!("tensor '{name}' has dtype {} which this version cannot read", info.dtype),
            )
            .with_key(&name)
        })?;
        let (begin, end) = info.data_offsets;
        tensors.insert(
            name,
            TensorEntry {
                dtype,
                shape: info.shape.clone(),
                start: 8 + header_len + begin,
                byte_len: end - begin,
                shard: 0,
            },
        );
    }
    let metadata =
        meta.metadata().as_ref().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    Ok((header_len, tensors, metadata))
}

/// Tells the kernel to read ahead more aggressively: tensors are consumed in file order.
fn advise_sequential(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain advice on a file descriptor we own; failure is harmless.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

#[cfg(unix)]
fn read_exact_at(file: &File, out: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, out, at)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut out: &mut [u8], mut at: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !out.is_empty() {
        let n = file.seek_read(out, at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out = &mut out[n..];
        at += n as u64;
    }
    Ok(())
}

/// Turns the crate's terse validation errors into a sentence that says what is wrong with the
/// file and, where possible, which tensor.
fn explain_header_error(buf: &[u8], err: &SafeTensorError) -> String {
    let file_len = buf.len();
    let declared = u64::from_le_bytes(buf[..8].try_into().expect("length checked by caller"));
    match err {
        SafeTensorError::HeaderTooLarge => format!(
            "the header claims to be {declared} bytes, over the {MAX_HEADER_BYTES}-byte limit; \
             this is not a safetensors file or it is corrupt"
        ),
        SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooSmall => format!(
            "the header claims {declared} bytes but the file only has {} after the length \
             prefix; the file is truncated or not safetensors",
            file_len - 8
        ),
        SafeTensorError::InvalidHeader(_) => "the header is not valid UTF-8 text".to_string(),
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            format!("the header is not a valid safetensors JSON object ({e})")
        }
        _ => diagnose_layout(buf).unwrap_or_else(|| format!("invalid header ({err:?})")),
    }
}

/// Refuses folders, FIFOs, sockets and devices by name, without opening them.
fn refuse_non_regular(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) }; // open() says what is wrong
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_dir() {
        "a folder"
    } else {
        special_file_kind(&kind)
    };
    Err(MechaError::safetensors(
        path,
        format!(
            "is {what}, not a safetensors file; give the path of a .safetensors file (or of a sharded \
             checkpoint's folder or .safetensors.index.json)"
        ),
    ))
}

#[cfg(unix)]
fn special_file_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn special_file_kind(_: &std::fs::FileType) -> &'static str {
    "not a regular file"
}

/// The first top-level name that appears twice in a header's JSON object.
fn duplicate_name(header: &[u8]) -> Option<String> {
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut duplicate = None;
            while let Some(name) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if duplicate.is_none() && !seen.insert(name.clone()) {
                    duplicate = Some(name);
                }
            }
            Ok(duplicate)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(header);
    serde::Deserializer::deserialize_map(&mut de, Names).ok().flatten()
}

/// Re-reads the header leniently to name the first tensor whose declared layout is wrong.
fn diagnose_layout(buf: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(buf[..8].try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(buf.get(8..8 + n)?).ok()?;
    let data_len = buf.len() - 8 - n;
    let mut entries = Vec::new();
    for (name, info) in header.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        let offsets = info.get("data_offsets")?.as_array()?;
        let begin = offsets.first()?.as_u64()? as usize;
        let end = offsets.get(1)?.as_u64()? as usize;
        let dtype = DType::from_safetensors_name(info.get("dtype")?.as_str()?)?;
        let numel: Option<usize> =
            info.get("shape")?.as_array()?.iter().try_fold(1usize, |acc, d| acc.checked_mul(d.as_u64()? as usize));
        entries.push((begin, end, name.clone(), numel.and_then(|n| dtype.byte_len(n)), dtype));
    }
    entries.sort();
    let mut expected_begin = 0;
    for (begin, end, name, size, dtype) in &entries {
        if end < begin {
            return Some(format!("tensor '{name}' ends (offset {end}) before it begins ({begin})"));
        }
        if *begin != expected_begin {
            let what = if *begin < expected_begin {
                "overlaps the previous tensor"
            } else {
                "leaves a hole after the previous tensor"
            };
            return Some(format!(
                "tensor '{name}' starts at data offset {begin} but the previous tensor ends at \
                 {expected_begin}: it {what}; the header lies about offsets"
            ));
        }
        match size {
            Some(size) if end - begin != *size => {
                return Some(format!(
                    "tensor '{name}' declares {} bytes of data but its shape and dtype {dtype} \
                     need {size}",
                    end - begin
                ))
            }
            None => {
                return Some(format!(
                    "tensor '{name}' has a shape whose byte size overflows or is not a whole number of bytes"
                ))
            }
            _ => {}
        }
        expected_begin = *end;
    }
    if expected_begin > data_len {
        Some(format!(
            "the header describes {expected_begin} bytes of tensor data but the file holds only \
             {data_len}; the file is truncated (an incomplete download or copy?)"
        ))
    } else if expected_begin < data_len {
        Some(format!(
            "the file has {} bytes after the last tensor's data; it is corrupt or was appended to",
            data_len - expected_begin
        ))
    } else {
        None
    }
}
