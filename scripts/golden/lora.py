#!/usr/bin/env python3
"""Generate golden results from the real sd-mecha 1.1.8 for LoRA / LyCORIS bake: a LoRA converted
to a delta of its base model and added to it.

Run from the repository root, outside CI:

    bench/.venv/bin/python scripts/golden/lora.py        # about 3 min on 2 cores; --out DIR, -v

Writes into __test__/fixtures/golden/lora/ (see scripts/golden/README.md, "Golden results for
LoRA / LyCORIS bake"):

* inputs/<name>.safetensors      small LoRA / LyCORIS files (rank 4 factors, real kohya key names,
                                 factor shapes that fit the real base shapes)
* outputs/<case id>.safetensors  the merged result, every tensor cut to its first `rows` rows along
                                 dim 0 (or to the row blocks the case's `row_ranges` lists)
* cases.json                     the cases

Base models are not stored. Every case lists the keys of its base file with their shapes and an
offset, and the value of such a tensor is, over its flat index i (computed in float64, stored as
float32):

    value[i] = (((i + offset) * 7919) % 1009) / 1009 - 0.5

The recipe of every case is the one sd-mecha 1.1.8 supports for a bake (its `add_difference`
wrapper crashes on a merge node, see the README):

    resolve("add_difference")(base, sd_mecha.convert(lora, base), alpha=ALPHA) | base

merged with `sd_mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=torch.float32,
threads=0, output=None, **options)`.

Every result is also computed by hand here with NumPy in float64 (LoRA, LoCon with Tucker, LoKr
in all its forms, LoHa with and without Tucker) and sd-mecha's result must agree with it within
the case's tolerance, as must sd-mecha's own float64 merge. Where sd-mecha 1.1.8 is broken (LoHa,
LoKr with a Tucker core on a conv) the expected output is the hand computation; those cases say
`"intent": true`, and `"sd_mecha"` records what sd-mecha does instead (its error or its result).

The output is deterministic: a rerun in a fresh process writes the same bytes.
"""

import argparse
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

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from generate import run_code  # noqa: E402  evaluates a case, returns its last expression
from methods import EXPECTED_SD_MECHA_VERSION, REPO_ROOT, error_text, first_line, worst_excess  # noqa: E402

import sd_mecha  # noqa: E402
from sd_mecha.extensions import model_configs  # noqa: E402

OUT_DIR = REPO_ROOT / "__test__" / "fixtures" / "golden" / "lora"
resolve = sd_mecha.extensions.merge_methods.resolve

# |x - y| <= max(RTOL * |y|, ATOL); the LoRA math runs in float32
RTOL = 1e-5
ATOL = 1e-6
ROWS = 8  # outputs keep the first ROWS rows of every tensor unless the case's row_ranges says otherwise
SEED = 20250301


# ---------------------------------------------------------------------------------------------
# keys (real names; shapes are read from sd-mecha's configs)
# ---------------------------------------------------------------------------------------------

# sdxl-sgm: the layout of an SDXL checkpoint as users have it
TE1_Q = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
TIME = "model.diffusion_model.time_embed.0.weight"
CONV = "model.diffusion_model.input_blocks.0.0.weight"
CONV_BIAS = "model.diffusion_model.input_blocks.0.0.bias"
ATTN = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
IN_PROJ_BIAS = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"
# a small key only sdxl-sgm has, in every SDXL base file: the file then infers as sdxl-sgm, and the
# key checks that untouched keys pass through
ANCHOR = "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"

# sd1-kohya (sd-mecha's SD1 kohya <-> ldm conversion is broken, so SD1 bases are in this layout)
SD1_TE_Q = "te.text_model.encoder.layers.0.self_attn.q_proj.weight"
SD1_CONV = "unet.conv_in.weight"
SD1_ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
SD1_ANCHOR = "te.text_model.final_layer_norm.weight"

# LoRA stems without their prefix ("lora_" kohya, "lycoris_" lycoris), and the kohya-layout key
# they belong to (SDXL LoRAs name the UNet with diffusers names: sdxl-kohya_but_diffusers)
S_TE1_Q = "te1_text_model_encoder_layers_0_self_attn_q_proj"
S_TIME = "unet_time_embedding_linear_1"
S_CONV = "unet_conv_in"
S_ATTN = "unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
S_TE2 = {p: f"te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in "qkv"}
S_SD1_TE_Q = "te_text_model_encoder_layers_0_self_attn_q_proj"
S_SD1_ATTN = "unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
S_UNMATCHED = "unet_not_a_layer"

KOHYA_KEY = {
    S_TE1_Q: ("sdxl-kohya_but_diffusers", "te1.text_model.encoder.layers.0.self_attn.q_proj.weight"),
    S_TIME: ("sdxl-kohya_but_diffusers", "unet.time_embedding.linear_1.weight"),
    S_CONV: ("sdxl-kohya_but_diffusers", "unet.conv_in.weight"),
    S_ATTN: ("sdxl-kohya_but_diffusers", "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"),
    **{s: ("sdxl-kohya_but_diffusers", f"te2.text_model.encoder.layers.0.self_attn.{p}_proj.weight") for p, s in S_TE2.items()},
    S_SD1_TE_Q: ("sd1-kohya", SD1_TE_Q),
    S_SD1_ATTN: ("sd1-kohya", SD1_ATTN),
}

# base key -> the LoRA stems whose deltas make its delta (three for CLIP-G's stacked q/k/v)
TARGETS = {
    "sdxl-sgm": OrderedDict([
        (TE1_Q, [S_TE1_Q]),
        (TIME, [S_TIME]),
        (CONV, [S_CONV]),
        (ATTN, [S_ATTN]),
        (IN_PROJ, [S_TE2["q"], S_TE2["k"], S_TE2["v"]]),
    ]),
    "sd1-kohya": OrderedDict([
        (SD1_TE_Q, [S_SD1_TE_Q]),
        (SD1_CONV, [S_CONV]),
        (SD1_ATTN, [S_SD1_ATTN]),
    ]),
}


def config_shape(config_id, key):
    return list(model_configs.resolve(config_id).keys()[key].shape)


def kohya_shape(stem):
    return config_shape(*KOHYA_KEY[stem])


# ---------------------------------------------------------------------------------------------
# base models (not stored: the test computes the same values)
# ---------------------------------------------------------------------------------------------

def base_values(shape, offset):
    """value[i] = (((i + offset) * 7919) % 1009) / 1009 - 0.5 over the flat index, float64 -> float32."""
    n = int(np.prod(shape)) if shape else 1
    i = np.arange(n, dtype=np.int64) + offset
    return ((((i * 7919) % 1009) / 1009 - 0.5).astype(np.float32)).reshape(shape)


def base_spec(config_id, keys):
    """{key: {"shape", "offset"}}: real shapes from the config, offset 101 * position."""
    return OrderedDict((k, OrderedDict(shape=config_shape(config_id, k), offset=101 * n)) for n, k in enumerate(keys))


def write_base(path, spec):
    save_file({k: torch.from_numpy(base_values(v["shape"], v["offset"])) for k, v in spec.items()}, path)


# ---------------------------------------------------------------------------------------------
# LoRA / LyCORIS input files
# ---------------------------------------------------------------------------------------------

class Factors:
    """Draws the factor tensors from one seeded generator, in the order the files are built."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, shape, scale):
        return torch.randn(shape, generator=self.g, dtype=torch.float32) * scale

    def lora(self, stem, rank=4, alpha=None, tucker=False, prefix="lora", scale=0.1):
        """LoRA / LoCon: linear up [out, r], down [r, in]; conv up [out, r, 1, 1], down [r, in, kh, kw];
        Tucker conv: mid [r, r, kh, kw], down [r, in, 1, 1], up [out, r, 1, 1]."""
        out_dim, in_dim, *k = kohya_shape(stem)
        p = f"{prefix}_{stem}"
        sd = OrderedDict()
        if not k:
            sd[f"{p}.lora_up.weight"] = self.randn([out_dim, rank], scale)
            sd[f"{p}.lora_down.weight"] = self.randn([rank, in_dim], scale)
        elif tucker:
            sd[f"{p}.lora_up.weight"] = self.randn([out_dim, rank, 1, 1], scale)
            sd[f"{p}.lora_mid.weight"] = self.randn([rank, rank, *k], scale)
            sd[f"{p}.lora_down.weight"] = self.randn([rank, in_dim, 1, 1], scale)
        else:
            sd[f"{p}.lora_up.weight"] = self.randn([out_dim, rank, 1, 1], scale)
            sd[f"{p}.lora_down.weight"] = self.randn([rank, in_dim, *k], scale)
        if alpha is not None:
            sd[f"{p}.alpha"] = torch.tensor(float(alpha))
        return sd

    def lokr(self, stem, w1, w1_rank=None, w2_rank=None, tucker=False, alpha=None, prefix="lora", scale=0.1):
        """LoKr with w1 [m1, n1] (full, or w1_a [m1, r] @ w1_b [r, n1]) and w2 [m2, n2, *k] (full;
        w2_a [m2, r] @ w2_b [r, n2 * prod(k)]; or Tucker: t2 [r, r, *k], w2_a [r, m2], w2_b [r, n2]),
        LyCORIS's layouts."""
        out_dim, in_dim, *k = kohya_shape(stem)
        m1, n1 = w1
        assert out_dim % m1 == 0 and in_dim % n1 == 0
        m2, n2 = out_dim // m1, in_dim // n1
        p = f"{prefix}_{stem}"
        sd = OrderedDict()
        if w1_rank is None:
            sd[f"{p}.lokr_w1"] = self.randn([m1, n1], scale)
        else:
            sd[f"{p}.lokr_w1_a"] = self.randn([m1, w1_rank], scale)
            sd[f"{p}.lokr_w1_b"] = self.randn([w1_rank, n1], scale)
        if w2_rank is None:
            sd[f"{p}.lokr_w2"] = self.randn([m2, n2, *k], scale)
        elif tucker:
            sd[f"{p}.lokr_t2"] = self.randn([w2_rank, w2_rank, *k], scale)
            sd[f"{p}.lokr_w2_a"] = self.randn([w2_rank, m2], scale)
            sd[f"{p}.lokr_w2_b"] = self.randn([w2_rank, n2], scale)
        else:
            sd[f"{p}.lokr_w2_a"] = self.randn([m2, w2_rank], scale)
            sd[f"{p}.lokr_w2_b"] = self.randn([w2_rank, n2 * int(np.prod(k))], scale)
        if alpha is not None:
            sd[f"{p}.alpha"] = torch.tensor(float(alpha))
        return sd

    def loha(self, stem, rank=4, alpha=None, tucker=False, prefix="lora", scale=0.2):
        """LoHa: hada_w{1,2}_a [out, r], hada_w{1,2}_b [r, in * prod(k)]; Tucker (conv):
        hada_t{1,2} [r, r, kh, kw], hada_w{1,2}_a [r, out], hada_w{1,2}_b [r, in]."""
        out_dim, in_dim, *k = kohya_shape(stem)
        p = f"{prefix}_{stem}"
        sd = OrderedDict()
        for w in ("1", "2"):
            if tucker:
                sd[f"{p}.hada_t{w}"] = self.randn([rank, rank, *k], scale)
                sd[f"{p}.hada_w{w}_a"] = self.randn([rank, out_dim], scale)
                sd[f"{p}.hada_w{w}_b"] = self.randn([rank, in_dim], scale)
            else:
                sd[f"{p}.hada_w{w}_a"] = self.randn([out_dim, rank], scale)
                sd[f"{p}.hada_w{w}_b"] = self.randn([rank, in_dim * int(np.prod(k))], scale)
        if alpha is not None:
            sd[f"{p}.alpha"] = torch.tensor(float(alpha))
        return sd


def merged(*parts):
    out = OrderedDict()
    for part in parts:
        assert not set(out) & set(part)
        out.update(part)
    return out


def build_loras():
    """name -> state dict. Every file is F32 except sdxl_realistic (F16, as kohya saves)."""
    f = Factors(SEED)
    lo = OrderedDict()
    lo["lora_te1_alpha"] = f.lora(S_TE1_Q, alpha=2.0)
    lo["lora_no_alpha"] = f.lora(S_TIME)
    lo["lora_conv_alpha"] = f.lora(S_CONV, alpha=1.0)
    lo["locon_tucker_alpha"] = f.lora(S_CONV, alpha=2.0, tucker=True)
    lo["locon_tucker_no_alpha"] = f.lora(S_CONV, tucker=True)
    lo["lokr_full"] = f.lokr(S_TIME, (16, 8))
    lo["lokr_w1_factorized"] = f.lokr(S_TIME, (16, 8), w1_rank=2, alpha=1.0)
    lo["lokr_w2_factorized"] = f.lokr(S_TIME, (16, 8), w2_rank=4, alpha=2.0)
    lo["lokr_alpha_inf"] = f.lokr(S_TIME, (16, 8), w2_rank=4, alpha=math.inf)
    lo["lokr_tucker_linear"] = f.lokr(S_TIME, (16, 8), w2_rank=4, tucker=True, alpha=2.0)
    lo["lokr_conv"] = f.lokr(S_CONV, (16, 2))
    lo["lokr_conv_w2_factorized"] = f.lokr(S_CONV, (16, 2), w2_rank=4, alpha=3.0)
    lo["lycoris_mixed"] = merged(
        f.lora(S_CONV, alpha=2.0, prefix="lycoris"),
        f.lokr(S_TIME, (16, 8), w1_rank=2, alpha=1.0, prefix="lycoris"),
    )
    lo["sd1"] = merged(f.lora(S_SD1_TE_Q, alpha=2.0), f.lora(S_CONV, alpha=2.0), f.lora(S_SD1_ATTN, alpha=8.0))
    lo["sd1_only"] = merged(f.lora(S_SD1_TE_Q, alpha=4.0), f.lora(S_SD1_ATTN, alpha=4.0))
    realistic = merged(
        f.lora(S_TE1_Q, alpha=2.0),
        f.lora(S_TE2["q"], alpha=2.0),
        f.lora(S_TE2["k"], alpha=2.0),
        f.lora(S_TE2["v"], alpha=2.0),
        f.lora(S_ATTN, alpha=2.0),
        f.lora(S_CONV, alpha=2.0),
        f.lora(S_TIME, alpha=2.0),
    )
    lo["sdxl_realistic"] = OrderedDict((k, v.to(torch.float16)) for k, v in realistic.items())
    lo["two_loras_first"] = merged(f.lora(S_TIME, alpha=2.0), f.lora(S_CONV, alpha=1.0))
    lo["two_loras_second"] = f.lora(S_TIME, alpha=4.0)
    lo["loha_linear"] = f.loha(S_TIME, alpha=2.0)
    lo["loha_conv_no_alpha"] = f.loha(S_CONV)
    lo["loha_tucker_conv"] = f.loha(S_CONV, alpha=2.0, tucker=True)
    lo["lokr_tucker_conv"] = f.lokr(S_CONV, (16, 2), w2_rank=4, tucker=True, alpha=2.0)
    lo["unmatched_key"] = merged(
        f.lora(S_TIME, alpha=2.0),
        OrderedDict([
            (f"lora_{S_UNMATCHED}.lora_up.weight", f.randn([8, 4], 0.1)),
            (f"lora_{S_UNMATCHED}.lora_down.weight", f.randn([4, 8], 0.1)),
        ]),
    )
    return lo


# ---------------------------------------------------------------------------------------------
# the bake by hand (NumPy, float64)
# ---------------------------------------------------------------------------------------------

def lora_delta(t, target_shape):
    """ΔW of one LoRA / LyCORIS module from its tensors by suffix (float64 NumPy arrays)."""
    alpha = t.get("alpha")
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        up2 = up.reshape(up.shape[0], -1)
        down2 = down.reshape(down.shape[0], -1)
        if "lora_mid.weight" in t:
            # Tucker: mid [r, r, kh, kw]; up2 [out, r], down2 [r, in]
            delta = np.einsum("ij...,pi,jr->pr...", t["lora_mid.weight"], up2, down2)
        else:
            delta = up2 @ down2
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    elif any(s.startswith("lokr_") for s in t):
        dim = None
        if "lokr_w1" in t:
            w1 = t["lokr_w1"]
        else:
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
            dim = t["lokr_w1_b"].shape[0]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            w2a, w2b = t["lokr_w2_a"], t["lokr_w2_b"]
            if "lokr_t2" in t:
                w2 = np.einsum("ij...,ip,jr->pr...", t["lokr_t2"], w2a, w2b)
            else:
                w2 = w2a @ w2b.reshape(w2b.shape[0], -1)
            if dim is None:  # sd-mecha takes w1's rank when both are factorized
                dim = w2b.shape[0]
        while w1.ndim < w2.ndim:
            w1 = w1[..., None]
        delta = np.kron(w1, w2)
        scale = float(alpha) / dim if alpha is not None and np.isfinite(alpha) and dim is not None else 1.0
    elif "hada_w1_a" in t:
        def half(n):
            a, b = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"]
            if f"hada_t{n}" in t:
                return np.einsum("ijkl,jr,ip->prkl", t[f"hada_t{n}"], b, a)
            return a @ b
        delta = half(1) * half(2).reshape(half(1).shape)
        scale = float(alpha) / t["hada_w1_b"].shape[0] if alpha is not None else 1.0
    else:
        raise AssertionError(f"no algorithm for {sorted(t)}")
    return (delta * scale).reshape(target_shape)


def modules(sd):
    """{"<prefix>_<stem>": {suffix: float64 array}} of a LoRA file."""
    out = OrderedDict()
    for key, value in sd.items():
        stem, suffix = key.split(".", 1)
        out.setdefault(stem, {})[suffix] = value.double().numpy()
    return out


def reference(base_config, base, steps, lora_files, omit_non_finite):
    """base + Σ alpha · ΔW for every base key, the steps applied in order (float64)."""
    values = OrderedDict((k, base_values(v["shape"], v["offset"]).astype(np.float64)) for k, v in base.items())
    for lora_name, alpha in steps:
        mods = modules(lora_files[lora_name])
        for key, stems in TARGETS[base_config].items():
            if key not in values:
                continue
            parts = []
            for stem in stems:
                found = [mods[p + "_" + stem] for p in ("lora", "lycoris") if p + "_" + stem in mods]
                if not found:
                    break
                t = found[0]
                if omit_non_finite and not all(np.isfinite(v).all() for v in t.values()):
                    break  # merge() omits a non-finite input tensor: the module's delta is missing
                parts.append(lora_delta(t, kohya_shape(stem)))
            if len(parts) == len(stems):
                values[key] = values[key] + alpha * np.concatenate(parts, axis=0)
    return values


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

SGM_INPROJ_ROWS = [[0, 4], [1280, 1284], [2560, 2564]]  # rows of q, k and v in in_proj_weight


def bake(case_id, description, steps, base_keys, *, base_config="sdxl-sgm", options=None, row_ranges=None,
         intent=None, unmatched_keys=None, error_must_name=None, lora_configs=None):
    """A case: the base file with `base_keys`, then `(lora file, alpha)` steps baked in order."""
    return OrderedDict(
        id=case_id, description=description, steps=steps, base_config=base_config, base_keys=base_keys,
        options=options or {}, row_ranges=row_ranges or {}, intent=intent, unmatched_keys=unmatched_keys,
        error_must_name=error_must_name, lora_configs=lora_configs,
    )


def case_list():
    cases = []
    add = cases.append
    lokr_rows = {TIME: [[0, 4], [80, 84]]}  # two rows of w1 (w2 has 80 rows)
    lokr_conv_rows = {CONV: [[0, 4], [20, 24]]}  # two rows of w1 (w2 has 20 rows)

    add(bake("lora_linear_alpha", "LoRA on te1 q_proj [768, 768]: up [768, 4] @ down [4, 768], alpha 2 (scale 2/4), baked with alpha 0.75. "
             "A te1-only LoRA infers as sdxl-kohya_kohya_lora (first in sd-mecha's config order)",
             [("lora_te1_alpha", 0.75)], [TE1_Q, ANCHOR], lora_configs=["sdxl-kohya_kohya_lora"]))
    add(bake("lora_linear_no_alpha", "LoRA on time_embed.0 [1280, 320] (diffusers name time_embedding.linear_1) without an alpha key: scale 1",
             [("lora_no_alpha", 1.0)], [TIME, ANCHOR], lora_configs=["sdxl-kohya_but_diffusers_kohya_lora"]))
    add(bake("lora_conv3x3", "LoRA on conv_in / input_blocks.0.0 [320, 4, 3, 3]: down [4, 4, 3, 3], up [320, 4, 1, 1], alpha 1 (scale 1/4); "
             "the bias passes through",
             [("lora_conv_alpha", 1.0)], [CONV, CONV_BIAS, ANCHOR]))
    add(bake("locon_tucker_alpha", "LoCon with a Tucker core on conv_in: lora_mid [4, 4, 3, 3], down [4, 4, 1, 1], up [320, 4, 1, 1], alpha 2, "
             "baked with alpha 0.6",
             [("locon_tucker_alpha", 0.6)], [CONV, ANCHOR]))
    add(bake("locon_tucker_no_alpha", "LoCon with a Tucker core on conv_in without alpha: scale 1",
             [("locon_tucker_no_alpha", 1.0)], [CONV, ANCHOR]))
    add(bake("lokr_full", "LoKr on time_embed.0: full w1 [16, 8] kron full w2 [80, 40], no alpha (scale 1)",
             [("lokr_full", 1.0)], [TIME, ANCHOR], row_ranges=lokr_rows))
    add(bake("lokr_w1_factorized_alpha", "LoKr: w1 = w1_a [16, 2] @ w1_b [2, 8], full w2 [80, 40], alpha 1 (scale 1/2: w1_b's rank)",
             [("lokr_w1_factorized", 1.0)], [TIME, ANCHOR], row_ranges=lokr_rows))
    add(bake("lokr_w2_factorized_alpha", "LoKr: full w1 [16, 8], w2 = w2_a [80, 4] @ w2_b [4, 40], alpha 2 (scale 2/4), baked with alpha 1.5",
             [("lokr_w2_factorized", 1.5)], [TIME, ANCHOR], row_ranges=lokr_rows))
    add(bake("lokr_alpha_inf", "LoKr with alpha = inf and omit_non_finite_inputs=False: a non-finite alpha gives scale 1",
             [("lokr_alpha_inf", 1.0)], [TIME, ANCHOR], options={"omit_non_finite_inputs": False}, row_ranges=lokr_rows))
    add(bake("lokr_alpha_inf_default", "The same LoKr (alpha = inf) with merge()'s default omit_non_finite_inputs=True: the alpha tensor "
             "counts as missing, so the module's delta is missing and `| base` keeps the base key unchanged",
             [("lokr_alpha_inf", 1.0)], [TIME, ANCHOR], row_ranges=lokr_rows))
    add(bake("lokr_tucker_linear", "LoKr with a Tucker core on a linear key: full w1 [16, 8], lokr_t2 [4, 4], w2_a [4, 80], w2_b [4, 40] "
             "(w2 = einsum('i j, i p, j r -> p r')), alpha 2 (scale 2/4). sd-mecha computes this one",
             [("lokr_tucker_linear", 1.0)], [TIME, ANCHOR], row_ranges=lokr_rows))
    add(bake("lokr_conv", "LoKr on conv_in [320, 4, 3, 3]: full w1 [16, 2] (unsqueezed to [16, 2, 1, 1]) kron full w2 [20, 2, 3, 3], no alpha",
             [("lokr_conv", 1.0)], [CONV, ANCHOR], row_ranges=lokr_conv_rows))
    add(bake("lokr_conv_w2_factorized", "LoKr on conv_in: full w1 [16, 2], w2 = w2_a [20, 4] @ w2_b [4, 18] (2-D, LyCORIS's layout), alpha 3 "
             "(scale 3/4), reshaped to [320, 4, 3, 3]",
             [("lokr_conv_w2_factorized", 1.0)], [CONV, ANCHOR], row_ranges=lokr_conv_rows))
    add(bake("lycoris_prefix", "The lycoris flavour (`lycoris_` prefix, config sdxl-kohya_but_diffusers_lycoris_lora): a LoCon on conv_in "
             "and a LoKr (w1_a @ w1_b, full w2, alpha 1) on time_embed.0 in one file, baked with alpha 0.9",
             [("lycoris_mixed", 0.9)], [CONV, TIME, ANCHOR], row_ranges=lokr_rows,
             lora_configs=["sdxl-kohya_but_diffusers_lycoris_lora"]))
    add(bake("sd1_kohya", "An SD1 LoRA (lora_te_… and diffusers-named lora_unet_…: te q_proj, conv_in, down_blocks.0 attn1.to_k) baked "
             "into an sd1-kohya base (config sd1-kohya_kohya_lora)",
             [("sd1", 1.0)], [SD1_TE_Q, SD1_CONV, SD1_ATTN, SD1_ANCHOR], base_config="sd1-kohya",
             lora_configs=["sd1-kohya_kohya_lora"]))
    add(bake("sdxl_realistic", "A realistic SDXL kohya LoRA (F16 factors and alphas, alpha 2, rank 4): te1 q_proj, te2 q/k/v_proj, and "
             "diffusers-named UNet keys (down_blocks.1.attentions.0…attn1.to_k, conv_in, time_embedding.linear_1), baked into an "
             "sdxl-sgm base through sdxl-kohya_but_diffusers. The te2 q/k/v deltas are stacked into in_proj_weight [3840, 1280] "
             "(4 rows of each of q, k and v stored); the biases pass through",
             [("sdxl_realistic", 0.8)], [TE1_Q, IN_PROJ, IN_PROJ_BIAS, ATTN, CONV, CONV_BIAS, TIME, ANCHOR],
             row_ranges={IN_PROJ: SGM_INPROJ_ROWS}, lora_configs=["sdxl-kohya_but_diffusers_kohya_lora"]))
    add(bake("two_loras", "Two LoRAs baked one after the other: add_difference(base, convert(first, base), alpha=0.8) | base, then "
             "add_difference(that, convert(second, base), alpha=0.5) | that. Both touch time_embed.0, only the first conv_in",
             [("two_loras_first", 0.8), ("two_loras_second", 0.5)], [TIME, CONV, ANCHOR]))
    add(bake("unmatched_key", "A LoRA with one module that matches no base key (lora_unet_not_a_layer): sd-mecha warns that the file has "
             "keys its config lacks and bakes the rest",
             [("unmatched_key", 1.0)], [TIME, ANCHOR],
             unmatched_keys=[f"lora_{S_UNMATCHED}.lora_down.weight", f"lora_{S_UNMATCHED}.lora_up.weight"]))
    add(bake("error_sd1_lora_into_sdxl", "An SD1 LoRA (lora_te_…, down_blocks.0 attention: keys only SD1 has) baked into an sdxl-sgm base: "
             "no conversion leads from sd1-kohya_kohya_lora to sdxl-sgm",
             [("sd1_only", 1.0)], [TE1_Q, ANCHOR], error_must_name=["sd1-kohya_kohya_lora", "sdxl-sgm"]))

    # --- what sd-mecha 1.1.8 gets wrong: the expected output is the hand computation ----------------
    loha_why = ("sd-mecha 1.1.8 has no LoHa algorithm: its LoRA configs have no hada_* keys. With an alpha key the file still infers "
                "as a LoRA config (only the alpha matches), the hada_* keys are reported as extra keys and ignored, and the base "
                "comes out unchanged.")
    add(bake("loha_linear", "LoHa on time_embed.0: ΔW = (hada_w1_a [1280, 4] @ hada_w1_b [4, 320]) ⊙ (hada_w2_a @ hada_w2_b) · alpha/r, "
             "alpha 2, r = hada_w1_b.shape[0] = 4",
             [("loha_linear", 1.0)], [TIME, ANCHOR], intent=loha_why))
    add(bake("loha_conv_no_alpha", "LoHa on conv_in without alpha (scale 1): hada_w{1,2}_b [4, 36] = [r, in·3·3], the product reshaped "
             "to [320, 4, 3, 3]",
             [("loha_conv_no_alpha", 1.0)], [CONV, ANCHOR],
             intent="sd-mecha 1.1.8 has no LoHa algorithm; without an alpha key no key of the file belongs to a LoRA config, so "
                    "sd_mecha.convert() finds no candidate config and raises a TypeError naming sd1-ldm: the last of the base's "
                    "candidate configs (sdxl-sgm, then sd1-ldm, which also has input_blocks.0.0) it tried."))
    add(bake("loha_tucker_conv", "LoHa with Tucker cores on conv_in: hada_t{1,2} [4, 4, 3, 3], hada_w{1,2}_a [4, 320], hada_w{1,2}_b [4, 4]; "
             "each half is einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a) (as LyCORIS), alpha 2, r = 4",
             [("loha_tucker_conv", 1.0)], [CONV, ANCHOR], intent=loha_why))
    add(bake("lokr_tucker_conv", "LoKr with a Tucker core on conv_in: full w1 [16, 2], lokr_t2 [4, 4, 3, 3], w2_a [4, 20], w2_b [4, 2]; "
             "w2 = einsum('i j k l, i p, j r -> p r k l', t2, w2_a, w2_b) [20, 2, 3, 3], kron with w1 as [16, 2, 1, 1], alpha 2 "
             "(scale 2/4: w2_b's rank)",
             [("lokr_tucker_conv", 1.0)], [CONV, ANCHOR], row_ranges=lokr_conv_rows,
             intent="sd-mecha 1.1.8 builds w2 with torch.einsum, whose result is not contiguous, and torch.kron of it with "
                    "the 4-D w1 raises, which aborts the merge."))
    return cases


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------

def case_code(steps):
    lines = ['base = model("base.safetensors")']
    names = ["lora"] if len(steps) == 1 else ["first", "second", "third"][: len(steps)]
    for name, (lora, _) in zip(names, steps):
        lines.append(f'{name} = model("{lora}.safetensors")')
    current = "base"
    for n, (name, (_, alpha)) in enumerate(zip(names, steps)):
        expr = f'resolve("add_difference")({current}, sd_mecha.convert({name}, base), alpha={alpha!r}) | {current}'
        if n == len(steps) - 1:
            lines.append(expr)
        else:
            lines.append(f"step{n + 1} = {expr}")
            current = f"step{n + 1}"
    return "\n".join(lines)


def namespace_for(directory):
    return {
        "os": os,
        "torch": torch,
        "sd_mecha": sd_mecha,
        "DIR": directory,
        "model": lambda name, **kwargs: sd_mecha.model(os.path.join(directory, name), **kwargs),
        "resolve": resolve,
    }


class Captured(logging.Handler):
    """Collects sd-mecha's warnings: first line and the `Extra keys` line, deduplicated."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        msg = record.getMessage().splitlines()
        short = " / ".join([msg[0].strip()] + [m.strip() for m in msg[1:] if m.strip().startswith(("Extra keys", "Config:"))])
        if short not in self.lines:
            self.lines.append(short)


def capture():
    handler = Captured()
    root = logging.getLogger()
    root.addHandler(handler)
    return handler, lambda: root.removeHandler(handler)


def lenient_text(recipe, directory):
    """What sd_mecha.merge() embeds: its `serialize` refuses partial base files (mandatory keys)."""
    with sd_mecha.open_graph(recipe) as graph:
        root = graph.finalize_root(model_config_preference=("singleton-mecha",), check_mandatory_keys=False)
    return sd_mecha.serialize(root, finalize=False).replace(directory, "{dir}")


def do_merge(recipe, dtype, options):
    out = sd_mecha.merge(recipe, merge_dtype=dtype, output_dtype=dtype, threads=0, output=None, **options)
    out.pop("__metadata__", None)
    return out


def cut(tensor, ranges):
    if tensor.dim() == 0:
        return tensor.clone()
    return torch.cat([tensor[a:b] for a, b in ranges]).contiguous().clone()


def model_configs_in(text):
    """{file name: model_config} of the model lines of a text."""
    out = {}
    for line in text.splitlines():
        if line.startswith("model "):
            path = line.split('"')[1]
            out[os.path.basename(path)] = line.split('model_config="')[1].split('"')[0]
    return out


def run_case(spec, lora_files, inputs_dir, outputs_dir, work_root):
    cid = spec["id"]
    directory = os.path.realpath(tempfile.mkdtemp(prefix=f"{cid}-", dir=work_root))
    base = base_spec(spec["base_config"], spec["base_keys"])
    write_base(os.path.join(directory, "base.safetensors"), base)
    for lora, _ in spec["steps"]:
        shutil.copyfile(inputs_dir / f"{lora}.safetensors", os.path.join(directory, f"{lora}.safetensors"))
    # the base file alone infers as the intended config (sd-mecha's first candidate)
    with sd_mecha.open_graph(sd_mecha.model(os.path.join(directory, "base.safetensors")), root_only=True, solve_merge_space=False) as g:
        candidates = [c.identifier for c in g.root_candidates().model_config]
    assert candidates[0] == spec["base_config"], (cid, candidates)
    python = case_code(spec["steps"])
    ns = lambda: namespace_for(directory)  # noqa: E731
    omit = spec["options"].get("omit_non_finite_inputs", True)

    out = OrderedDict(id=cid, description=spec["description"], python=python)
    out["text"] = None
    out["error"] = None
    out["base"] = OrderedDict(file="base.safetensors", config=spec["base_config"], tensors=base)
    out["bake"] = [OrderedDict(lora=f"{lora}.safetensors", alpha=alpha) for lora, alpha in spec["steps"]]
    out["options"] = spec["options"]

    # sd-mecha: build, serialize (lenient), merge
    handler, done = capture()
    sd_result, sd_error = None, None
    try:
        recipe = run_code(python, ns())
        out["text"] = lenient_text(recipe, directory)
        sd_result = do_merge(recipe, torch.float32, spec["options"])
    except Exception as e:
        sd_error = error_text(e, directory)
    finally:
        done()
    warnings = [w.replace(directory, "{dir}") for w in handler.lines]

    if out["text"] is not None:
        configs = model_configs_in(out["text"])
        assert configs["base.safetensors"] == spec["base_config"], (cid, configs)
        if spec["lora_configs"]:
            assert [configs[f"{lora}.safetensors"] for lora, _ in spec["steps"]] == spec["lora_configs"], (cid, configs)

    if spec["error_must_name"]:
        assert sd_error is not None and out["text"] is None, f"{cid}: expected sd-mecha to fail"
        for name in spec["error_must_name"]:
            assert name in sd_error, (cid, sd_error)
        out["error"] = sd_error
        out["error_must_name"] = spec["error_must_name"]
        for k in ("output", "keys", "shapes", "rows", "row_ranges"):
            out[k] = None
        out["tolerance"], out["atol"] = RTOL, ATOL
        return out, {}

    keys = sorted(base)
    ref = reference(spec["base_config"], base, spec["steps"], lora_files, omit)
    ref32 = OrderedDict((k, torch.from_numpy(ref[k].astype(np.float32))) for k in keys)
    excess = {}

    if spec["intent"]:
        out["intent"] = True
        out["why"] = spec["intent"]
        record = OrderedDict()
        if sd_error is not None:
            record["error"] = sd_error
        else:
            same = [k for k in keys if torch.equal(sd_result[k], torch.from_numpy(base_values(base[k]["shape"], base[k]["offset"])))]
            assert sorted(sd_result) == keys, (cid, sorted(sd_result))
            assert same == keys, f"{cid}: sd-mecha changed {sorted(set(keys) - set(same))}; update the case"
            record["result"] = "every key equal to the base's (the LoRA module is not applied)"
        if warnings:
            record["warnings"] = warnings
        out["sd_mecha"] = record
        # the expected output is the hand computation
        tensors = ref32
        # sanity: the LoRA does change the keys it targets
        assert any(not torch.equal(ref32[k], torch.from_numpy(base_values(base[k]["shape"], base[k]["offset"]))) for k in keys), cid
    else:
        if sd_error is not None:
            raise AssertionError(f"{cid}: sd-mecha failed: {sd_error}")
        assert sorted(sd_result) == keys, (cid, sorted(sd_result), keys)
        tensors = OrderedDict((k, sd_result[k].contiguous().clone()) for k in keys)
        for k, v in tensors.items():
            assert v.dtype == torch.float32 and list(v.shape) == base[k]["shape"], (cid, k, v.dtype, v.shape)
        # the same recipe built again merges to the same bytes
        again = do_merge(run_code(python, ns()), torch.float32, spec["options"])
        for k, v in tensors.items():
            assert torch.equal(again[k], v), (cid, k)
        # sd-mecha agrees with the hand computation, and its float64 merge with its float32 one
        wide = do_merge(run_code(python, ns()), torch.float64, spec["options"])
        for k, v in tensors.items():
            excess[f"{k} vs hand"] = worst_excess(v, torch.from_numpy(ref[k]), RTOL, ATOL)
            excess[f"{k} f64"] = worst_excess(wide[k], v, RTOL, ATOL)
        bad = {k: e for k, e in excess.items() if not e <= 1}
        if bad:
            raise AssertionError(f"{cid}: outside the tolerance: {bad}")
        if warnings:
            out["warnings"] = warnings

    if spec["unmatched_keys"]:
        text = " ".join(warnings)
        for key in spec["unmatched_keys"]:
            assert key in text, (cid, key, warnings)
        out["unmatched_keys"] = spec["unmatched_keys"]

    # the targeted keys changed, the others did not
    for k in keys:
        unchanged = torch.equal(tensors[k], torch.from_numpy(base_values(base[k]["shape"], base[k]["offset"])))
        targeted = k in TARGETS[spec["base_config"]] and cid != "lokr_alpha_inf_default"
        assert unchanged != targeted, (cid, k, unchanged)

    row_ranges = OrderedDict((k, spec["row_ranges"][k]) for k in keys if k in spec["row_ranges"])
    name = f"{cid}.safetensors"
    save_file(
        OrderedDict((k, cut(v, row_ranges.get(k, [[0, ROWS]]))) for k, v in tensors.items()),
        os.path.join(outputs_dir, name),
    )
    out["output"] = name
    out["keys"] = keys
    out["shapes"] = OrderedDict((k, base[k]["shape"]) for k in keys)
    out["rows"] = ROWS
    out["row_ranges"] = row_ranges
    out["tolerance"] = RTOL
    out["atol"] = ATOL
    return out, excess


def generate(out_dir):
    lora_files = build_loras()
    inputs_dir = out_dir / "inputs"
    outputs_dir = out_dir / "outputs"
    for d in (inputs_dir, outputs_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    for name, sd in lora_files.items():
        save_file(sd, str(inputs_dir / f"{name}.safetensors"))
    # the reference reads the stored values (F16 rounding included)
    lora_files = OrderedDict((name, load_file(str(inputs_dir / f"{name}.safetensors"))) for name in lora_files)

    specs = case_list()
    ids = [s["id"] for s in specs]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    used = {lora for s in specs for lora, _ in s["steps"]}
    assert used == set(lora_files), f"unused inputs: {set(lora_files) - used}"
    work_root = os.path.realpath(tempfile.mkdtemp(prefix="sd-mecha-golden-lora-"))
    cases, excesses, failures = [], {}, []
    try:
        for spec in specs:
            try:
                out, excess = run_case(spec, lora_files, inputs_dir, str(outputs_dir), work_root)
            except Exception as e:
                failures.append(f"{spec['id']}: {type(e).__name__}: {first_line(e)}")
                continue
            cases.append(out)
            excesses[spec["id"]] = excess
    finally:
        shutil.rmtree(work_root, ignore_errors=True)
    if failures:
        raise SystemExit("cases failed:\n  " + "\n  ".join(failures))
    return cases, excesses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print how much of the tolerance each key uses")
    args = parser.parse_args()

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger().addHandler(logging.NullHandler())  # warnings are captured per case, not printed
    try:
        from importlib.metadata import version as dist_version
        version = dist_version("sd-mecha")
    except Exception:
        version = getattr(sd_mecha, "__version__", None)
    if version != EXPECTED_SD_MECHA_VERSION:
        print(f"warning: sd-mecha {version} found, the golden data is meant for {EXPECTED_SD_MECHA_VERSION}", file=sys.stderr)
    torch.set_num_threads(1)

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    cases, excesses = generate(args.out)
    (args.out / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")

    if args.verbose:
        for c in cases:
            e = excesses[c["id"]]
            worst = max(e.values()) if e else None
            tag = "intent" if c.get("intent") else ("error" if c["error"] else f"max {worst:.3f} of the tolerance")
            print(f"  {c['id']}: {tag}")
            for k, v in e.items():
                print(f"      {k}: {v:.3f}")
            if c.get("sd_mecha"):
                print(f"      sd-mecha: {json.dumps(c['sd_mecha'])}")
            if c["error"]:
                print(f"      sd-mecha: {c['error']}")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(cases)} cases, {size / 1024:.0f} KiB in {time.monotonic() - started:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
