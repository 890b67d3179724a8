#!/usr/bin/env python3
"""Golden key mappings from the real sd-mecha 1.1.8 for the key-format conversions.

Run from the repository root, outside CI:

    bench/.venv/bin/python scripts/golden/conversions.py

(`bench/setup-reference.sh` installs sd-mecha 1.1.8 + torch into bench/.venv.)

Writes one file per conversion direction into __test__/fixtures/golden/conversions/:

    <from>__<to>.json.gz   gzip (mtime=0) JSON:
        {"from", "to", "source", "mapping", "dropped_inputs", "intent_fixes", "notes",
         "unresolved", "unmapped_outputs", "source_shapes"}

(see scripts/golden/README.md for the fields).

Where the conversion works in sd-mecha 1.1.8, the mapping is read off a real merge: a source
model holds every key of the source config as a tiny tensor whose values encode the key's index
(value = index + k/64 for element k), `sd_mecha.merge(sd_mecha.convert(model, TARGET), output=None,
...)` converts it in memory, and each output tensor is decoded back to the input keys and the
operation (copy, concat, chunk, transpose or reshape) that produced it; it must agree with the
method's key map. Where the conversion's merge method crashes in 1.1.8 (checked: it still does),
the mapping comes from the method's own `map_keys` (which calls sd-mecha's key functions
convert_unet_key, convert_clip_l_key, convert_vae_key, ...), with the intent fixes listed in the
file; a merge with only the method's `__call__` fixed must give the same mapping without those
fixes. In both cases the script also records every key name sd-mecha's key functions compute
that does not exist in its config (sd-mecha silently skips those).

The output is deterministic: a run in a fresh process writes the same bytes.
"""

import argparse
import contextlib
import functools
import gzip
import inspect
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from types import MappingProxyType

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars

import torch
from safetensors.torch import save_file

import sd_mecha
from sd_mecha.extensions import model_configs
from sd_mecha.extensions.builtin.model_configs import convert_huggingface_sd_vae_to_original as vae_keys
from sd_mecha.keys_map import Clause, KeyMapBuilder

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "__test__" / "fixtures" / "golden" / "conversions"
EXPECTED_SD_MECHA_VERSION = "1.1.8"

resolve = sd_mecha.extensions.merge_methods.resolve

# (from, to, how): "merge" = derived from a real sd-mecha merge; "keys" = the merge method is
# broken in 1.1.8, the mapping comes from its map_keys / key functions (+ intent fixes)
DIRECTIONS = (
    ("sdxl-kohya", "sdxl-sgm", "merge"),
    ("sdxl-sgm", "sdxl-kohya", "merge"),
    ("sdxl-kohya_but_diffusers", "sdxl-sgm", "merge"),
    ("sdxl-sgm", "sdxl-kohya_but_diffusers", "merge"),
    ("sdxl-diffusers_unet_only", "sdxl-sgm", "keys"),
    ("sdxl-sgm", "sdxl-diffusers_unet_only", "keys"),
    ("sd1-kohya", "sd1-ldm", "keys"),
    ("sd1-ldm", "sd1-kohya", "keys"),
)
SOURCE_MERGE = "sd-mecha 1.1.8 merge"
SOURCE_KEYS = "sd-mecha 1.1.8 key functions + intent"

FRACTION = 64  # element k of floating key i holds i + k/64 (exact in float32 for every config here)
# integer keys hold INT_OFFSET + 64 i + k: sd-mecha casts them to output_dtype (float32 here; this
# library keeps their dtype, docs/differences.md), and the offset tells them apart after the cast
INT_OFFSET = 1 << 20


def method_id(src, dst):
    return f"convert_'{src}'_to_'{dst}'"


@functools.lru_cache(maxsize=None)
def config_keys(identifier):
    """key -> KeyMetadata, in the config's order."""
    return OrderedDict(model_configs.resolve(identifier).keys())


def tiny_shape(key, meta):
    """A small shape with the config shape's number of dimensions: every dimension clamped to
    1..2 (so 1x1 conv kernels keep their trailing 1s and 2-D keys show a transpose), except the
    rows of a fused CLIP-G q/k/v projection, which must split into three."""
    shape = [max(1, min(int(d), 2)) for d in meta.shape]
    if key.endswith((".in_proj_weight", ".in_proj_bias")):
        shape[0] = 6
    return shape


def encode(index, shape, dtype):
    n = math.prod(shape)
    assert n < FRACTION
    if dtype.is_floating_point:
        values = torch.tensor([index + k / FRACTION for k in range(n)], dtype=torch.float32)
    else:
        values = torch.tensor([INT_OFFSET + index * FRACTION + k for k in range(n)], dtype=dtype)
    return values.reshape(shape)


def decode(tensor):
    """Each element -> (key index, element index)."""
    out = []
    for v in tensor.reshape(-1).double().tolist():
        if v >= INT_OFFSET:
            assert v == int(v), v
            i, k = divmod(int(v) - INT_OFFSET, FRACTION)
        else:
            i = math.floor(v)
            k = (v - i) * FRACTION
            assert k == int(k), v
        out.append((i, int(k)))
    return out


# ---------------------------------------------------------------------------------------------
# what sd-mecha's map_keys tries: a builder that records every relation instead of validating
# ---------------------------------------------------------------------------------------------

class _RecordingKeys:
    """Stands in for `b.keys[...]`: selects the key names for every parameter, unvalidated."""

    def __init__(self, builder):
        self._b = builder

    def __call__(self):
        yield from self._b._shared_input_keys()

    def __getitem__(self, sel):
        keys = (sel,) if isinstance(sel, str) else tuple(sel)
        return Clause(MappingProxyType({p: keys for p in self._b.params}))


class RecordingBuilder(KeyMapBuilder):
    def __init__(self, input_configs, output_config):
        super().__init__(input_configs, output_config)
        self.keys = _RecordingKeys(self)
        self.attempts = []  # (output keys, input keys, meta)

    def __setitem__(self, out_keys, rhs):
        outs = (out_keys,) if isinstance(out_keys, str) else tuple(out_keys)
        ((_, ins),) = rhs.by_param.items()
        self.attempts.append((outs, tuple(ins), rhs.meta))


def attempted_relations(src, dst):
    """Every relation the conversion's map_keys tries (through sd-mecha's key functions), and
    sd-mecha's real key map (the relations it keeps)."""
    method = resolve(method_id(src, dst))
    src_cfg, dst_cfg = model_configs.resolve(src), model_configs.resolve(dst)
    (param,) = [p for p in inspect.signature(method.__wrapped__.__call__).parameters if p not in ("self", "kwargs")]
    builder = RecordingBuilder({param: src_cfg}, dst_cfg)
    method.__wrapped__.map_keys(builder)
    key_map = method.build_key_map([src_cfg], {}, dst_cfg)
    kept = []
    for relation in key_map:
        (clause,) = relation.clauses
        (ins,) = clause.by_param.values()
        kept.append((tuple(relation.outputs), tuple(ins), clause.meta))
    return builder.attempts, kept


# ---------------------------------------------------------------------------------------------
# mapping from a real merge
# ---------------------------------------------------------------------------------------------

def classify(out_key, tensor, src_names, src_shapes):
    """(input keys, op entry, vstack_of_1d) for one output tensor of the index-encoded model."""
    elems = decode(tensor)
    ids = []
    for i, _ in elems:
        if not ids or ids[-1] != i:
            ids.append(i)
    assert len(ids) == len(set(ids)), f"{out_key}: interleaved inputs {ids}"
    inputs = [src_names[i] for i in ids]
    shape = list(tensor.shape)
    if len(ids) > 1:
        # concat: each input whole, in order
        pos = 0
        for i in ids:
            n = math.prod(src_shapes[src_names[i]])
            assert elems[pos:pos + n] == [(i, k) for k in range(n)], f"{out_key}: not a concatenation"
            pos += n
        assert pos == len(elems)
        in_shapes = [src_shapes[k] for k in inputs]
        assert all(s == in_shapes[0] for s in in_shapes), out_key
        flat = [sum(s[0] for s in in_shapes)] + in_shapes[0][1:]
        vstack_of_1d = len(in_shapes[0]) == 1 and shape == [len(ids), in_shapes[0][0]]
        assert shape == flat or vstack_of_1d, f"{out_key}: concat shape {shape}"
        return inputs, OrderedDict(inputs=inputs, op="concat"), vstack_of_1d
    (i,) = ids
    in_shape = src_shapes[src_names[i]]
    n = math.prod(in_shape)
    ks = [k for _, k in elems]
    if ks == list(range(n)):
        op = "copy" if shape == in_shape else "reshape"
        return inputs, OrderedDict(inputs=inputs, op=op), False
    if len(in_shape) == 2 and shape == in_shape[::-1]:
        rows, cols = in_shape
        if ks == [r * cols + c for c in range(cols) for r in range(rows)]:
            return inputs, OrderedDict(inputs=inputs, op="transpose"), False
    # a block of whole rows
    start = ks[0]
    assert ks == list(range(start, start + len(ks))), f"{out_key}: unknown op"
    assert shape[1:] == in_shape[1:] and in_shape[0] % shape[0] == 0, f"{out_key}: unknown op"
    parts = in_shape[0] // shape[0]
    assert start % len(ks) == 0
    return inputs, OrderedDict(inputs=inputs, op="chunk", index=start // len(ks), parts=parts), False


def mapping_from_merge(src, dst, directory):
    src_keys = config_keys(src)
    src_names = list(src_keys)
    src_shapes = OrderedDict((k, tiny_shape(k, m)) for k, m in src_keys.items())
    path = os.path.join(directory, f"{src}.safetensors")
    save_file(OrderedDict((k, encode(i, src_shapes[k], m.dtype)) for i, (k, m) in enumerate(src_keys.items())), path)
    source = sd_mecha.model(path)
    with sd_mecha.open_graph(source) as graph:
        inferred = graph.finalize_root().model_config.identifier
    assert inferred == src, f"{src}: the index-encoded model is inferred as {inferred}"
    result = sd_mecha.merge(
        sd_mecha.convert(source, dst),
        output=None,
        merge_dtype=torch.float32,
        output_dtype=torch.float32,
        threads=0,
    )
    result.pop("__metadata__", None)
    dst_order = {k: i for i, k in enumerate(config_keys(dst))}
    mapping, vstacked = OrderedDict(), []
    for out_key in sorted(result, key=dst_order.__getitem__):
        tensor = result[out_key]
        assert tensor.dtype == torch.float32, out_key  # integer keys too: sd-mecha casts them
        _, entry, vstack_of_1d = classify(out_key, tensor, src_names, src_shapes)
        mapping[out_key] = entry
        if vstack_of_1d:
            vstacked.append(out_key)
    return mapping, vstacked


# ---------------------------------------------------------------------------------------------
# mapping from the key functions (merge method broken in 1.1.8)
# ---------------------------------------------------------------------------------------------

SD1_VAE_MID_NORM = ("mid.attn_1.norm.", "mid_block.attentions.0.group_norm.")


@contextlib.contextmanager
def fixed_call(src, dst):
    """The broken method with its __call__ replaced by the evident fix (read the input key from
    `key_relation.inputs`, then apply the relation's reshape flag with sd-mecha's own
    reshape_weight_for_sd / reshape_weight_for_hf), to check the key-function mapping against a
    real merge. The map_keys, and so the relations, stay sd-mecha's."""
    method = resolve(method_id(src, dst))
    cls = method.__wrapped__
    (param,) = [p for p in inspect.signature(cls.__call__).parameters if p not in ("self", "kwargs")]
    post = {"sd1-ldm": vae_keys.reshape_weight_for_sd, "sd1-kohya": vae_keys.reshape_weight_for_hf}.get(dst)

    def call(self, state_dict, **kwargs):
        relation = kwargs["key_relation"]
        (key,) = relation.inputs[param]
        res = state_dict[key]
        if post is not None and relation.meta:
            res = post(res)
        return res

    broken = cls.__dict__["__call__"]
    cls.__call__ = call
    try:
        yield
    finally:
        cls.__call__ = broken


def sd1_norm_fix(src, attempts):
    """Intent fix 3: convert_vae_key applies its attention part map (`norm.` -> `group_norm.`)
    only to keys that already contain "attentions", which the mid-attention ones do only after
    the `mid.attn_1.` -> `mid_block.attentions.0.` rename, so the four mid-attention norm keys
    come out as `...mid_block.attentions.0.norm.*`, a name sd1-kohya does not have. Returns the
    fixed relations for those attempts."""
    ldm_part, hf_part = SD1_VAE_MID_NORM
    unfixed = "mid_block.attentions.0.norm."
    fixed = []
    for outs, ins, meta in attempts:
        (out,), (inp,) = outs, ins
        ldm_key, kohya_key = (out, inp) if src == "sd1-kohya" else (inp, out)
        if ldm_key.startswith("first_stage_model.") and ldm_part in ldm_key:
            assert unfixed in kohya_key, kohya_key
            kohya_key = kohya_key.replace(unfixed, hf_part)
            fixed.append(((ldm_key,), (kohya_key,), meta) if src == "sd1-kohya" else ((kohya_key,), (ldm_key,), meta))
    return fixed


def op_of(src, dst, outs, ins, meta):
    """The op a kept relation stands for, from its shape (n -> 1, 1 -> n), its meta flag and the
    configs' shapes. SD1's flag (needs_reshape) is also set for the 1-D mid-attention biases, which
    reshape_weight_for_sd / reshape_weight_for_hf leave as they are: those are copies."""
    if len(ins) > 1:
        assert len(outs) == 1 and not meta
        return "concat"
    if len(outs) > 1:
        assert not meta
        return "chunk"
    if not meta:
        return "copy"
    if not src.startswith("sd1-"):
        return "transpose"
    (out,), (inp,) = outs, ins
    in_shape, out_shape = list(config_keys(src)[inp].shape), list(config_keys(dst)[out].shape)
    if in_shape == out_shape:
        assert len(in_shape) == 1, inp
        return "copy"
    assert [d for d in in_shape if d != 1] == [d for d in out_shape if d != 1], (inp, in_shape, out_shape)
    return "reshape"


def entries_of(src, dst, relations):
    out = OrderedDict()
    for outs, ins, meta in relations:
        op = op_of(src, dst, outs, ins, meta)
        for index, key in enumerate(outs):
            entry = OrderedDict(inputs=list(ins), op=op)
            if op == "chunk":
                entry.update(index=index, parts=len(outs))
            assert key not in out, key
            out[key] = entry
    return out


# ---------------------------------------------------------------------------------------------

def direction_data(src, dst, how, directory):
    src_keys, dst_keys = config_keys(src), config_keys(dst)
    attempts, kept = attempted_relations(src, dst)

    def absent(outs, ins):
        return [k for k in ins if k not in src_keys] + [k for k in outs if k not in dst_keys]

    unresolved = [(outs, ins, absent(outs, ins)) for outs, ins, _ in attempts if absent(outs, ins)]
    resolved = [r for r in attempts if not absent(r[0], r[1])]
    # sd-mecha's key map keeps exactly the attempts whose names all exist
    assert sorted(resolved, key=repr) == sorted(kept, key=repr), f"{src} -> {dst}: recorded relations differ from the key map"

    from_keys = entries_of(src, dst, kept)
    intent_fixes, notes = [], []
    if how == "merge":
        mapping, vstacked = mapping_from_merge(src, dst, directory)
        # the merge agrees with the key map, except where the intent differs
        assert list(mapping) == [k for k in dst_keys if k in from_keys], f"{src} -> {dst}: output keys"
        for key, entry in mapping.items():
            assert entry == from_keys[key], (key, entry, from_keys[key])
        if vstacked:
            intent_fixes += vstacked
            notes.append(
                "sd-mecha 1.1.8 stacks the three 1-D q/k/v biases with torch.vstack ([3, n]); "
                "the intent, recorded as op concat, is a flat concatenation along dim 0 ([3n])"
            )
        source = SOURCE_MERGE
    else:
        relations = list(kept)
        if src.startswith("sd1-"):
            fixes = sd1_norm_fix(src, attempts)
            assert not any(absent(outs, ins) for outs, ins, _ in fixes), fixes
            assert len(fixes) == 4, fixes
            relations += fixes
            intent_fixes += [f[0][0] for f in fixes]
            notes.append(
                "the four VAE mid-attention norm keys (ldm mid.attn_1.norm.* <-> kohya "
                "mid_block.attentions.0.group_norm.*) are mapped as intended: convert_vae_key "
                "leaves them as mid_block.attentions.0.norm.*, which sd1-kohya does not have"
            )
        mapping_unordered = entries_of(src, dst, relations)
        mapping = OrderedDict((k, mapping_unordered[k]) for k in dst_keys if k in mapping_unordered)
        assert len(mapping) == len(mapping_unordered)
        # a real merge with only __call__ fixed gives the same mapping, without the intent fixes
        with fixed_call(src, dst):
            merged, vstacked = mapping_from_merge(src, dst, directory)
        assert not vstacked
        assert merged == OrderedDict((k, e) for k, e in mapping.items() if k not in intent_fixes), f"{src} -> {dst}"
        source = SOURCE_KEYS
        notes.append(f"{method_id(src, dst)} crashes in sd-mecha 1.1.8 ({BROKEN_ERRORS[(src, dst)]}); "
                     "the mapping is the method's own map_keys (sd-mecha's key functions) plus the fixes listed; "
                     "a merge with only __call__ fixed gives the same mapping without those fixes")

    used = {k for e in mapping.values() for k in e["inputs"]}
    dropped = [k for k in src_keys if k not in used]
    unmapped = [k for k in dst_keys if k not in mapping]
    unresolved_json = [OrderedDict(outputs=list(outs), inputs=list(ins), absent=miss) for outs, ins, miss in unresolved]
    return OrderedDict(
        [
            ("from", src),
            ("to", dst),
            ("source", source),
            ("mapping", mapping),
            ("dropped_inputs", dropped),
            ("intent_fixes", sorted(intent_fixes)),
            ("notes", notes),
            ("unresolved", unresolved_json),
            ("unmapped_outputs", unmapped),
            ("source_shapes", OrderedDict((k, list(m.shape)) for k, m in src_keys.items())),
        ]
    )


# the error each broken direction raises, checked by check_broken()
BROKEN_ERRORS = {}


def check_broken(directory):
    """Merge each "keys" direction for real and record the error it raises (it must raise)."""
    for src, dst, how in DIRECTIONS:
        if how != "keys":
            continue
        src_keys = config_keys(src)
        path = os.path.join(directory, f"broken-{src}.safetensors")
        save_file(OrderedDict((k, encode(i, tiny_shape(k, m), m.dtype)) for i, (k, m) in enumerate(src_keys.items())), path)
        try:
            sd_mecha.merge(sd_mecha.convert(sd_mecha.model(path), dst), output=None, merge_dtype=torch.float32,
                           output_dtype=torch.float32, threads=0)
        except Exception as e:
            BROKEN_ERRORS[(src, dst)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            raise AssertionError(f"{src} -> {dst} no longer crashes: derive it from a merge")


def dump(data):
    text = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args()

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    try:
        from importlib.metadata import version as dist_version
        version = dist_version("sd-mecha")
    except Exception:
        version = getattr(sd_mecha, "__version__", None)
    if version != EXPECTED_SD_MECHA_VERSION:
        print(f"warning: sd-mecha {version} found, the golden data is meant for {EXPECTED_SD_MECHA_VERSION}", file=sys.stderr)

    started = time.monotonic()
    directory = os.path.realpath(tempfile.mkdtemp(prefix="sd-mecha-conversions-"))
    try:
        check_broken(directory)
        results = [direction_data(src, dst, how, directory) for src, dst, how in DIRECTIONS]
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    for data in results:
        (args.out / f"{data['from']}__{data['to']}.json.gz").write_bytes(dump(data))
        print(
            f"{data['from']} -> {data['to']}: {len(data['mapping'])} outputs, "
            f"{len(data['dropped_inputs'])} dropped inputs, {len(data['intent_fixes'])} intent fixes, "
            f"{len(data['unresolved'])} unresolved names, {len(data['unmapped_outputs'])} unmapped outputs"
        )
    for (src, dst), error in BROKEN_ERRORS.items():
        print(f"{src} -> {dst} crashes in sd-mecha: {error}")
    print(f"{len(results)} files in {time.monotonic() - started:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
