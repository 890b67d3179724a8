//! Replaying a merge: the recipe an output records (`mecha_recipe`, with the seeds it chose and
//! the options that change its bytes) is merged again against the inputs found now, and every
//! tensor is compared with the output's instead of being written. The inputs' content hashes,
//! computed while reading, are compared with the ones the output recorded, which names an
//! input that changed even where the change does not reach the compared bytes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::dtype::DType;
use crate::error::{MechaError, Result};
use crate::exec::plan::{MergeDtype, Plan, PlanOptions};
use crate::exec::run::TensorSink;
use crate::exec::{engine_version, hashes, merge, MergeOptions, OutputTarget};
use crate::io::reader::{SafetensorsFile, TensorEntry};
use crate::recipe::spaces::RootSpace;

/// Writes nothing: compares each piece with the same bytes of an existing output.
pub(crate) struct CompareSink<'a> {
    against: &'a SafetensorsFile,
    /// Per planned key, the existing tensor it is compared with (`None`: it has none of that
    /// name, dtype and shape).
    entries: Vec<Option<&'a TensorEntry>>,
    differs: Vec<AtomicBool>,
    /// The first read of the existing file that failed.
    failed: Mutex<Option<MechaError>>,
    names: Vec<String>,
}

impl<'a> CompareSink<'a> {
    pub(crate) fn new(plan: &Plan, against: &'a SafetensorsFile) -> CompareSink<'a> {
        let entries: Vec<Option<&TensorEntry>> = plan
            .keys
            .iter()
            .map(|k| against.entry(&k.name).filter(|e| e.dtype == k.dtype && e.shape == k.shape))
            .collect();
        CompareSink {
            differs: entries.iter().map(|e| AtomicBool::new(e.is_none())).collect(),
            entries,
            against,
            failed: Mutex::new(None),
            names: plan.keys.iter().map(|k| k.name.clone()).collect(),
        }
    }

    pub(crate) fn finish(self) -> Comparison {
        let produced: std::collections::HashSet<&str> = self.names.iter().map(String::as_str).collect();
        Comparison {
            differing_keys: self
                .names
                .iter()
                .zip(&self.differs)
                .filter(|(_, d)| d.load(Ordering::Relaxed))
                .map(|(n, _)| n.clone())
                .collect(),
            missing_keys: self.against.tensors().keys().filter(|k| !produced.contains(k.as_str())).cloned().collect(),
            keys_compared: self.names.len(),
            read_error: self.failed.into_inner().expect("compare lock"),
        }
    }
}

impl TensorSink for CompareSink<'_> {
    fn write(&self, key: usize, offset: usize, bytes: &[u8]) -> crate::error::Result<()> {
        let Some(entry) = self.entries[key] else { return Ok(()) };
        if self.differs[key].load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut existing = vec![0u8; bytes.len()];
        match self.against.read(entry, offset, &mut existing) {
            Ok(()) if existing == bytes => {}
            Ok(()) => self.differs[key].store(true, Ordering::Relaxed),
            Err(e) => {
                self.differs[key].store(true, Ordering::Relaxed);
                self.failed.lock().expect("compare lock").get_or_insert(e);
            }
        }
        Ok(())
    }
}

/// What comparing a merge with an existing output found.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    /// Keys the merge produced whose bytes, dtype or shape differ from the output's (or that
    /// the output does not have).
    pub differing_keys: Vec<String>,
    /// Keys of the output the merge did not produce.
    pub missing_keys: Vec<String>,
    pub keys_compared: usize,
    pub read_error: Option<MechaError>,
}

#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// 0 = one per CPU.
    pub threads: usize,
    /// 0 = the default budget.
    pub memory_budget: u64,
}

/// One input, as recorded and as found.
#[derive(Clone, Debug)]
pub struct InputCheck {
    pub model: String,
    /// The file it resolves to now.
    pub path: Option<PathBuf>,
    pub recorded: Option<String>,
    pub found: Option<String>,
}

impl InputCheck {
    pub fn matches(&self) -> bool {
        self.recorded.is_some() && self.recorded == self.found
    }
}

#[derive(Clone, Debug)]
pub struct VerifyReport {
    /// Every tensor has the same bytes, and every recorded input hash matches.
    pub reproducible: bool,
    /// Why not, in a sentence per reason (empty when reproducible).
    pub problems: Vec<String>,
    pub inputs: Vec<InputCheck>,
    pub comparison: Comparison,
    pub recorded_engine: Option<String>,
    pub engine: String,
    pub recipe: String,
    pub seconds: f64,
}

/// Merges the recipe `path` records again and compares the result with it.
pub fn verify(path: &Path, options: &VerifyOptions) -> Result<VerifyReport> {
    let started = Instant::now();
    let merged = Arc::new(SafetensorsFile::open(path)?);
    let metadata = merged.metadata();
    let recipe_text = metadata.get("mecha_recipe").cloned().ok_or_else(|| {
        MechaError::safetensors(
            path,
            "records no recipe (no mecha_recipe metadata), so there is nothing to replay; \
             outputs merged with embedRecipe: 'none' or from in-memory models cannot be verified",
        )
    })?;
    let recorded_inputs = recorded_inputs(path, metadata.get("mecha_inputs"))?;
    let recipe = crate::recipe::parse::parse(&recipe_text).map_err(|e| {
        MechaError::recipe(format!("{}: its mecha_recipe does not parse: {}", path.display(), e.message))
    })?;
    let mut merge_options = MergeOptions {
        output: OutputTarget::Compare(merged.clone()),
        threads: options.threads,
        memory_budget: options.memory_budget,
        allow_empty: merged.tensors().is_empty(),
        ..MergeOptions::default()
    };
    merge_options.plan = PlanOptions { root_space: RootSpace::Preferred, ..PlanOptions::default() };
    apply_recorded_options(path, &merged, metadata.get("mecha_options"), &mut merge_options)?;
    let never = AtomicBool::new(false);
    let result = merge(recipe, &merge_options, &never, None)?;
    let comparison = result.comparison.unwrap_or_default();
    if let Some(e) = &comparison.read_error {
        return Err(e.clone());
    }

    let found = result.report.input_hashes;
    let mut inputs: Vec<InputCheck> = found
        .iter()
        .map(|h| InputCheck {
            model: h.model.clone(),
            path: Some(h.path.clone()),
            recorded: None,
            found: Some(h.hash.clone()),
        })
        .collect();
    for (model, hash) in &recorded_inputs {
        match inputs.iter_mut().find(|i| &i.model == model && i.recorded.is_none()) {
            Some(i) => i.recorded = Some(hash.clone()),
            None => {
                inputs.push(InputCheck { model: model.clone(), path: None, recorded: Some(hash.clone()), found: None })
            }
        }
    }
    let mut problems = vec![];
    if recorded_inputs.is_empty() {
        problems.push(format!(
            "{} records no input hashes (written before they were recorded, or by sd-mecha), so the inputs cannot be checked",
            path.display()
        ));
    }
    for i in inputs.iter().filter(|i| !i.matches() && !recorded_inputs.is_empty()) {
        problems.push(match (&i.recorded, &i.found) {
            (Some(r), Some(f)) => format!(
                "input {} ({}) has changed: its content hash is {f}, the merge recorded {r}",
                i.model,
                i.path.as_deref().unwrap_or(Path::new("?")).display()
            ),
            (None, _) => format!("input {} is read now but was not recorded by the merge", i.model),
            (_, None) => format!("input {} was recorded by the merge but the recipe does not read it now", i.model),
        });
    }
    if !comparison.differing_keys.is_empty() {
        let listed: Vec<&str> = comparison.differing_keys.iter().take(5).map(String::as_str).collect();
        problems.push(format!(
            "{} of {} tensors differ from the merge's output: {}{}",
            comparison.differing_keys.len(),
            comparison.keys_compared,
            listed.join(", "),
            if comparison.differing_keys.len() > listed.len() { ", …" } else { "" }
        ));
    }
    if !comparison.missing_keys.is_empty() {
        let listed: Vec<&str> = comparison.missing_keys.iter().take(5).map(String::as_str).collect();
        problems.push(format!(
            "{} tensors of the output are not produced by the recipe now: {}{}",
            comparison.missing_keys.len(),
            listed.join(", "),
            if comparison.missing_keys.len() > listed.len() { ", …" } else { "" }
        ));
    }
    Ok(VerifyReport {
        reproducible: problems.is_empty(),
        problems,
        inputs,
        comparison,
        recorded_engine: metadata.get("mecha_engine").cloned(),
        engine: engine_version(),
        recipe: recipe_text,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `mecha_inputs`: (model, hash) in input order.
fn recorded_inputs(path: &Path, text: Option<&String>) -> Result<Vec<(String, String)>> {
    let Some(text) = text else { return Ok(vec![]) };
    let bad = || MechaError::safetensors(path, "its mecha_inputs metadata is not a list of {model, xxh3-128} records");
    let json: serde_json::Value = serde_json::from_str(text).map_err(|_| bad())?;
    json.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|item| {
            let model = item.get("model").and_then(|v| v.as_str()).ok_or_else(bad)?;
            let hash = item.get(hashes::ALGORITHM).and_then(|v| v.as_str()).ok_or_else(bad)?;
            Ok((model.to_string(), hash.to_string()))
        })
        .collect()
}

/// Merges with the options the output recorded; without them (older outputs, sd-mecha's), in
/// float32 to the dtype most of the output's float tensors have.
fn apply_recorded_options(
    path: &Path,
    merged: &SafetensorsFile,
    text: Option<&String>,
    options: &mut MergeOptions,
) -> Result<()> {
    let Some(text) = text else {
        let mut counts: Vec<(DType, usize)> = vec![];
        for e in merged.tensors().values().filter(|e| e.dtype.is_float()) {
            match counts.iter_mut().find(|(d, _)| *d == e.dtype) {
                Some((_, n)) => *n += 1,
                None => counts.push((e.dtype, 1)),
            }
        }
        if let Some((dtype, _)) = counts.iter().max_by_key(|(_, n)| *n) {
            options.plan.output_dtype = *dtype;
        }
        return Ok(());
    };
    let bad = |what: &str| MechaError::safetensors(path, format!("its mecha_options metadata has no valid {what}"));
    let json: serde_json::Value = serde_json::from_str(text).map_err(|_| bad("JSON"))?;
    let field = |name: &str| json.get(name).and_then(|v| v.as_str()).ok_or_else(|| bad(name));
    options.plan.merge_dtype = MergeDtype::parse(field("merge_dtype")?).map_err(|_| bad("merge_dtype"))?;
    options.plan.output_dtype =
        DType::parse_user(field("output_dtype")?).filter(|d| d.is_numeric()).ok_or_else(|| bad("output_dtype"))?;
    options.omit_non_finite_inputs =
        json.get("omit_non_finite_inputs").and_then(|v| v.as_bool()).ok_or_else(|| bad("omit_non_finite_inputs"))?;
    Ok(())
}
