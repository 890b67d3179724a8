//! `randperm` and `rebasin` for sdxl-sgm (sd-mecha's `rebasin/`). The hidden units of a network
//! can be put in another order without changing what it computes, provided every weight that
//! writes or reads them moves the same way. `randperm` draws such an order; `rebasin` (weight
//! matching, Ainsworth et al., "Git Re-Basin") picks the one that lines a model up with a
//! reference, so that a merge then averages units that do the same job.
//!
//! The permutable dimensions, read from the sdxl-sgm config's keys and shapes:
//! - attention (CLIP-L, CLIP-G, UNet attn1/attn2): 64-wide heads move as wholes (q, k, v rows
//!   and out_proj columns together), and inside each head the q/k rows and the v rows/out
//!   columns each reorder freely;
//! - MLP hidden units: fc1/c_fc rows and bias with fc2/c_proj columns; the UNet GEGLU
//!   `ff.net.0.proj` moves its value and gate halves with one order, with `ff.net.2` columns;
//! - the time and label embedding MLPs (`time_embed`, `label_emb`).
//!
//! The keys that permutations share form one key group, computed in one run; every other key
//! is a byte copy. The attention blocks are also what `balance_attention` transforms, so they
//! are enumerated here once ([`attention_blocks`]), with the grouping both methods use
//! ([`KeyGroups`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::Tensor;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use super::decl::*;
use super::seam::{
    Arg, Clause, ComputeSpec, Decision, KeyMapCall, KeyRelation, KeyRng, Meta, Method, Output, PlanCall, RunCall,
};
use super::{DefaultValue, MethodSpec, ReturnSpec, SpaceSpec, ValueType};
use crate::configs::{self, ModelConfig};
use crate::error::{ErrorKind, MechaError, Result};

pub(crate) const SDXL: &str = "sdxl-sgm";
/// The head width of every sdxl attention except the VAE's single head.
const HEAD_WIDTH: usize = 64;

// ---------------------------------------------------------------------------------------------
// The attention blocks of sdxl-sgm

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    ClipL,
    ClipG,
    Unet,
    Vae,
}

/// The q, k or v rows of an attention block: `channels` rows of `weight` from `offset` (CLIP-G
/// stacks q, k and v in one weight), and the same entries of `bias`.
#[derive(Clone, Debug)]
pub(crate) struct Projection {
    pub weight: String,
    pub bias: Option<String>,
    pub offset: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct AttentionBlock {
    pub part: Part,
    /// The keys' common prefix, for messages.
    pub name: String,
    pub heads: usize,
    pub head_width: usize,
    pub q: Projection,
    pub k: Projection,
    pub v: Projection,
    /// The output projection: its columns (axis 1) read the v channels. Its bias reads none.
    pub out: String,
    /// Every key above, each once, in the config's order.
    pub keys: Vec<String>,
}

/// The attention blocks of sdxl-sgm (CLIP-L, CLIP-G, UNet, VAE), in config order.
pub(crate) fn attention_blocks(config: &ModelConfig) -> Vec<AttentionBlock> {
    let position: HashMap<&str, usize> = config.keys().enumerate().map(|(i, (k, _))| (k, i)).collect();
    config.keys().filter_map(|(key, _)| attention_block(config, &position, key)).collect()
}

fn attention_block(config: &ModelConfig, position: &HashMap<&str, usize>, key: &str) -> Option<AttentionBlock> {
    let shape = |k: &str| config.get(k).and_then(|m| m.shape.clone());
    let separate = |prefix: &str, names: [&str; 4], biased: bool| {
        let projection = |name: &str| Projection {
            weight: format!("{prefix}{name}.weight"),
            bias: biased.then(|| format!("{prefix}{name}.bias")),
            offset: 0,
        };
        let [q, k, v, out] = names.map(projection);
        (q, k, v, out.weight)
    };
    let (part, prefix, (q, k, v, out)) = if let Some(prefix) = key
        .strip_suffix("q_proj.weight")
        .filter(|p| p.starts_with("conditioner.embedders.0.") && p.ends_with(".self_attn."))
    {
        (Part::ClipL, prefix, separate(prefix, ["q_proj", "k_proj", "v_proj", "out_proj"], true))
    } else if let Some(prefix) = key
        .strip_suffix("in_proj_weight")
        .filter(|p| p.starts_with("conditioner.embedders.1.") && p.ends_with(".attn."))
    {
        let channels = shape(key)?.first()? / 3;
        let stacked = |i: usize| Projection {
            weight: key.to_string(),
            bias: Some(format!("{prefix}in_proj_bias")),
            offset: i * channels,
        };
        (Part::ClipG, prefix, (stacked(0), stacked(1), stacked(2), format!("{prefix}out_proj.weight")))
    } else if let Some(prefix) = key
        .strip_suffix("to_q.weight")
        .filter(|p| p.starts_with("model.diffusion_model.") && (p.ends_with(".attn1.") || p.ends_with(".attn2.")))
    {
        (Part::Unet, prefix, separate(prefix, ["to_q", "to_k", "to_v", "to_out.0"], false))
    } else if let Some(prefix) =
        key.strip_suffix("q.weight").filter(|p| p.starts_with("first_stage_model.") && p.ends_with(".mid.attn_1."))
    {
        (Part::Vae, prefix, separate(prefix, ["q", "k", "v", "proj_out"], true))
    } else {
        return None;
    };
    // Channels are the rows of one projection; the VAE's attention is a single head.
    let channels = if part == Part::ClipG { shape(key)?[0] / 3 } else { shape(key)?[0] };
    let head_width = if part == Part::Vae { channels } else { HEAD_WIDTH };
    if channels == 0 || channels % head_width != 0 {
        return None;
    }
    // Every key exists with room for its rows; out reads exactly the channels.
    for p in [&q, &k, &v] {
        if shape(&p.weight)?.first()? < &(p.offset + channels) {
            return None;
        }
        if let Some(b) = &p.bias {
            if shape(b)?.first()? < &(p.offset + channels) {
                return None;
            }
        }
    }
    let out_shape = shape(&out)?;
    if out_shape.len() < 2 || out_shape[1] != channels || out_shape[2..].iter().any(|&d| d != 1) {
        return None;
    }
    let mut keys: Vec<String> = [&q, &k, &v]
        .into_iter()
        .flat_map(|p| std::iter::once(p.weight.clone()).chain(p.bias.clone()))
        .chain([out.clone()])
        .collect();
    keys.sort_by_key(|k| position.get(k.as_str()).copied().unwrap_or(usize::MAX));
    keys.dedup();
    Some(AttentionBlock {
        part,
        name: prefix.trim_end_matches('.').to_string(),
        heads: channels / head_width,
        head_width,
        q,
        k,
        v,
        out,
        keys,
    })
}

// ---------------------------------------------------------------------------------------------
// Key groups: outputs computed together from all of their keys

/// Marks a key group's first clause (all keys present) with the group.
#[derive(Copy, Clone)]
struct Complete(usize);
/// Marks the fallback clause, used when an input lacks some of the group's keys.
#[derive(Copy, Clone)]
struct Incomplete(usize);

/// Key groups whose outputs must be computed together from all of their keys (a permutation
/// closure, an attention block): their key maps, and the checks made before anything is read.
/// Shared by randperm, rebasin and balance_attention.
pub(crate) struct KeyGroups {
    /// Per group: what it is, for messages.
    pub names: Vec<String>,
    pub keys: Vec<Vec<String>>,
    /// Per group and key: the shape the config gives it.
    pub shapes: Vec<Vec<Vec<usize>>>,
    group_of: HashMap<String, usize>,
}

impl KeyGroups {
    pub fn new(config: &ModelConfig, groups: Vec<(String, Vec<String>)>) -> KeyGroups {
        let mut g = KeyGroups { names: vec![], keys: vec![], shapes: vec![], group_of: HashMap::new() };
        for (name, keys) in groups {
            let index = g.names.len();
            let shape = |k: &String| config.get(k).and_then(|m| m.shape.clone()).expect("group keys have shapes");
            g.shapes.push(keys.iter().map(shape).collect());
            for k in &keys {
                let previous = g.group_of.insert(k.clone(), index);
                debug_assert!(previous.is_none(), "{k} is in two groups");
            }
            g.names.push(name);
            g.keys.push(keys);
        }
        g
    }

    /// A grouped key needs every key of its group from each of the first `tensor_params`
    /// parameters (other parameters, hyper-parameters, are read once, at the group's first key);
    /// when some are missing, the fallback clause lets `plan` skip it with the reason. Any
    /// other key is parameter 0's, copied.
    pub fn relation(&self, call: &KeyMapCall, tensor_params: usize) -> KeyRelation {
        let params = call.method.params.len();
        let mut only_a = vec![None; params];
        only_a[0] = Some(vec![call.key.to_string()]);
        let Some(&g) = self.group_of.get(call.key) else {
            return KeyRelation::single(call.key, only_a);
        };
        let keys = &self.keys[g];
        let all =
            (0..params).map(|p| Some(if p < tensor_params { keys.clone() } else { vec![keys[0].clone()] })).collect();
        KeyRelation {
            outputs: keys.clone(),
            clauses: vec![
                Clause { inputs: all, meta: Meta::new(Complete(g)) },
                Clause { inputs: only_a, meta: Meta::new(Incomplete(g)) },
            ],
        }
    }

    /// Forwards ungrouped keys, skips incomplete groups, and checks a complete group's shapes:
    /// `Ok(group)` when it is to be computed, else the decision.
    pub fn check(&self, call: &PlanCall, tensor_params: usize) -> Result<std::result::Result<usize, Decision>> {
        if let Some(&Incomplete(g)) = call.meta.get() {
            return Ok(Err(Decision::Skip(format!(
                "{}: {} needs all of its keys ({}) in every input, and an input lacks some; they are left out \
                 rather than changed in part",
                call.method.id,
                self.names[g],
                self.keys[g].join(", ")
            ))));
        }
        let Some(&Complete(g)) = call.meta.get() else {
            return Ok(Err(Decision::Forward { param: 0, index: 0 }));
        };
        for p in 0..tensor_params {
            let param = &call.method.params[p].name;
            for ((arg, key), want) in call.args[p].iter().zip(&self.keys[g]).zip(&self.shapes[g]) {
                match &arg.shape {
                    None => {
                        return Err(call.fail(format!(
                            "\"{param}\" must be a model (tensors), but {} gives a single value for \"{key}\"",
                            arg.origin
                        )))
                    }
                    Some(shape) if shape != want => {
                        return Err(MechaError::new(
                            ErrorKind::Shape,
                            format!(
                                "{}: \"{key}\" from {} has shape {shape:?}, but {SDXL} gives it {want:?}; the \
                                 permutations and heads of {} are read from that shape. Pass a checkpoint of the \
                                 standard SDXL architecture",
                                call.method.id, arg.origin, self.names[g]
                            ),
                        )
                        .with_key(key))
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(Ok(g))
    }

    /// The computed decision for `call.key` of group `g`.
    pub fn compute(&self, call: &PlanCall, g: usize, extra_bytes: u64) -> Decision {
        let index = self.keys[g].iter().position(|k| k == call.key).expect("a group's outputs are its keys");
        Decision::Compute(ComputeSpec {
            shape: Some(self.shapes[g][index].clone()),
            dtype: call.args[0][index].dtype,
            kernel: None,
            extra_bytes,
        })
    }

    /// The group a run computes.
    pub fn group_of_run(call: &RunCall) -> usize {
        call.meta.get::<Complete>().expect("runs are planned from a complete group").0
    }
}

/// A tensor's values as f32 (row-major).
pub(crate) fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

// ---------------------------------------------------------------------------------------------
// Permutations

/// `width` consecutive indices of one axis of a group key, from `offset` (the width is the
/// permutation's).
#[derive(Clone, Debug)]
struct Window {
    key: usize,
    axis: usize,
    offset: usize,
}

#[derive(Copy, Clone, Debug)]
enum Structure {
    /// Any order of `width` units.
    Units(usize),
    /// `heads` blocks of `head_width` channels: the blocks move as wholes (one head order for
    /// every channel set) and each channel set also reorders freely inside each block.
    Heads { heads: usize, head_width: usize },
}

impl Structure {
    fn width(self) -> usize {
        match self {
            Structure::Units(w) => w,
            Structure::Heads { heads, head_width } => heads * head_width,
        }
    }
}

/// One permutation: per channel set, the windows it moves. Units have one set; attention has
/// two (q/k rows, and v rows with out columns), which share the head order only.
#[derive(Clone, Debug)]
struct Permutation {
    structure: Structure,
    sets: Vec<Vec<Window>>,
}

/// A permutation whose windows name their keys, before they are grouped.
struct Named {
    name: String,
    structure: Structure,
    sets: Vec<Vec<(String, usize, usize)>>,
}

fn attention_permutation(block: &AttentionBlock) -> Named {
    let rows = |p: &Projection| {
        std::iter::once((p.weight.clone(), 0, p.offset)).chain(p.bias.clone().map(|b| (b, 0, p.offset)))
    };
    let qk = rows(&block.q).chain(rows(&block.k)).collect();
    let vo = rows(&block.v).chain([(block.out.clone(), 1, 0)]).collect();
    Named {
        name: format!("the attention heads of {}", block.name),
        structure: Structure::Heads { heads: block.heads, head_width: block.head_width },
        sets: vec![qk, vo],
    }
}

/// The hidden units between two linear layers: `input` rows (`halves` stacked blocks of them,
/// the GEGLU's value and gate) with its bias, and `output` columns.
fn hidden_units(config: &ModelConfig, key: &str) -> Option<Named> {
    const LAYERS: [(&str, &str, &str, usize); 5] = [
        ("conditioner.embedders.0.", ".mlp.fc1.weight", ".mlp.fc2.weight", 1),
        ("conditioner.embedders.1.", ".mlp.c_fc.weight", ".mlp.c_proj.weight", 1),
        ("model.diffusion_model.", ".ff.net.0.proj.weight", ".ff.net.2.weight", 2),
        ("model.diffusion_model.", "time_embed.0.weight", "time_embed.2.weight", 1),
        ("model.diffusion_model.", "label_emb.0.0.weight", "label_emb.0.2.weight", 1),
    ];
    let shape = |k: &str| config.get(k).and_then(|m| m.shape.clone());
    LAYERS.iter().find_map(|&(component, input, output, halves)| {
        let stem = key.strip_prefix(component)?.strip_suffix(input)?;
        let output = format!("{component}{stem}{output}");
        let bias = format!("{}.bias", key.strip_suffix(".weight")?);
        let rows = *shape(key)?.first()?;
        let width = rows / halves;
        let out_shape = shape(&output)?;
        if width == 0 || rows % halves != 0 || shape(&bias)? != [rows] || out_shape.len() != 2 || out_shape[1] != width
        {
            return None;
        }
        let mut windows: Vec<(String, usize, usize)> =
            (0..halves).flat_map(|h| [(key.to_string(), 0, h * width), (bias.clone(), 0, h * width)]).collect();
        windows.push((output, 1, 0));
        let name = key.strip_suffix(".weight").unwrap_or(key).trim_end_matches(".0.proj").trim_end_matches(".0");
        Some(Named {
            name: format!("the hidden units after {name}"),
            structure: Structure::Units(width),
            sets: vec![windows],
        })
    })
}

/// The permutation closures of a config: permutations that share a key are one group.
struct Groups {
    keys: KeyGroups,
    perms: Vec<Vec<Permutation>>,
}

impl Groups {
    fn build(config: &ModelConfig) -> Groups {
        let mut named: Vec<Named> =
            attention_blocks(config).iter().filter(|b| b.part != Part::Vae).map(attention_permutation).collect();
        named.extend(config.keys().filter_map(|(k, _)| hidden_units(config, k)));
        // Union of permutations sharing a key (in sdxl-sgm each stands alone, but a shared key
        // must be computed in one run).
        let mut root: Vec<usize> = (0..named.len()).collect();
        fn find(root: &mut [usize], mut i: usize) -> usize {
            while root[i] != i {
                root[i] = root[root[i]];
                i = root[i];
            }
            i
        }
        let mut owner: HashMap<&str, usize> = HashMap::new();
        for (p, perm) in named.iter().enumerate() {
            for (key, _, _) in perm.sets.iter().flatten() {
                if let Some(&q) = owner.get(key.as_str()) {
                    let (a, b) = (find(&mut root, p), find(&mut root, q));
                    root[a.max(b)] = a.min(b);
                } else {
                    owner.insert(key, p);
                }
            }
        }
        let position: HashMap<&str, usize> = config.keys().enumerate().map(|(i, (k, _))| (k, i)).collect();
        let mut members: Vec<(usize, Vec<usize>)> = vec![];
        for p in 0..named.len() {
            let r = find(&mut root, p);
            match members.iter_mut().find(|(m, _)| *m == r) {
                Some((_, ps)) => ps.push(p),
                None => members.push((r, vec![p])),
            }
        }
        let mut groups: Vec<(String, Vec<String>, Vec<Permutation>)> = members
            .into_iter()
            .map(|(_, ps)| {
                let mut keys: Vec<String> =
                    ps.iter().flat_map(|&p| named[p].sets.iter().flatten().map(|(k, _, _)| k.clone())).collect();
                keys.sort_by_key(|k| position[k.as_str()]);
                keys.dedup();
                let index = |k: &str| keys.iter().position(|x| x == k).expect("a window's key is in its group");
                let perms = ps
                    .iter()
                    .map(|&p| Permutation {
                        structure: named[p].structure,
                        sets: named[p]
                            .sets
                            .iter()
                            .map(|set| {
                                set.iter()
                                    .map(|(k, axis, offset)| Window { key: index(k), axis: *axis, offset: *offset })
                                    .collect()
                            })
                            .collect(),
                    })
                    .collect();
                let name = ps.iter().map(|&p| named[p].name.as_str()).collect::<Vec<_>>().join(" and ");
                (name, keys, perms)
            })
            .collect();
        groups.sort_by_key(|(_, keys, _)| position[keys[0].as_str()]);
        let perms = groups.iter().map(|(_, _, p)| p.clone()).collect();
        let keys = KeyGroups::new(config, groups.into_iter().map(|(n, k, _)| (n, k)).collect());
        Groups { keys, perms }
    }

    /// Working memory of a run beyond its arguments and results.
    fn extra_bytes(&self, g: usize, aligning: bool) -> u64 {
        let elements: Vec<u64> = self.keys.shapes[g].iter().map(|s| s.iter().product::<usize>() as u64).collect();
        let largest = elements.iter().copied().max().unwrap_or(0);
        if !aligning {
            return 4 * largest; // one intermediate per permuted axis
        }
        // f32 copies of both models' keys and of two windows, plus per permutation the
        // similarity matrices (f32) and the solver's f64 copy of one.
        let widest = self.perms[g]
            .iter()
            .map(|p| {
                let w = p.structure.width() as u64;
                4 * w * w * p.sets.len() as u64 + 8 * w * w
            })
            .max()
            .unwrap_or(0);
        4 * (2 * elements.iter().sum::<u64>() + 2 * largest) + widest
    }
}

fn sdxl_groups() -> &'static Groups {
    static GROUPS: OnceLock<Groups> = OnceLock::new();
    GROUPS.get_or_init(|| Groups::build(&configs::resolve(SDXL).expect("builtin config")))
}

/// Per permutation and channel set, the order of its channels: `orders[p][s][i]` is the index
/// (within the window) whose entries move to `i`.
type Orders = Vec<Vec<Vec<u32>>>;

/// A uniform draw in `0..n` (Lemire's multiply-shift; the bias is below 2⁻⁵⁰ for these sizes).
fn below(rng: &mut KeyRng, n: usize) -> usize {
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

/// A uniformly random order of `0..n` (Fisher–Yates).
fn shuffled(n: usize, rng: &mut KeyRng) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        order.swap(i, below(rng, i + 1));
    }
    order
}

fn random_orders(perms: &[Permutation], rng: &mut KeyRng) -> Orders {
    perms
        .iter()
        .map(|p| match p.structure {
            Structure::Units(width) => vec![shuffled(width, rng); p.sets.len()],
            Structure::Heads { heads, head_width } => {
                let head_order = shuffled(heads, rng);
                (0..p.sets.len())
                    .map(|_| {
                        let mut order = Vec::with_capacity(heads * head_width);
                        for &h in &head_order {
                            let base = h * head_width as u32;
                            order.extend(shuffled(head_width, rng).into_iter().map(|d| base + d));
                        }
                        order
                    })
                    .collect()
            }
        })
        .collect()
}

fn identity_orders(perms: &[Permutation]) -> Orders {
    perms.iter().map(|p| vec![(0..p.structure.width() as u32).collect(); p.sets.len()]).collect()
}

/// For group key `key`: each axis that a window moves (except `skip_axis`), with the source
/// index of every position of that axis, in axis order.
fn index_maps(
    perms: &[Permutation],
    orders: &Orders,
    key: usize,
    shape: &[usize],
    skip_axis: Option<usize>,
) -> Vec<(usize, Vec<u32>)> {
    let mut maps: Vec<(usize, Vec<u32>)> = vec![];
    for (perm, order) in perms.iter().zip(orders) {
        for (windows, set_order) in perm.sets.iter().zip(order) {
            for w in windows.iter().filter(|w| w.key == key && Some(w.axis) != skip_axis) {
                let i = match maps.iter().position(|(axis, _)| *axis == w.axis) {
                    Some(i) => i,
                    None => {
                        maps.push((w.axis, (0..shape[w.axis] as u32).collect()));
                        maps.len() - 1
                    }
                };
                for (to, &from) in set_order.iter().enumerate() {
                    maps[i].1[w.offset + to] = w.offset as u32 + from;
                }
            }
        }
    }
    maps.sort_by_key(|(axis, _)| *axis);
    maps
}

/// The group's tensors with every window in its order.
fn apply(perms: &[Permutation], shapes: &[Vec<usize>], orders: &Orders, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(tensors.len());
    for (key, t) in tensors.iter().enumerate() {
        let mut t = t.clone();
        for (axis, map) in index_maps(perms, orders, key, &shapes[key], None) {
            let len = map.len();
            t = t.index_select(&Tensor::from_vec(map, len, t.device())?, axis)?;
        }
        out.push(t);
    }
    Ok(out)
}

/// Row-major values with the index maps applied (`out[.., i, ..] = data[.., map[i], ..]`).
fn permuted(data: &[f32], shape: &[usize], maps: &[(usize, Vec<u32>)]) -> Vec<f32> {
    let mut current = data.to_vec();
    for (axis, map) in maps {
        let inner: usize = shape[axis + 1..].iter().product();
        let dim = shape[*axis];
        let mut next = Vec::with_capacity(current.len());
        for block in current.chunks(dim * inner) {
            for &from in map {
                let start = from as usize * inner;
                next.extend_from_slice(&block[start..start + inner]);
            }
        }
        current = next;
    }
    current
}

/// The `width` indices of `axis` from `offset`, each as one row of all the other entries
/// (row-major `width × rest`).
fn window_rows<'a>(data: &'a [f32], shape: &[usize], axis: usize, offset: usize, width: usize) -> Cow<'a, [f32]> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    if outer == 1 {
        return Cow::Borrowed(&data[offset * inner..(offset + width) * inner]);
    }
    let dim = shape[axis];
    let mut rows = Vec::with_capacity(width * outer * inner);
    for i in offset..offset + width {
        for o in 0..outer {
            let start = (o * dim + i) * inner;
            rows.extend_from_slice(&data[start..start + inner]);
        }
    }
    Cow::Owned(rows)
}

/// The assignment maximising Σⱼ value(j, order[j]).
///
/// Solver: the `lsap` crate, a port of scipy's `linear_sum_assignment` (Crouse's shortest
/// augmenting path variant of Jonker–Volgenant), the solver sd-mecha calls, so ties resolve the
/// same way. Measured on 2 cores at n = 5120 (SDXL's widest MLP): 0.23 s for a permuted copy,
/// 3.4 s for unrelated weights; `lapjv` took 0.39 s / 4.9 s and `pathfinding`'s Kuhn–Munkres
/// (O(n³) Hungarian on integers) is far slower at that size.
fn assign_max(n: usize, value: impl Fn(usize, usize) -> f64) -> std::result::Result<Vec<u32>, String> {
    let mut cost = Vec::with_capacity(n * n);
    for j in 0..n {
        for i in 0..n {
            let v = value(j, i);
            if !v.is_finite() {
                return Err("the weights hold NaN or infinity".into());
            }
            cost.push(-v);
        }
    }
    let (rows, cols) = lsap::solve(n, n, &cost, false).map_err(|e| format!("the linear assignment failed ({e})"))?;
    let mut order = vec![0u32; n];
    for (r, c) in rows.into_iter().zip(cols) {
        order[r] = c as u32;
    }
    Ok(order)
}

/// Weight matching by coordinate descent: each permutation in turn takes the order that best
/// lines `ours` up with `theirs` given the others, until none changes or after `iters` rounds.
fn align(
    perms: &[Permutation],
    shapes: &[Vec<usize>],
    ours: &[Vec<f32>],
    theirs: &[Vec<f32>],
    iters: usize,
) -> std::result::Result<Orders, String> {
    let mut orders = identity_orders(perms);
    for _ in 0..iters.max(1) {
        let mut changed = false;
        for p in 0..perms.len() {
            let best = best_order(perms, shapes, &orders, p, ours, theirs)?;
            if best != orders[p] {
                orders[p] = best;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    Ok(orders)
}

/// The order of permutation `p` that maximises Σ⟨ours permuted, theirs⟩ over its windows, the
/// other permutations kept as they are.
fn best_order(
    perms: &[Permutation],
    shapes: &[Vec<usize>],
    orders: &Orders,
    p: usize,
    ours: &[Vec<f32>],
    theirs: &[Vec<f32>],
) -> std::result::Result<Vec<Vec<u32>>, String> {
    let perm = &perms[p];
    let width = perm.structure.width();
    // Per set, similarity[(i, j)] = ⟨our channel i, their channel j⟩ summed over the windows
    // (stored so that a fixed j reads contiguously).
    let mut similarity = Vec::with_capacity(perm.sets.len());
    for windows in &perm.sets {
        let mut s = Mat::<f32>::zeros(width, width);
        for w in windows {
            let shape = &shapes[w.key];
            // our key with the windows on its other axes in their current order
            let maps = index_maps(perms, orders, w.key, shape, Some(w.axis));
            let ours_key: Cow<[f32]> = if maps.is_empty() {
                Cow::Borrowed(&ours[w.key])
            } else {
                Cow::Owned(permuted(&ours[w.key], shape, &maps))
            };
            let a = window_rows(&ours_key, shape, w.axis, w.offset, width);
            let b = window_rows(&theirs[w.key], shape, w.axis, w.offset, width);
            let rest = a.len() / width;
            let (a, b) = (MatRef::from_row_major_slice(&a, width, rest), MatRef::from_row_major_slice(&b, width, rest));
            matmul(s.as_mut(), Accum::Add, a, b.transpose(), 1.0f32, Par::Seq);
        }
        similarity.push(s);
    }
    match perm.structure {
        Structure::Units(_) => {
            let order = assign_max(width, |j, i| similarity[0][(i, j)] as f64)?;
            Ok(vec![order; perm.sets.len()])
        }
        Structure::Heads { heads, head_width: hw } => {
            // The best order inside every (their head h, our head g) pair, per set; the head
            // order then maximises the pairs' summed values. Together this is the exact optimum
            // over head orders and within-head orders.
            let mut within = vec![vec![Vec::new(); heads * heads]; perm.sets.len()];
            let mut value = vec![0.0f64; heads * heads];
            for (s, sim) in similarity.iter().enumerate() {
                for h in 0..heads {
                    for g in 0..heads {
                        let block = |j: usize, i: usize| sim[(g * hw + i, h * hw + j)] as f64;
                        let order = assign_max(hw, block)?;
                        value[h * heads + g] +=
                            order.iter().enumerate().map(|(j, &i)| block(j, i as usize)).sum::<f64>();
                        within[s][h * heads + g] = order;
                    }
                }
            }
            let head_order = assign_max(heads, |h, g| value[h * heads + g])?;
            Ok(within
                .iter()
                .map(|pairs| {
                    let mut order = Vec::with_capacity(width);
                    for (h, &g) in head_order.iter().enumerate() {
                        let base = g * hw as u32;
                        order.extend(pairs[h * heads + g as usize].iter().map(|&d| base + d));
                    }
                    order
                })
                .collect())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The methods

#[derive(Copy, Clone, PartialEq, Eq)]
enum Kind {
    /// randperm(a, seed)
    Random,
    /// rebasin(a, ref, iters)
    Rebasin,
}

struct Permute {
    kind: Kind,
}

impl Permute {
    fn tensor_params(&self) -> usize {
        match self.kind {
            Kind::Random => 1,
            Kind::Rebasin => 2,
        }
    }
}

impl Method for Permute {
    fn key_map(&self, call: &KeyMapCall) -> Option<KeyRelation> {
        Some(sdxl_groups().keys.relation(call, self.tensor_params()))
    }

    fn plan(&self, call: &PlanCall) -> Result<Decision> {
        let groups = sdxl_groups();
        Ok(match groups.keys.check(call, self.tensor_params())? {
            Err(decision) => decision,
            Ok(g) => groups.keys.compute(call, g, groups.extra_bytes(g, self.kind == Kind::Rebasin)),
        })
    }

    fn run(&self, call: RunCall) -> Result<Vec<Output>> {
        let groups = sdxl_groups();
        let g = KeyGroups::group_of_run(&call);
        let (perms, shapes) = (&groups.perms[g], &groups.keys.shapes[g]);
        let a = call.tensors(0)?;
        let orders = match self.kind {
            Kind::Random => random_orders(perms, &mut call.seed_rng(1)?),
            Kind::Rebasin => {
                let iters = call.int(2)?.clamp(1, u32::MAX as i64) as usize;
                let ours = a.iter().map(f32_values).collect::<Result<Vec<_>>>()?;
                let theirs = call.tensors(1)?.iter().map(f32_values).collect::<Result<Vec<_>>>()?;
                align(perms, shapes, &ours, &theirs, iters)
                    .map_err(|e| call.fail(format!("cannot align {}: {e}", groups.keys.names[g])))?
            }
        };
        Ok(apply(perms, shapes, &orders, &a)?.into_iter().map(Arg::Tensor).collect())
    }
}

pub fn methods() -> Vec<MethodSpec> {
    let model = |name: &str| input(name, ValueType::Tensor, SpaceSpec::Symbol).state_dict();
    let result = || returns(ValueType::Tensor, SpaceSpec::Symbol);
    let seed = || hyper("seed", ValueType::Int, DefaultValue::Null);
    let iters = || hyper("iters", ValueType::Int, DefaultValue::Int(10));
    let sdxl_result = || ReturnSpec { config: Some(SDXL.into()), ..result() };
    vec![
        MethodSpec::interface(
            "randperm",
            "Reorders the model's hidden units (attention heads, MLP units) at random, without changing what it \
             computes (dispatched by config).",
            vec![model("a"), seed()],
            result(),
        ),
        MethodSpec::new(
            "randperm_'sdxl-sgm'",
            "randperm for sdxl-sgm: CLIP-L, CLIP-G and UNet attention heads and MLP units, time and label embeddings.",
            vec![model("a").config(SDXL), seed()],
            sdxl_result(),
            Permute { kind: Kind::Random },
        )
        .implements("randperm"),
        MethodSpec::interface(
            "rebasin",
            "Reorders a's hidden units to line up with ref's (weight matching), without changing what a computes \
             (dispatched by config).",
            vec![model("a"), model("ref"), iters()],
            result(),
        ),
        MethodSpec::new(
            "rebasin_'sdxl-sgm'",
            "rebasin for sdxl-sgm: CLIP-L, CLIP-G and UNet attention heads and MLP units, time and label embeddings.",
            vec![model("a").config(SDXL), model("ref").config(SDXL), iters()],
            sdxl_result(),
            Permute { kind: Kind::Rebasin },
        )
        .implements("rebasin"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> std::sync::Arc<ModelConfig> {
        configs::resolve(SDXL).unwrap()
    }

    #[test]
    fn sdxl_has_the_expected_blocks_and_groups() {
        let blocks = attention_blocks(&config());
        let count = |part| blocks.iter().filter(|b| b.part == part).count();
        assert_eq!([count(Part::ClipL), count(Part::ClipG), count(Part::Unet), count(Part::Vae)], [12, 32, 140, 2]);
        let heads = |part| blocks.iter().find(|b| b.part == part).map(|b| (b.heads, b.head_width)).unwrap();
        assert_eq!(heads(Part::ClipL), (12, 64));
        assert_eq!(heads(Part::ClipG), (20, 64));
        assert_eq!(heads(Part::Unet), (10, 64), "640 channels: ten heads of 64");
        assert_eq!(heads(Part::Vae), (1, 512));
        let groups = sdxl_groups();
        // attention (CLIP-L 12, CLIP-G 32, UNet 140) + MLPs (12 + 32 + 70) + time + label
        assert_eq!(groups.keys.names.len(), 12 + 32 + 140 + 12 + 32 + 70 + 2);
        assert!(groups.perms.iter().all(|p| p.len() == 1), "no two sdxl permutations share a key");
    }

    /// Every window lies inside its key, and windows of one key and axis never overlap.
    #[test]
    fn windows_are_in_bounds_and_disjoint() {
        let groups = sdxl_groups();
        for (g, perms) in groups.perms.iter().enumerate() {
            let mut taken: Vec<(usize, usize, usize, usize)> = vec![];
            for p in perms {
                let width = p.structure.width();
                for w in p.sets.iter().flatten() {
                    let shape = &groups.keys.shapes[g][w.key];
                    assert!(w.offset + width <= shape[w.axis], "{} {:?}", groups.keys.names[g], w);
                    for &(k, axis, start, end) in &taken {
                        assert!(k != w.key || axis != w.axis || end <= w.offset || w.offset + width <= start);
                    }
                    taken.push((w.key, w.axis, w.offset, w.offset + width));
                }
            }
            let touched: std::collections::HashSet<usize> = taken.iter().map(|t| t.0).collect();
            assert_eq!(touched.len(), groups.keys.keys[g].len(), "every group key is moved");
        }
        let ff = groups.keys.names.iter().position(|n| n.contains("ff.net")).unwrap();
        assert_eq!(groups.perms[ff][0].sets[0].len(), 5, "GEGLU: two halves of weight and bias, and ff.net.2");
    }

    fn chain() -> (Vec<Permutation>, Vec<Vec<usize>>) {
        // x → w0 (6×4) → w1 (5×6) → w2 (3×5): units between w0/w1 and between w1/w2.
        let window = |key, axis| Window { key, axis, offset: 0 };
        let perms = vec![
            Permutation { structure: Structure::Units(6), sets: vec![vec![window(0, 0), window(1, 1)]] },
            Permutation { structure: Structure::Units(5), sets: vec![vec![window(1, 0), window(2, 1)]] },
        ];
        (perms, vec![vec![6, 4], vec![5, 6], vec![3, 5]])
    }

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = KeyRng::new(seed, "test");
        (0..n).map(|_| rng.next_normal() as f32).collect()
    }

    /// Two permutations sharing a key: coordinate descent recovers both from a permuted copy.
    #[test]
    fn interacting_permutations_are_recovered_by_coordinate_descent() {
        let (perms, shapes) = chain();
        let reference: Vec<Vec<f32>> =
            shapes.iter().enumerate().map(|(i, s)| values(i as u64, s.iter().product())).collect();
        let orders = random_orders(&perms, &mut KeyRng::new(3, "chain"));
        let permuted_keys: Vec<Vec<f32>> = (0..3)
            .map(|k| permuted(&reference[k], &shapes[k], &index_maps(&perms, &orders, k, &shapes[k], None)))
            .collect();
        assert_ne!(permuted_keys, reference);
        let found = align(&perms, &shapes, &permuted_keys, &reference, 10).unwrap();
        let back: Vec<Vec<f32>> = (0..3)
            .map(|k| permuted(&permuted_keys[k], &shapes[k], &index_maps(&perms, &found, k, &shapes[k], None)))
            .collect();
        assert_eq!(back, reference);
    }

    #[test]
    fn head_orders_move_whole_heads() {
        let perm = Permutation { structure: Structure::Heads { heads: 3, head_width: 4 }, sets: vec![vec![], vec![]] };
        let orders = random_orders(&[perm], &mut KeyRng::new(1, "k"));
        let (qk, vo) = (&orders[0][0], &orders[0][1]);
        for h in 0..3 {
            let source = |o: &Vec<u32>| o[h * 4..h * 4 + 4].iter().map(|&i| i / 4).collect::<Vec<_>>();
            assert!(source(qk).iter().all(|&s| s == source(qk)[0]), "{qk:?}");
            assert_eq!(source(qk), source(vo), "q/k and v/out share the head order");
        }
    }
}
