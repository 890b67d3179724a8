//! Hugging Face sharded checkpoints: a folder of `model-0000i-of-0000n.safetensors` files and a
//! `model.safetensors.index.json` whose `weight_map` names the file of every tensor.
//!
//! Reading: the index, or a folder holding one, opens as one state dict. Every shard's header
//! is read and validated when the model is opened (planning needs every shape); data is read
//! from the shard that holds it, on demand, like any file. The index and the shards must agree
//! exactly: a tensor the index places in a shard that lacks it, or a shard tensor the index does
//! not list, is an error naming both files, since either means a damaged or mixed download.
//!
//! Writing: `ShardedWriter` fills shards in plan order up to a size limit (as `transformers`'
//! `save_pretrained` does), writes them and the index into a temporary folder next to the
//! target, and renames that folder into place only when all are complete and flushed, so all
//! shards and the index appear together or not at all.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use indexmap::IndexMap;

use super::reader::{SafetensorsFile, TensorEntry};
use super::writer::{FileLayout, PlannedTensor, SafetensorsWriter};
use crate::error::{ErrorKind, MechaError, Result};

/// The name of the index `save_pretrained` writes and `from_pretrained` looks for first.
pub const INDEX_NAME: &str = "model.safetensors.index.json";
/// The single file of a checkpoint that fits in one shard (`transformers` writes no index then).
pub const SINGLE_NAME: &str = "model.safetensors";
/// Index files larger than this are refused (a real one lists keys: a few MiB at most).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// What a model path names.
pub enum Located {
    File(PathBuf),
    Index(PathBuf),
}

/// A `.safetensors.index.json` path, or a folder: its index (`model.safetensors.index.json`
/// first, else the only `*.safetensors.index.json`), else its only `.safetensors` file.
pub fn locate(path: &Path) -> Result<Located> {
    if !path.is_dir() {
        let is_index = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".index.json"));
        return Ok(if is_index { Located::Index(path.to_path_buf()) } else { Located::File(path.to_path_buf()) });
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| MechaError::safetensors(path, format!("cannot list the folder: {e}")))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect::<Vec<String>>();
    let mut indexes: Vec<&String> = entries.iter().filter(|n| n.ends_with(".safetensors.index.json")).collect();
    indexes.sort();
    if indexes.iter().any(|n| *n == INDEX_NAME) {
        return Ok(Located::Index(path.join(INDEX_NAME)));
    }
    match indexes.as_slice() {
        [one] => return Ok(Located::Index(path.join(one))),
        [] => {}
        several => {
            return Err(MechaError::safetensors(
                path,
                format!(
                    "the folder holds {} checkpoint indexes ({}); give the path of the one to read",
                    several.len(),
                    several.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ),
            ))
        }
    }
    let mut files: Vec<&String> = entries.iter().filter(|n| n.ends_with(".safetensors")).collect();
    files.sort();
    match files.as_slice() {
        [one] => Ok(Located::File(path.join(one))),
        [] => Err(MechaError::safetensors(
            path,
            "is a folder with no .safetensors file and no .safetensors.index.json; give the path of a \
             .safetensors file or of a sharded checkpoint's folder",
        )),
        several => Err(MechaError::safetensors(
            path,
            format!(
                "the folder holds {} .safetensors files ({}{}) but no .safetensors.index.json saying which \
                 tensor is in which; give the path of one file, or add the checkpoint's index",
                several.len(),
                several.iter().take(3).map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                if several.len() > 3 { ", …" } else { "" }
            ),
        )),
    }
}

/// The shard file names of an index's `weight_map`, checked to be plain relative paths inside
/// the index's folder (a hostile index must not make the reader open `/etc/…` or `../…`).
fn read_index(index: &Path) -> Result<(IndexMap<String, String>, BTreeMap<String, String>)> {
    let fail = |problem: String| MechaError::safetensors(index, problem);
    let meta = std::fs::metadata(index).map_err(|e| {
        fail(if e.kind() == std::io::ErrorKind::NotFound {
            "index file not found; check the path".into()
        } else {
            format!("cannot read the index: {e}")
        })
    })?;
    if !meta.is_file() {
        return Err(fail("is not a regular file; give the path of the checkpoint's .safetensors.index.json".into()));
    }
    if meta.len() > MAX_INDEX_BYTES {
        return Err(fail(format!("the index is {} bytes, over the {MAX_INDEX_BYTES}-byte limit", meta.len())));
    }
    let text = std::fs::read(index).map_err(|e| fail(format!("cannot read the index: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| fail(format!("the index is not valid JSON ({e})")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| fail("the index has no \"weight_map\" object (tensor name → shard file)".into()))?;
    let mut weight_map = IndexMap::with_capacity(map.len());
    for (key, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            fail(format!("the index's weight_map gives tensor '{key}' a shard that is not a file name")).with_key(key)
        })?;
        let plain = !shard.is_empty()
            && Path::new(shard).components().all(|c| matches!(c, Component::Normal(_)))
            && !shard.contains('\\');
        if !plain {
            return Err(fail(format!(
                "the index places tensor '{key}' in \"{shard}\", which is not a file name inside the index's folder"
            ))
            .with_key(key));
        }
        weight_map.insert(key.clone(), shard.to_string());
    }
    // Other index metadata (`total_size`, …) kept as text, as safetensors metadata is.
    let metadata = json
        .get("metadata")
        .and_then(|m| m.as_object())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect())
        .unwrap_or_default();
    Ok((weight_map, metadata))
}

/// Opens every shard an index names and checks that they hold exactly the tensors it lists.
/// `path` is what the user gave (the folder or the index); it names the model in reports.
pub fn open_sharded(path: &Path, index: &Path) -> Result<SafetensorsFile> {
    let (weight_map, index_metadata) = read_index(index)?;
    if weight_map.is_empty() {
        return Err(MechaError::safetensors(index, "the index's weight_map lists no tensors"));
    }
    let folder = index.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut names: Vec<&String> = weight_map.values().collect();
    names.sort();
    names.dedup();
    let mut shards = Vec::with_capacity(names.len());
    let mut tensors = IndexMap::with_capacity(weight_map.len());
    for (i, name) in names.iter().enumerate() {
        let shard_path = folder.join(name);
        let shard = SafetensorsFile::open_file(&shard_path).map_err(|e| {
            if shard_path.exists() {
                e
            } else {
                MechaError::safetensors(
                    &shard_path,
                    format!(
                        "the shard named by {} is missing (an incomplete download?)",
                        index.file_name().map_or_else(|| index.display().to_string(), |n| n.to_string_lossy().into())
                    ),
                )
            }
        })?;
        for (key, entry) in shard.tensors() {
            match weight_map.get(key) {
                Some(listed) if listed == *name => {}
                listed => {
                    let said = listed.map_or("does not list it".to_string(), |l| format!("places it in {l}"));
                    return Err(MechaError::safetensors(
                        &shard_path,
                        format!(
                            "holds tensor '{key}', but the index {} {said}; the index and the shards \
                             disagree (re-download the checkpoint or regenerate its index)",
                            index.display()
                        ),
                    )
                    .with_key(key));
                }
            }
            tensors.insert(key.clone(), TensorEntry { shard: i, ..entry.clone() });
        }
        shards.push(shard);
    }
    if let Some((key, shard)) = weight_map.iter().find(|(k, _)| !tensors.contains_key(*k)) {
        return Err(MechaError::safetensors(
            &folder.join(shard),
            format!("the index {} places tensor '{key}' in this shard, which does not hold it", index.display()),
        )
        .with_key(key));
    }
    // The first shard's metadata (where `mecha_recipe` is), then the index's own.
    let mut metadata = shards[0].metadata().clone();
    for (k, v) in index_metadata {
        metadata.entry(k).or_insert(v);
    }
    Ok(SafetensorsFile::from_shards(path, index, shards, tensors, metadata))
}

/// How tensors are split into shards: greedily in plan order, a new shard when the next tensor
/// would pass `max_bytes` (a tensor larger than that gets a shard of its own).
pub fn assign_shards(tensors: &[PlannedTensor], max_bytes: u64) -> Vec<usize> {
    let (mut shard, mut filled) = (0usize, 0u64);
    tensors
        .iter()
        .map(|t| {
            let size = t.byte_len() as u64;
            if filled > 0 && filled + size > max_bytes {
                shard += 1;
                filled = 0;
            }
            filled += size;
            shard
        })
        .collect()
}

/// `model-00001-of-00003.safetensors`, or `model.safetensors` for a checkpoint of one shard.
pub fn shard_name(i: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_NAME.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
    }
}

/// A shard's metadata: `metadata` and `format: pt` (which `transformers` requires).
fn with_format(metadata: &[(String, String)]) -> Vec<(String, String)> {
    let mut all = metadata.to_vec();
    if !all.iter().any(|(k, _)| k == "format") {
        all.push(("format".into(), "pt".into()));
    }
    all
}

/// Writes a sharded checkpoint (a folder) with the atomic discipline of `SafetensorsWriter`.
pub struct ShardedWriter {
    target: PathBuf,
    temp: PathBuf,
    shards: Vec<SafetensorsWriter>,
    /// The tensors of each shard (to write a header again).
    members: Vec<Vec<PlannedTensor>>,
    /// For each planned tensor: its shard and its index within the shard.
    route: Vec<(usize, usize)>,
    index: Option<Vec<u8>>,
    committed: bool,
}

impl ShardedWriter {
    /// Plans the shards of `tensors` (at most `max_bytes` each) and creates them, headers
    /// written and space reserved, in a temporary folder next to `target`. Every shard's
    /// `__metadata__` holds `metadata` and `format: pt` (which `transformers` requires).
    pub fn create(
        target: &Path,
        tensors: &[PlannedTensor],
        metadata: &[(String, String)],
        max_bytes: u64,
    ) -> Result<ShardedWriter> {
        let fail = |problem: String| {
            MechaError::new(ErrorKind::Output, format!("cannot write {}: {problem}", target.display()))
                .with_file(target)
        };
        let name = target.file_name().ok_or_else(|| fail("the output path has no folder name".into()))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(fail(format!("the folder {} does not exist; create it first", parent.display())));
        }
        replaceable(target).map_err(fail)?;
        super::writer::remove_stale_partials(&parent);
        let temp = parent.join(super::writer::partial_name(&name.to_string_lossy()));
        std::fs::create_dir(&temp).map_err(|e| fail(format!("cannot create a folder in {}: {e}", parent.display())))?;
        let mut writer = ShardedWriter {
            target: target.to_path_buf(),
            temp,
            shards: vec![],
            members: vec![],
            route: vec![],
            index: None,
            committed: false,
        };

        let assigned = assign_shards(tensors, max_bytes);
        let count = assigned.last().map_or(1, |&s| s + 1);
        let mut members: Vec<Vec<PlannedTensor>> = vec![vec![]; count];
        for (t, &s) in tensors.iter().zip(&assigned) {
            writer.route.push((s, members[s].len()));
            members[s].push(t.clone());
        }
        let shard_metadata = with_format(metadata);
        for (i, members) in members.iter().enumerate() {
            let layout = FileLayout::new(members, &shard_metadata);
            writer.shards.push(SafetensorsWriter::create(&writer.temp.join(shard_name(i, count)), layout)?);
        }
        writer.members = members;
        if count > 1 {
            let total: u64 = tensors.iter().map(|t| t.byte_len() as u64).sum();
            let mut weight_map: Vec<(&str, String)> =
                tensors.iter().zip(&assigned).map(|(t, &s)| (t.name.as_str(), shard_name(s, count))).collect();
            weight_map.sort();
            let map: serde_json::Map<String, serde_json::Value> =
                weight_map.into_iter().map(|(k, v)| (k.to_string(), v.into())).collect();
            let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map });
            writer.index = Some(serde_json::to_vec_pretty(&index).expect("plain JSON values serialize"));
        }
        Ok(writer)
    }

    /// Writes every shard's header again with other metadata of the same serialized length.
    pub fn rewrite_metadata(&mut self, metadata: &[(String, String)]) -> Result<()> {
        let metadata = with_format(metadata);
        for (shard, members) in self.shards.iter_mut().zip(&self.members) {
            shard.rewrite_metadata(members, &metadata)?;
        }
        Ok(())
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Writes bytes of planned tensor `index`, starting `offset` bytes into its data.
    pub fn write_at(&self, index: usize, offset: usize, bytes: &[u8]) -> Result<()> {
        let (shard, local) = self.route[index];
        self.shards[shard].write_at(local, offset, bytes)
    }

    /// Flushes every shard and the index, then renames the folder onto the target (a previous
    /// checkpoint written there is replaced whole; see `replaceable`).
    pub fn commit(mut self) -> Result<()> {
        for shard in std::mem::take(&mut self.shards) {
            shard.commit()?;
        }
        if let Some(index) = &self.index {
            let path = self.temp.join(INDEX_NAME);
            let io = |e| MechaError::io(format!("writing the index {}", path.display()), e);
            std::fs::write(&path, index).map_err(io)?;
            File::open(&path).and_then(|f| f.sync_all()).map_err(io)?;
        }
        let _ = File::open(&self.temp).and_then(|d| d.sync_all());
        let renamed = |e| MechaError::io(format!("renaming the finished checkpoint onto {}", self.target.display()), e);
        if self.target.exists() {
            // A previous checkpoint: set aside, replaced, then removed (the target is never partial).
            let aside = self.temp.with_extension("old");
            std::fs::rename(&self.target, &aside).map_err(renamed)?;
            if let Err(e) = std::fs::rename(&self.temp, &self.target) {
                let _ = std::fs::rename(&aside, &self.target);
                return Err(renamed(e));
            }
            let _ = std::fs::remove_dir_all(&aside);
        } else {
            std::fs::rename(&self.temp, &self.target).map_err(renamed)?;
        }
        self.committed = true;
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for ShardedWriter {
    fn drop(&mut self) {
        if !self.committed {
            self.shards.clear(); // their temporary files go first
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

/// Whether a sharded output may be written at `target`: a path that does not exist, an empty
/// folder, or a checkpoint this writer could have written (an index and the shards it names,
/// or a lone `model.safetensors`), which is replaced whole. Anything else is refused: replacing
/// a folder deletes what is in it.
fn replaceable(target: &Path) -> std::result::Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(target) else { return Ok(()) };
    if !meta.is_dir() {
        return Err("it exists and is not a folder; a sharded output is a folder (give a new folder's path)".into());
    }
    let names: Vec<String> = std::fs::read_dir(target)
        .map_err(|e| format!("cannot list it: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.is_empty() || names == [SINGLE_NAME] {
        return Ok(());
    }
    let refuse = || {
        Err(format!(
            "the folder exists and holds files other than a checkpoint's shards and index ({}); a sharded \
             output replaces the whole folder, so give a new or empty folder",
            names.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
        ))
    };
    let Ok((weight_map, _)) = read_index(&target.join(INDEX_NAME)) else { return refuse() };
    let shards: std::collections::HashSet<&str> = weight_map.values().map(String::as_str).collect();
    if names.iter().all(|n| n == INDEX_NAME || shards.contains(n.as_str())) {
        Ok(())
    } else {
        refuse()
    }
}

/// Refuses a sharded output folder that is, or holds, one of the merge's input files.
pub fn ensure_no_input_inside(target: &Path, inputs: &[PathBuf]) -> Result<()> {
    let Ok(target_canon) = std::fs::canonicalize(target) else { return Ok(()) };
    let clash: HashMap<PathBuf, &PathBuf> =
        inputs.iter().filter_map(|i| std::fs::canonicalize(i).ok().map(|c| (c, i))).collect();
    if let Some((_, input)) = clash.iter().find(|(c, _)| c.starts_with(&target_canon)) {
        return Err(MechaError::new(
            ErrorKind::Output,
            format!(
                "refusing to write the output to {}: the folder holds one of the merge's inputs ({}), which \
                 writing it would replace; choose another output folder",
                target.display(),
                input.display()
            ),
        )
        .with_file(target));
    }
    Ok(())
}
