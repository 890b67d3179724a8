#!/usr/bin/env python3
"""Generate golden test data from the real sd-mecha 1.1.8 (Python reference implementation).

Run from the repository root, outside CI:

    bench/.venv/bin/python scripts/golden/generate.py

(`bench/setup-reference.sh` installs sd-mecha 1.1.8 + torch into bench/.venv.)

Writes into __test__/fixtures/golden/:

* models.json.gz  {"<file name>": ["key", ...]}: the tensor names of every synthetic model file,
                  in the order they were passed to safetensors.torch.save_file. Every tensor is
                  zero-size: shape [0], dtype F16. Only the names matter.
* inference.json  {"<file name>": {"config": <id or "structural">, "candidates": [ids...]}}:
                  what sd-mecha infers for `sd_mecha.model(path)` alone.
* cases.json      [{"id", "description", "python", "text", "error", "roundtrip", ...}]: sd-mecha's
                  `.mecha` serialization of recipes (temp dir replaced by "{dir}"), or the error
                  sd-mecha raises.

The "python" field of a case is the exact code that was evaluated (the value of its last
expression is the recipe), with these names in scope:

    import os, torch, sd_mecha
    from torch import Tensor
    from sd_mecha import Parameter, Return
    DIR = os.path.realpath(tempfile.mkdtemp())            # where the model files were written
    def model(name, **kwargs):                            # a model file by name
        return sd_mecha.model(os.path.join(DIR, name), **kwargs)
    resolve = sd_mecha.extensions.merge_methods.resolve   # the registered (non-wrapper) methods

    @sd_mecha.merge_method(register=True)
    def golden_mix(a: Parameter(Tensor), b: Parameter(Tensor), *, k: Parameter(float) = 0.25) -> Return(Tensor):
        return a * (1 - k) + b * k

The output is deterministic: a run in a fresh process always writes the same bytes (it is
checked by running this script twice, also with different PYTHONHASHSEED values).
"""

import argparse
import ast
import gzip
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections import OrderedDict

import torch
from torch import Tensor
from safetensors.torch import save_file

import sd_mecha
from sd_mecha import Parameter, Return
from sd_mecha.extensions import model_configs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "__test__" / "fixtures" / "golden"
EXPECTED_SD_MECHA_VERSION = "1.1.8"

resolve = sd_mecha.extensions.merge_methods.resolve


@sd_mecha.merge_method(register=True)
def golden_mix(a: Parameter(Tensor), b: Parameter(Tensor), *, k: Parameter(float) = 0.25) -> Return(Tensor):
    return a * (1 - k) + b * k


GOLDEN_MIX_SIGNATURE = (
    "# golden_mix is defined by the generator as:\n"
    "# @sd_mecha.merge_method(register=True)\n"
    "# def golden_mix(a: Parameter(Tensor), b: Parameter(Tensor), *, k: Parameter(float) = 0.25) -> Return(Tensor):\n"
    "#     return a * (1 - k) + b * k\n"
)


# ---------------------------------------------------------------------------------------------
# synthetic model files
# ---------------------------------------------------------------------------------------------

def cfg(identifier):
    return model_configs.resolve(identifier)


def component_keys(identifier, components, include_optional=True):
    config = cfg(identifier)
    out = []
    for name in components:
        for key, meta in config.components()[name].keys().items():
            if include_optional or not meta.optional:
                out.append(key)
    return out


def all_keys(identifier, include_optional=True):
    return [k for k, m in cfg(identifier).keys().items() if include_optional or not m.optional]


def lora_keys(identifier, prefixes_and_counts):
    """The first `count` modules (3 keys each: lora_up.weight, lora_down.weight, alpha) of each prefix."""
    suffixes = ("lora_up.weight", "lora_down.weight", "alpha")
    modules = OrderedDict()
    for key in cfg(identifier).keys():
        module, _, suffix = key.partition(".")
        if suffix in suffixes:
            modules.setdefault(module, []).append(key)
    out = []
    for prefix, count in prefixes_and_counts:
        picked = [m for m in modules if m.startswith(prefix)][:count]
        assert len(picked) == count, (identifier, prefix, len(picked))
        for m in picked:
            assert len(modules[m]) == 3, (m, modules[m])
            out.extend(modules[m])
    return out


def build_models():
    models = OrderedDict()

    sd1 = component_keys("sd1-ldm", ("clip_l", "vae", "diffuser"))
    for name in ("sd1", "sd1_b", "sd1_c"):
        models[f"{name}.safetensors"] = list(sd1)

    sd1_unet = component_keys("sd1-ldm", ("diffuser",))
    models["sd1_unet.safetensors"] = list(sd1_unet)
    models["sd1_unet_b.safetensors"] = list(sd1_unet)

    sd1_meta = cfg("sd1-ldm").keys()
    clip_l = set(cfg("sd1-ldm").components()["clip_l"].keys())
    aliased = []
    for key in sd1:
        aliases = list(sd1_meta[key].aliases)
        aliased.append(aliases[0] if key in clip_l and aliases else key)
    assert aliased != sd1
    models["sd1_aliased.safetensors"] = aliased

    no_optional = [k for k in sd1 if not sd1_meta[k].optional]
    assert len(no_optional) < len(sd1)
    models["sd1_no_optional.safetensors"] = no_optional

    # partial sd1 models
    models["sd1_clip_vae.safetensors"] = component_keys("sd1-ldm", ("clip_l", "vae"))
    models["sd1_vae.safetensors"] = component_keys("sd1-ldm", ("vae",))
    # sd1 minus a single mandatory key of the diffuser
    models["sd1_missing_key.safetensors"] = [k for k in sd1 if k != sd1_unet[0]]
    # sd1 plus keys no config knows
    models["sd1_extra.safetensors"] = list(sd1) + ["extra.weight", "extra.bias"]

    # the 10% key-overlap threshold of config inference: 10 of 100 keys known (accepted),
    # 10 of 101 keys known (rejected)
    ten = sd1_unet[:10]
    models["threshold_in.safetensors"] = list(ten) + [f"junk.{i}.weight" for i in range(90)]
    models["threshold_out.safetensors"] = list(ten) + [f"junk.{i}.weight" for i in range(91)]

    sdxl = all_keys("sdxl-sgm", include_optional=False)
    for name in ("sdxl", "sdxl_b", "sdxl_c"):
        models[f"{name}.safetensors"] = list(sdxl)
    models["sdxl_unet.safetensors"] = component_keys("sdxl-sgm", ("diffuser",))

    flux = []
    prefix = "model.diffusion_model."
    for key, meta in cfg("flux-flux").components()["diffuser"].keys().items():
        assert key.startswith(prefix), key
        alias = key[len(prefix):]
        assert alias in meta.aliases, (key, meta.aliases)
        flux.append(alias)
    models["flux.safetensors"] = flux
    models["flux_b.safetensors"] = list(flux)

    for identifier in (
        "sd1-ldm", "sd1-kohya", "sd1-supermerger_blocks",
        "sdxl-sgm", "sdxl-kohya", "sdxl-kohya_but_diffusers", "sdxl-diffusers_unet_only",
        "sdxl-supermerger_blocks", "sd3-comfyui", "flux-flux", "singleton-mecha",
    ):
        models[f"cfg_{identifier}.safetensors"] = all_keys(identifier)

    models["lora_sdxl.safetensors"] = lora_keys(
        "sdxl-kohya_kohya_lora", (("lora_te1_", 30), ("lora_te2_", 30), ("lora_unet_", 73)),
    )
    models["lora_sd1.safetensors"] = lora_keys(
        "sd1-kohya_kohya_lora", (("lora_te_", 50), ("lora_unet_", 83)),
    )

    unknown_a = [f"net.{i}.{p}" for i in range(12) for p in ("weight", "bias")]
    unknown_b = [k for k in unknown_a if not k.startswith("net.11.")] + ["net.12.weight", "net.12.bias"]
    models["unknown_a.safetensors"] = unknown_a
    models["unknown_b.safetensors"] = unknown_b

    models["sd1 copy.safetensors"] = list(sd1)
    models["a=b.safetensors"] = list(sd1)

    for name, keys in models.items():
        assert len(keys) == len(set(keys)), name
    return models


def write_models(directory, models):
    for name, keys in models.items():
        save_file({k: torch.zeros(0, dtype=torch.float16) for k in keys}, os.path.join(directory, name))


# ---------------------------------------------------------------------------------------------
# config inference
# ---------------------------------------------------------------------------------------------

def infer(path, directory):
    """The config sd-mecha solves for a lone model node, its ranked candidates, and the error the
    default (strict) finalization raises when the file lacks mandatory keys of that config.

    The solution does not depend on check_mandatory_keys: the check runs after solving."""
    with sd_mecha.open_graph(sd_mecha.model(path)) as graph:
        finalized = graph.finalize_root(model_config_preference=("singleton-mecha",), check_mandatory_keys=False)
        candidates = [c.identifier for c in graph.root_candidates().model_config]
        try:
            strict = graph.finalize_root(model_config_preference=("singleton-mecha",))
            assert strict.model_config.identifier == finalized.model_config.identifier
            strict_error = None
        except TypeError as e:
            strict_error = error_text(e, directory)
    return OrderedDict(
        config=finalized.model_config.identifier,
        candidates=candidates,
        strict_error=strict_error,
    )


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------

SD1_BLOCKS = [
    "BASE",
    *(f"IN{i:02}" for i in range(12)),
    "M00",
    *(f"OUT{i:02}" for i in range(12)),
]
SDXL_BLOCKS = [
    "BASE",
    *(f"IN{i:02}" for i in range(9)),
    "M00",
    *(f"OUT{i:02}" for i in range(9)),
    "VAE",
]
assert SD1_BLOCKS == list(model_configs.resolve("sd1-supermerger_blocks").keys())
assert SDXL_BLOCKS == list(model_configs.resolve("sdxl-supermerger_blocks").keys())


def blocks_literal(names, values):
    assert len(names) == len(values)
    return "{" + ", ".join(f"{n!r}: {v!r}" for n, v in zip(names, values)) + "}"


SD1_BLOCKS_FLOAT = blocks_literal(SD1_BLOCKS, [round(i / 25, 2) for i in range(26)])
SD1_BLOCKS_INT = blocks_literal(SD1_BLOCKS, [i % 2 for i in range(26)])
# float spellings Python's repr() produces (exponent below 1e-4 and from 1e16 on, shortest
# round-trip digits, negative zero)
SD1_BLOCKS_FLOAT_FORMATS = blocks_literal(SD1_BLOCKS, [
    0.0, -0.0, 1.0, -1.5, 0.1, 0.30000000000000004, 1 / 3, 2 / 3, 1e-06, 1.5e-05,
    0.0001, 0.00012345, 1e-07, 123456789.0, 1e15, 1e16, 1.2345e+20, 9007199254740993.0, 100.0, 5e-324,
    1.7976931348623157e+308, 2.5, 0.125, 1e+22, 3.14159, 0.7,
])
SDXL_BLOCKS_FLOAT = blocks_literal(SDXL_BLOCKS, [round(i / 20, 2) for i in range(21)])


def case_list():
    """(id, description, python). The python code's last expression is the recipe."""
    return [
        # --- single commands ----------------------------------------------------------------
        ("model", "a lone model: one `model` line",
         'model("sd1.safetensors")'),
        ("model_explicit_config", "a model with an explicit config",
         'model("sd1.safetensors", config="sd1-ldm")'),
        ("model_delta", "a model declared in delta space (a delta root serializes fine)",
         'model("sd1.safetensors", merge_space="delta")'),
        ("literal_param", "a scalar literal in param space as the root",
         'sd_mecha.literal(0.5, merge_space="param")'),
        ("literal_dict_blocks", "a dict literal with an explicit config (a `dict` line then a `literal` line)",
         f'sd_mecha.literal({SD1_BLOCKS_FLOAT}, config="sd1-supermerger_blocks", merge_space="param")'),

        # --- weighted_sum and scalar values --------------------------------------------------
        ("weighted_sum_default", "weighted_sum without alpha: the default 0.5 is bound and written",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"))'),
        ("weighted_sum_int", "alpha=1 (an int: written `1`)",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=1)'),
        ("weighted_sum_float_one", "alpha=1.0 (a float: written `1.0`)",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=1.0)'),
        ("weighted_sum_tiny", "alpha=1e-06 (written `1e-06`)",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=1e-06)'),
        ("weighted_sum_point3", "alpha=0.3",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=0.3)'),
        ("weighted_sum_positional", "alpha passed positionally (same text as the keyword form)",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), 0.3)'),
        ("weighted_sum_true", "alpha=True (a bool: written `true`)",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=True)'),
        ("weighted_sum_false", "alpha=False (written `false`)",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=False)'),
        ("weighted_sum_negative", "a negative alpha",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=-0.25)'),
        ("weighted_sum_same_file_twice", "the same file through two separate model() calls: one `model` line",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1.safetensors"), alpha=0.25)'),
        ("weighted_sum_nested", "nested weighted sums sharing a model node and equal literals (deduplicated lines)",
         'a = model("sd1.safetensors")\n'
         'sd_mecha.weighted_sum(sd_mecha.weighted_sum(a, model("sd1_b.safetensors"), alpha=0.5), '
         'sd_mecha.weighted_sum(a, model("sd1_c.safetensors"), alpha=0.5), alpha=0.5)'),

        # --- operators ----------------------------------------------------------------------
        ("op_subtract", "`a - b` (subtract; the root is in delta space)",
         'model("sd1.safetensors") - model("sd1_b.safetensors")'),
        ("op_add_difference", "`a + (b - c)` (add_difference with the default alpha 1.0)",
         'model("sd1.safetensors") + (model("sd1_b.safetensors") - model("sd1_c.safetensors"))'),
        ("op_scale", "`(a - b) * 0.5` (scale)",
         '(model("sd1.safetensors") - model("sd1_b.safetensors")) * 0.5'),
        ("op_scale_int", "`(a - b) * 2` (scale by an int)",
         '(model("sd1.safetensors") - model("sd1_b.safetensors")) * 2'),
        ("op_add_scaled", "`a + (b - c) * 0.5`",
         'model("sd1.safetensors") + (model("sd1_b.safetensors") - model("sd1_c.safetensors")) * 0.5'),
        ("op_fallback", "`unet | full` (fallback)",
         'model("sd1_unet.safetensors") | model("sd1.safetensors")'),
        ("op_fallback_scalar", "`a | 1.0` (fallback to a scalar)",
         'model("sd1.safetensors") | 1.0'),
        ("op_to_dtype", "`.to(dtype=torch.float16)` (cast with device=None)",
         'model("sd1.safetensors").to(dtype=torch.float16)'),
        ("op_to_device_dtype", "`.to(device=\"cpu\", dtype=\"bfloat16\")` (two string values)",
         'model("sd1.safetensors").to(device="cpu", dtype="bfloat16")'),
        ("op_chain", "operators chained: `(a + (b - c) * 0.5).to(dtype=\"float16\") | a`",
         'a = model("sd1.safetensors")\n'
         '(a + (model("sd1_b.safetensors") - model("sd1_c.safetensors")) * 0.5).to(dtype="float16") | a'),

        # --- registered methods by name --------------------------------------------------------
        ("add_difference_registered", "the registered add_difference (not the wrapper) with alpha=0.5",
         'resolve("add_difference")(model("sd1.safetensors"), model("sd1_b.safetensors") - model("sd1_c.safetensors"), alpha=0.5)'),
        ("add_difference_delta_model", "add_difference with a model declared in delta space",
         'resolve("add_difference")(model("sd1.safetensors"), model("sd1_b.safetensors", merge_space="delta"))'),
        ("scale_registered", "the registered scale with the default alpha 1.0",
         'resolve("scale")(model("sd1_b.safetensors") - model("sd1_c.safetensors"))'),
        ("subtract_registered", "the registered subtract",
         'resolve("subtract")(model("sd1.safetensors"), model("sd1_b.safetensors"))'),
        ("fallback_registered", "the registered fallback",
         'resolve("fallback")(model("sd1_unet.safetensors"), model("sd1.safetensors"))'),
        ("cast_registered", "cast(a, device=None, dtype=\"bfloat16\") through the registered method",
         'sd_mecha.cast(model("sd1.safetensors"), device=None, dtype="bfloat16")'),
        ("cast_defaults", "cast(a) with both defaults (None)",
         'sd_mecha.cast(model("sd1.safetensors"))'),
        ("clamp_kwonly", "clamp(a, b, c, stiffness=0.5): varargs then a keyword-only parameter",
         'sd_mecha.clamp(model("sd1.safetensors"), model("sd1_b.safetensors"), model("sd1_c.safetensors"), stiffness=0.5)'),
        ("clamp_kwonly_default", "clamp(a, b, c): the keyword-only default stiffness=0.0 is written as `stiffness=&N`",
         'sd_mecha.clamp(model("sd1.safetensors"), model("sd1_b.safetensors"), model("sd1_c.safetensors"))'),
        ("clamp_single_bound", "clamp with one bound",
         'sd_mecha.clamp(sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=1.5), model("sd1_c.safetensors"))'),
        ("n_average_3", "n_average of 3 models (varargs)",
         'sd_mecha.n_average(model("sd1.safetensors"), model("sd1_b.safetensors"), model("sd1_c.safetensors"))'),
        ("n_average_repeat", "n_average with the same model node twice",
         'a = model("sd1.safetensors")\n'
         'sd_mecha.n_average(a, model("sd1_b.safetensors"), a)'),
        ("pick_component", "pick_component(a, \"diffuser\")",
         'sd_mecha.pick_component(model("sd1.safetensors"), "diffuser")'),
        ("omit_component", "omit_component(a, \"clip_l\")",
         'sd_mecha.omit_component(model("sd1.safetensors"), "clip_l")'),
        ("pick_component_escape", "a string with a double quote and a backslash (escaped in the text)",
         'sd_mecha.pick_component(model("sd1.safetensors"), "we\\"ird\\\\name")'),
        ("string_with_equals", "a string value containing `=` and a space",
         'sd_mecha.pick_component(model("sd1.safetensors"), "a=b c")'),

        # --- shared sub-graphs --------------------------------------------------------------
        ("shared_subtract", "the same subtract node used twice",
         'd = model("sd1_b.safetensors") - model("sd1_c.safetensors")\n'
         'sd_mecha.weighted_sum(model("sd1.safetensors") + d, resolve("add_difference")(model("sd1.safetensors"), d, alpha=0.5))'),
        ("shared_model_operators", "one model node used at three places",
         'a = model("sd1.safetensors")\n'
         'a + (model("sd1_b.safetensors") - a) * 0.5 | a'),

        ("structural_literal_equality", "literals with both a config and a merge space compare by value: 1 == 1.0, so the second collapses into the first",
         'a = model("sd1.safetensors")\n'
         'one_f = resolve("convert_singleton")(sd_mecha.literal(1.0, merge_space="param"))\n'
         'one_i = resolve("convert_singleton")(sd_mecha.literal(1, merge_space="param"))\n'
         'sd_mecha.weighted_sum(sd_mecha.weighted_sum(a, model("sd1_b.safetensors"), alpha=one_f), model("sd1_c.safetensors"), alpha=one_i)'),
        ("structural_model_equality", "the same file with and without an explicit config: one `model` line",
         'sd_mecha.weighted_sum(model("sd1.safetensors", config="sd1-ldm"), model("sd1.safetensors"), alpha=0.5)'),

        # --- block dicts / conversions ------------------------------------------------------
        ("blocks_sd1_float", "sd_mecha.convert(26 sd1 block floats, a) as alpha",
         'a = model("sd1.safetensors")\n'
         f'sd_mecha.weighted_sum(a, model("sd1_b.safetensors"), alpha=sd_mecha.convert({SD1_BLOCKS_FLOAT}, a))'),
        ("blocks_sd1_int", "sd_mecha.convert(26 sd1 block ints, a) as alpha",
         'a = model("sd1.safetensors")\n'
         f'sd_mecha.weighted_sum(a, model("sd1_b.safetensors"), alpha=sd_mecha.convert({SD1_BLOCKS_INT}, a))'),
        ("blocks_sd1_fallback", "sd1 blocks converted then `| 1.0`",
         'a = model("sd1.safetensors")\n'
         f'sd_mecha.weighted_sum(a, model("sd1_b.safetensors"), alpha=sd_mecha.convert({SD1_BLOCKS_FLOAT}, a) | 1.0)'),
        ("blocks_sd1_partial_fallback", "a partial sd1 blocks dict (2 blocks) converted then `| 0.0`",
         'a = model("sd1.safetensors")\n'
         'sd_mecha.weighted_sum(a, model("sd1_b.safetensors"), alpha=sd_mecha.convert({"IN00": 0.5, "OUT11": 1}, a) | 0.0)'),
        ("blocks_sd1_config_id", "sd_mecha.convert(blocks, \"sd1-ldm\") (target given as a config id)",
         f'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), alpha=sd_mecha.convert({SD1_BLOCKS_FLOAT}, "sd1-ldm"))'),
        ("blocks_float_formats", "block values with many float spellings (repr of -0.0, 1e-06, 1e+16, 5e-324, ...)",
         'a = model("sd1.safetensors")\n'
         f'sd_mecha.weighted_sum(a, model("sd1_b.safetensors"), alpha=sd_mecha.convert({SD1_BLOCKS_FLOAT_FORMATS}, a))'),
        ("blocks_sdxl", "sd_mecha.convert(21 sdxl block floats, a) as alpha",
         'a = model("sdxl.safetensors")\n'
         f'sd_mecha.weighted_sum(a, model("sdxl_b.safetensors"), alpha=sd_mecha.convert({SDXL_BLOCKS_FLOAT}, a))'),
        ("blocks_registered_converter", "convert_sd1_blocks_to_ldm called by name on a blocks literal",
         f'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), '
         f'alpha=resolve("convert_sd1_blocks_to_ldm")(sd_mecha.literal({SD1_BLOCKS_FLOAT}, config="sd1-supermerger_blocks")))'),
        ("convert_singleton_registered", "convert_singleton called by name on a singleton literal",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), '
         'alpha=resolve("convert_singleton")(sd_mecha.literal(0.75)))'),

        # --- model variants -----------------------------------------------------------------
        ("unet_only", "two UNet-only sd1 files",
         'sd_mecha.weighted_sum(model("sd1_unet.safetensors"), model("sd1_unet_b.safetensors"))'),
        ("unet_only_explicit_config", "a UNet-only file with an explicit config",
         'model("sd1_unet.safetensors", config="sd1-ldm")'),
        ("aliased", "a file that uses the old CLIP key names (aliases)",
         'sd_mecha.weighted_sum(model("sd1_aliased.safetensors"), model("sd1.safetensors"))'),
        ("no_optional", "a file without the optional keys",
         'sd_mecha.weighted_sum(model("sd1_no_optional.safetensors"), model("sd1.safetensors"))'),
        ("partial_clip_vae", "a file with only clip_l and vae merged with a full one",
         'sd_mecha.weighted_sum(model("sd1_clip_vae.safetensors"), model("sd1.safetensors"))'),
        ("unknown_arch", "an unknown architecture (structural config)",
         'sd_mecha.weighted_sum(model("unknown_a.safetensors"), model("unknown_b.safetensors"), alpha=0.3)'),
        ("unknown_arch_single", "an unknown-architecture model alone",
         'model("unknown_a.safetensors")'),
        ("sdxl_weighted_sum", "sdxl weighted sum",
         'sd_mecha.weighted_sum(model("sdxl.safetensors"), model("sdxl_b.safetensors"), alpha=0.4)'),
        ("sdxl_add_difference", "sdxl `a + (b - c)`",
         'model("sdxl.safetensors") + (model("sdxl_b.safetensors") - model("sdxl_c.safetensors"))'),
        ("sdxl_unet_fallback", "an sdxl UNet-only file falling back to a full one",
         'model("sdxl_unet.safetensors") | model("sdxl.safetensors")'),
        ("flux_weighted_sum", "flux diffusers written by alias",
         'sd_mecha.weighted_sum(model("flux.safetensors"), model("flux_b.safetensors"), alpha=0.5)'),
        ("lora_sdxl_model", "an sdxl kohya lora file as a plain model",
         'model("lora_sdxl.safetensors")'),
        ("lora_sd1_model", "an sd1 kohya lora file as a plain model",
         'model("lora_sd1.safetensors")'),
        ("path_with_space", "a path with a space",
         'sd_mecha.weighted_sum(model("sd1 copy.safetensors"), model("sd1.safetensors"))'),
        ("path_with_equals", "a path with `=` (sd-mecha's parser splits it as a keyword argument)",
         'sd_mecha.weighted_sum(model("a=b.safetensors"), model("sd1.safetensors"))'),

        # --- a merge method defined here ------------------------------------------------------
        ("golden_mix_default", "golden_mix(a, b): keyword-only k with its default 0.25",
         GOLDEN_MIX_SIGNATURE + 'golden_mix(model("sd1.safetensors"), model("sd1_b.safetensors"))'),
        ("golden_mix_explicit", "golden_mix(a, b, k=0.75)",
         GOLDEN_MIX_SIGNATURE + 'golden_mix(model("sd1.safetensors"), model("sd1_b.safetensors"), k=0.75)'),
        ("golden_mix_nested", "golden_mix on sub-recipes, k=1 (an int; sd-mecha's round trip merges it with an earlier 1.0)",
         GOLDEN_MIX_SIGNATURE + 'golden_mix(model("sd1.safetensors") + (model("sd1_b.safetensors") - model("sd1_c.safetensors")), '
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_c.safetensors")), k=1)'),

        # --- recipes sd-mecha rejects ----------------------------------------------------------
        ("error_add_two_weights", "`a + b` with two weight models: merge-space error",
         'model("sd1.safetensors") + model("sd1_b.safetensors")'),
        ("error_unknown_config", "an unknown config id",
         'model("sd1.safetensors", config="sd1-nope")'),
        ("error_unknown_merge_space", "an unknown merge space",
         'model("sd1.safetensors", merge_space="latent")'),
        ("error_missing_file", "a file that does not exist",
         'model("missing.safetensors")'),
        ("error_wrong_config", "an sd1 file declared as sdxl-sgm",
         'model("sd1.safetensors", config="sdxl-sgm")'),
        ("error_missing_mandatory_key", "an sd1 file missing one mandatory key",
         'model("sd1_missing_key.safetensors")'),
        ("error_sd1_with_sdxl", "weighted_sum of an sd1 and an sdxl model",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sdxl.safetensors"))'),
        ("error_weight_with_delta", "weighted_sum of a weight model and a delta",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors") - model("sd1_c.safetensors"))'),
        ("error_subtract_delta", "subtract of a delta (subtract wants weights)",
         'sd_mecha.subtract(model("sd1.safetensors") - model("sd1_b.safetensors"), model("sd1.safetensors"))'),
        ("error_literal_no_merge_space", "a scalar literal root without a merge space",
         'sd_mecha.literal(0.5)'),
        ("error_pick_unknown_method", "an unknown merge method name",
         'resolve("weighted_summ")(model("sd1.safetensors"), model("sd1_b.safetensors"))'),
        ("error_too_many_args", "too many positional arguments",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), 0.5, 0.5)'),
        ("error_unknown_keyword", "an unknown keyword argument",
         'sd_mecha.weighted_sum(model("sd1.safetensors"), model("sd1_b.safetensors"), beta=0.5)'),
        ("error_golden_mix_positional_k", "golden_mix's keyword-only k passed positionally",
         GOLDEN_MIX_SIGNATURE + 'golden_mix(model("sd1.safetensors"), model("sd1_b.safetensors"), 0.75)'),
    ]


def run_code(code, namespace):
    tree = ast.parse(code, mode="exec")
    last = tree.body[-1]
    assert isinstance(last, ast.Expr), code
    body = ast.Module(body=tree.body[:-1], type_ignores=[])
    exec(compile(body, "<case>", "exec"), namespace)
    return eval(compile(ast.Expression(last.value), "<case>", "eval"), namespace)


def first_line(text):
    lines = str(text).splitlines()
    return lines[0] if lines else ""


def error_text(e, directory):
    return f"{type(e).__name__}: {first_line(e)}".replace(directory, "{dir}")


def run_case(case_id, description, code, directory):
    namespace = {
        "os": os,
        "torch": torch,
        "sd_mecha": sd_mecha,
        "Tensor": Tensor,
        "Parameter": Parameter,
        "Return": Return,
        "DIR": directory,
        "model": lambda name, **kwargs: sd_mecha.model(os.path.join(directory, name), **kwargs),
        "resolve": resolve,
        "golden_mix": golden_mix,
    }
    out = OrderedDict(id=case_id, description=description, python=code)
    try:
        recipe = run_code(code, namespace)
        text = sd_mecha.serialize(recipe)
    except Exception as e:
        out.update(text=None, error=error_text(e, directory), roundtrip=None, roundtrip_error=None)
        out.update(lenient_text=None, lenient_error=None)
        # what sd_mecha.merge() (strict_mandatory_keys=False by default) would accept and embed
        try:
            recipe = run_code(code, namespace)
            with sd_mecha.open_graph(recipe) as graph:
                root = graph.finalize_root(model_config_preference=("singleton-mecha",), check_mandatory_keys=False)
            out["lenient_text"] = sd_mecha.serialize(root, finalize=False).replace(directory, "{dir}")
        except Exception as e2:
            out["lenient_error"] = error_text(e2, directory)
        return out

    out.update(text=text.replace(directory, "{dir}"), error=None)
    try:
        again = sd_mecha.serialize(sd_mecha.deserialize(text))
        out.update(roundtrip=again == text, roundtrip_error=None)
        if again != text:
            out["roundtrip_error"] = "re-serialized text differs"
    except Exception as e:
        out.update(roundtrip=False, roundtrip_error=error_text(e, directory))
    out.update(lenient_text=None, lenient_error=None)
    return out


# ---------------------------------------------------------------------------------------------

def generate():
    models = build_models()
    directory = os.path.realpath(tempfile.mkdtemp(prefix="sd-mecha-golden-"))
    try:
        write_models(directory, models)
        inference = OrderedDict((name, infer(os.path.join(directory, name), directory)) for name in models)
        cases = [run_case(*c, directory) for c in case_list()]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return models, inference, cases


def dump_json(value):
    return json.dumps(value, indent=1, ensure_ascii=False) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args()

    logging.disable(logging.WARNING)  # sd-mecha warns about extra keys; not part of the data
    version = getattr(sd_mecha, "__version__", None)
    try:
        from importlib.metadata import version as dist_version
        version = dist_version("sd-mecha")
    except Exception:
        pass
    if version != EXPECTED_SD_MECHA_VERSION:
        print(f"warning: sd-mecha {version} found, the golden data is meant for {EXPECTED_SD_MECHA_VERSION}", file=sys.stderr)

    started = time.monotonic()
    models, inference, cases = generate()

    args.out.mkdir(parents=True, exist_ok=True)
    models_json = json.dumps(models, separators=(",", ":"), ensure_ascii=False).encode()
    (args.out / "models.json.gz").write_bytes(gzip.compress(models_json, compresslevel=9, mtime=0))
    (args.out / "inference.json").write_text(dump_json(inference))
    (args.out / "cases.json").write_text(dump_json(cases))

    n_err = sum(c["error"] is not None for c in cases)
    n_rt = sum(c["roundtrip"] is False for c in cases)
    print(
        f"{len(models)} model files, {len(cases)} cases ({n_err} errors, {n_rt} failing sd-mecha's own round trip) "
        f"in {time.monotonic() - started:.1f}s -> {args.out}"
    )


if __name__ == "__main__":
    main()
