#!/usr/bin/env python3
"""Generate golden merge results from the real sd-mecha 1.1.8 for the merge methods.

Run from the repository root, outside CI:

    bench/.venv/bin/python scripts/golden/methods.py

(`bench/setup-reference.sh` installs sd-mecha 1.1.8 + torch into bench/.venv.)

Writes into __test__/fixtures/golden/methods/:

* inputs/<name>.safetensors   small deterministic float32 models (float16 for f16.safetensors) of
                              an unknown architecture, so sd-mecha's config inference falls back
                              to "structural". Every file has the keys
                              t0d [], t1d [8], t2d [6, 5], conv [4, 3, 3, 3], conv1x1 [4, 3, 1, 1]
                              and wide [3, 7].
* outputs/<case id>.safetensors  what sd_mecha.merge() returned for the case (float32).
* cases.json                  [{"id", "description", "python", "text", "output", "keys", "shapes", "options",
                              "tolerance", "atol", "wrapper"?}] (see scripts/golden/README.md).

The "python" field of a case is the exact code that was evaluated (the value of its last
expression is the recipe), with these names in scope:

    import os, torch, sd_mecha
    DIR = os.path.realpath(tempfile.mkdtemp())            # copies of inputs/ live here
    def model(name, **kwargs):                            # an input file by name
        return sd_mecha.model(os.path.join(DIR, name), **kwargs)
    resolve = sd_mecha.extensions.merge_methods.resolve   # the registered (non-wrapper) methods

Each result is `sd_mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=torch.float32,
threads=0, output=None, **options)` without its "__metadata__" entry.

The output is deterministic: a run in a fresh process writes the same bytes.
"""

import argparse
import ast
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from collections import OrderedDict

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars

import torch
from safetensors.torch import load_file, save_file

import sd_mecha

from generate import run_code  # the sibling script: evaluates a case, returns its last expression

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT_DIR = REPO_ROOT / "__test__" / "fixtures" / "golden" / "methods"
EXPECTED_SD_MECHA_VERSION = "1.1.8"

resolve = sd_mecha.extensions.merge_methods.resolve

# tolerances the TypeScript test applies: |x - y| <= max(tolerance * |y|, atol)
RTOL = 1e-5
ATOL = 1e-6
# crossover goes through an FFT round trip (rfftn -> filter -> irfftn): every output element
# carries rounding error of the order of eps * (the tensor's norm), not of its own magnitude
FFT_RTOL = 1e-4
FFT_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# input models
# ---------------------------------------------------------------------------------------------

SHAPES = OrderedDict(
    t0d=[],
    t1d=[8],
    t2d=[6, 5],
    conv=[4, 3, 3, 3],
    conv1x1=[4, 3, 1, 1],
    wide=[3, 7],
)
INPUT_NAMES = ("base", "a", "b", "c", "same", "f16", "nan")


def build_inputs():
    """name -> {key: tensor}. a and b are fine-tunes of base (base + 0.1 * noise), c is an
    unrelated model, same is an exact copy of a, f16 is a stored as float16, nan is a with one
    NaN in t2d."""
    g = torch.Generator().manual_seed(20240611)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def positive_0d(sd):
        sd["t0d"] = sd["t0d"].abs() + 0.25
        return sd

    def fine_tune(base):
        noise = positive_0d(OrderedDict((k, randn(v.shape)) for k, v in base.items()))
        return OrderedDict((k, v + 0.1 * noise[k]) for k, v in base.items())

    # The 0-D values of all models, and of the deltas a - base and b - base, have one sign:
    # slerp of two antipodal 0-D tensors divides by sin(float32(pi)) ~ -8.7e-8 and returns
    # rounding noise (see the README), which no other implementation can reproduce.
    base = positive_0d(OrderedDict((k, randn(s)) for k, s in SHAPES.items()))
    a = fine_tune(base)
    b = fine_tune(base)
    c = positive_0d(OrderedDict((k, randn(s)) for k, s in SHAPES.items()))
    same = OrderedDict((k, v.clone()) for k, v in a.items())
    f16 = OrderedDict((k, v.to(torch.float16)) for k, v in a.items())
    nan = OrderedDict((k, v.clone()) for k, v in a.items())
    nan["t2d"][2, 3] = float("nan")
    models = OrderedDict(base=base, a=a, b=b, c=c, same=same, f16=f16, nan=nan)
    assert tuple(models) == INPUT_NAMES
    for sd in models.values():
        assert list(sd) == list(SHAPES)
        for k, v in sd.items():
            assert list(v.shape) == SHAPES[k], k
    return models


def write_inputs(directory, models):
    for name, sd in models.items():
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, os.path.join(directory, f"{name}.safetensors"))


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------

NAME_RE = re.compile(r"(?<![\"\w.])(" + "|".join(INPUT_NAMES) + r")\b(?![\".]|\s*=)")


def code(expr, param=()):
    """The case code for `expr`, which uses the input names (a, b, base, ...) as variables:
    one line binding each name used to its model node, then the expression. Names in `param`
    are loaded in param space (as get_dtype and get_device want)."""
    used = []
    for name in NAME_RE.findall(expr):
        if name not in used:
            used.append(name)
    used.sort(key=INPUT_NAMES.index)
    lines = []
    for name in used:
        kwargs = ', merge_space="param"' if name in param else ""
        lines.append(f'{name} = model("{name}.safetensors"{kwargs})')
    return "\n".join(lines + [expr])


def case(case_id, description, expr, *, options=None, tolerance=RTOL, atol=ATOL, param=(), wrapper=None):
    out = OrderedDict(id=case_id, description=description, python=code(expr, param))
    out["options"] = options or {}
    out["tolerance"] = tolerance
    out["atol"] = atol
    if wrapper is not None:
        out["wrapper"] = wrapper
    return out


def wrapper(name, args, **kwargs):
    return OrderedDict(name=name, args=list(args), kwargs=OrderedDict(kwargs))


def wrapper_case(case_id, description, name, args, kwargs, **extra):
    """A call of one of sd-mecha's Python wrappers on input files."""
    parts = list(args) + [f"{k}={v!r}" for k, v in kwargs.items()]
    expr = f"sd_mecha.{name}({', '.join(parts)})"
    return case(case_id, description, expr, wrapper=wrapper(name, args, **kwargs), **extra)


NO_OMIT = {"omit_non_finite_inputs": False}


def case_list():
    cases = []
    add = cases.append

    # --- slerp --------------------------------------------------------------------------------
    add(case("slerp_default", "slerp(a, b) of two fine-tunes, default alpha 0.5 (the 0-D key hits the NaN fallback to lerp)",
             'resolve("slerp")(a, b)'))
    for alpha, tag in ((0.0, "alpha0"), (1.0, "alpha1"), (0.3, "alpha03")):
        add(case(f"slerp_{tag}", f"slerp(a, b, alpha={alpha!r}) (slerp has no alpha shortcut)",
                 f'resolve("slerp")(a, b, alpha={alpha!r})'))
    add(case("slerp_unrelated", "slerp(a, c, alpha=0.7) of unrelated models",
             'resolve("slerp")(a, c, alpha=0.7)'))
    add(case("slerp_identical", "slerp(a, same) of identical inputs (omega = 0: NaN fallback to lerp, or omega ~ 3e-4 from rounding)",
             'resolve("slerp")(a, same, alpha=0.3)'))
    add(case("slerp_deltas", "slerp of two deltas sharing base, added back to base",
             'resolve("add_difference")(base, resolve("slerp")(a - base, b - base, alpha=0.4))'))

    # --- perpendicular_component ------------------------------------------------------------------
    add(case("perpendicular_deltas", "add_difference(a, perpendicular_component(a - base, b - base))",
             'resolve("add_difference")(a, resolve("perpendicular_component")(a - base, b - base))'))
    add(case("perpendicular_deltas_alpha05", "add_difference(a, perpendicular_component(a - base, b - base), alpha=0.5)",
             'resolve("add_difference")(a, resolve("perpendicular_component")(a - base, b - base), alpha=0.5)'))
    add(case("perpendicular_identical", "perpendicular_component of identical deltas (a - base, same - base): ~0",
             'resolve("add_difference")(a, resolve("perpendicular_component")(a - base, same - base))'))
    add(case("perpendicular_zero_norm", "perpendicular_component of a zero delta (a - same): 0/0 gives NaN, replaced by zeros",
             'resolve("add_difference")(a, resolve("perpendicular_component")(a - same, b - base))'))
    add(case("perpendicular_weights", "perpendicular_component(a, b) directly on weights (its spaces are generic)",
             'resolve("perpendicular_component")(a, b)'))

    # --- geometric_sum ----------------------------------------------------------------------------
    add(case("geometric_sum_default", "geometric_sum(a, b), default alpha 0.5 (complex power: negative values give real parts of complex roots)",
             'resolve("geometric_sum")(a, b)'))
    for alpha, tag in ((0.0, "alpha0"), (1.0, "alpha1"), (0.25, "alpha025")):
        add(case(f"geometric_sum_{tag}", f"geometric_sum(a, b, alpha={alpha!r})",
                 f'resolve("geometric_sum")(a, b, alpha={alpha!r})'))
    add(case("geometric_sum_unrelated", "geometric_sum(a, c, alpha=0.5): signs differ, so cos(pi * alpha) factors appear",
             'resolve("geometric_sum")(a, c, alpha=0.5)'))
    add(case("geometric_sum_identical", "geometric_sum(a, same, alpha=0.3)",
             'resolve("geometric_sum")(a, same, alpha=0.3)'))
    add(case("geometric_sum_deltas", "geometric_sum of deltas sharing base, added to base",
             'resolve("add_difference")(base, resolve("geometric_sum")(a - base, b - base, alpha=0.5))'))

    # --- multiply_quotient ------------------------------------------------------------------------
    add(case("multiply_quotient_default", "multiply_quotient(a, b, base), default alpha 1.0",
             'resolve("multiply_quotient")(a, b, base)'))
    for alpha, tag in ((0.0, "alpha0"), (0.5, "alpha05")):
        add(case(f"multiply_quotient_{tag}", f"multiply_quotient(a, b, base, alpha={alpha!r})",
                 f'resolve("multiply_quotient")(a, b, base, alpha={alpha!r})'))
    add(case("multiply_quotient_unrelated_c", "multiply_quotient(a, b, c) with an unrelated c",
             'resolve("multiply_quotient")(a, b, c)'))
    add(case("multiply_quotient_identical", "multiply_quotient(a, same, base): the mask is 0, so a",
             'resolve("multiply_quotient")(a, same, base)'))
    add(case("multiply_quotient_all_same", "multiply_quotient(a, same, a): 0/0 in the mask, replaced by 0",
             'resolve("multiply_quotient")(a, same, a)'))

    # --- masks (param space: used as alpha) -------------------------------------------------------
    for method in ("train_difference_mask", "add_opposite_mask", "add_strict_opposite_mask"):
        short = {"train_difference_mask": "tdm", "add_opposite_mask": "aom", "add_strict_opposite_mask": "asom"}[method]
        add(case(f"{short}_add_difference", f"add_difference(a, b - base, alpha={method}(a, b, base)) (the mask returns param)",
                 f'resolve("add_difference")(a, b - base, alpha=resolve("{method}")(a, b, base))'))
        add(case(f"{short}_alpha05", f"{method}(a, b, base, alpha=0.5) as add_difference's alpha",
                 f'resolve("add_difference")(a, b - base, alpha=resolve("{method}")(a, b, base, alpha=0.5))'))
        add(case(f"{short}_alpha0", f"{method}(a, b, base, alpha=0.0): an all-zero mask tensor, so a",
                 f'resolve("add_difference")(a, b - base, alpha=resolve("{method}")(a, b, base, alpha=0.0))'))
        add(case(f"{short}_weighted_sum", f"weighted_sum(a, b, alpha={method}(a, b, c)) with an unrelated c",
                 f'resolve("weighted_sum")(a, b, alpha=resolve("{method}")(a, b, c))'))
        add(case(f"{short}_identical", f"{method}(a, same, base) as alpha",
                 f'resolve("add_difference")(a, b - base, alpha=resolve("{method}")(a, same, base))'))
        add(case(f"{short}_all_same", f"{method}(a, same, a): 0/0 everywhere, replaced by 0",
                 f'resolve("add_difference")(a, b - base, alpha=resolve("{method}")(a, same, a))'))

    # --- add_cosine_a / add_cosine_b --------------------------------------------------------------
    for method in ("add_cosine_a", "add_cosine_b"):
        add(case(f"{method}_default", f"{method}(a, b), default alpha 1.0 (k = 1: b)",
                 f'resolve("{method}")(a, b)'))
        for alpha, tag in ((0.0, "alpha0"), (0.5, "alpha05"), (0.99, "alpha099")):
            add(case(f"{method}_{tag}", f"{method}(a, b, alpha={alpha!r})",
                     f'resolve("{method}")(a, b, alpha={alpha!r})'))
        add(case(f"{method}_unrelated", f"{method}(a, c, alpha=0.2) of unrelated models",
                 f'resolve("{method}")(a, c, alpha=0.2)'))
        add(case(f"{method}_identical", f"{method}(a, same, alpha=0.3)",
                 f'resolve("{method}")(a, same, alpha=0.3)'))

    # --- crossover ---------------------------------------------------------------------------------
    fft = dict(tolerance=FFT_RTOL, atol=FFT_ATOL)
    fft_note = " Looser tolerance: FFT round trip (rfftn/irfftn) rounding is relative to the tensor's norm."
    add(case("crossover_default", "crossover(a, b): defaults alpha 0.5, tilt 0.0. The step filter `mesh > 1 - alpha` meets exact "
             "ties here: some mesh values of t1d, conv and conv1x1 are exactly 0.5 and stay on the a side." + fft_note,
             'resolve("crossover")(a, b)', **fft))
    for tilt in (0.0, 0.5, 1.0, 1.3, 2.0, 2.5, 3.5, 4.0, -0.5):
        tag = str(tilt).replace("-", "m").replace(".", "")
        note = {
            1.0: " tilt 1 is the lerp shortcut.",
            2.0: " tilt 2: the inverted step filter.",
            2.5: " tilt in (2, 3]: alpha is inverted.",
            4.0: " tilt 4 normalizes to 0.",
            -0.5: " tilt -0.5 normalizes to 3.5.",
        }.get(tilt, "")
        tol = {} if tilt == 1.0 else fft
        add(case(f"crossover_alpha03_tilt{tag}", f"crossover(a, b, alpha=0.3, tilt={tilt!r}).{note}{fft_note if tol else ''}",
                 f'resolve("crossover")(a, b, alpha=0.3, tilt={tilt!r})', **tol))
    for alpha, tag in ((0.0, "alpha0"), (1.0, "alpha1")):
        add(case(f"crossover_{tag}_tilt05", f"crossover(a, b, alpha={alpha!r}, tilt=0.5): the alpha shortcut returns {'a' if alpha == 0 else 'b'}",
                 f'resolve("crossover")(a, b, alpha={alpha!r}, tilt=0.5)'))
    add(case("crossover_alpha07_tilt13", "crossover(a, b, alpha=0.7, tilt=1.3)." + fft_note,
             'resolve("crossover")(a, b, alpha=0.7, tilt=1.3)', **fft))
    add(case("crossover_unrelated", "crossover(a, c, alpha=0.3, tilt=0.5) of unrelated models." + fft_note,
             'resolve("crossover")(a, c, alpha=0.3, tilt=0.5)', **fft))
    add(case("crossover_identical", "crossover(a, same, alpha=0.3, tilt=0.5): allclose inputs take the lerp shortcut",
             'resolve("crossover")(a, same, alpha=0.3, tilt=0.5)'))
    add(case("crossover_deltas", "crossover of deltas sharing base, added to base." + fft_note,
             'resolve("add_difference")(base, resolve("crossover")(a - base, b - base, alpha=0.3, tilt=0.5))', **fft))

    # --- tensor_sum / top_k_tensor_sum (registered) -----------------------------------------------
    regions = [
        (0.5, 0.0, "tensor_sum's default width"),
        (0.25, 0.5, "inside [0, 1]"),
        (0.5, 0.75, "wrapped: offset + width > 1"),
        (0.7, 0.6, "wrapped: offset + width > 1"),
        (1.0, 0.0, "the whole tensor"),
        (0.0, 0.0, "empty"),
        (0.5, 0.3125, "for t1d (8 rows, 8 elements) start and end are 2.5 and 6.5: Python's round() rounds half to even, to 2 and 6"),
        (-0.25, 0.5, "a negative width moves the offset"),
        (0.3, -0.2, "a negative offset wraps"),
    ]
    for method, short in (("tensor_sum", "tensor_sum"), ("top_k_tensor_sum", "top_k")):
        for width, offset, note in regions:
            tag = f"w{width}_o{offset}".replace("-", "m").replace(".", "")
            add(case(f"{short}_{tag}", f"{method}(a, b, width={width!r}, offset={offset!r}): {note}",
                     f'resolve("{method}")(a, b, width={width!r}, offset={offset!r})'))
        add(case(f"{short}_defaults", f"{method}(a, b) with its defaults",
                 f'resolve("{method}")(a, b)'))
        add(case(f"{short}_identical", f"{method}(a, same, width=0.5, offset=0.25)",
                 f'resolve("{method}")(a, same, width=0.5, offset=0.25)'))
        add(case(f"{short}_unrelated", f"{method}(a, c, width=0.5, offset=0.25)",
                 f'resolve("{method}")(a, c, width=0.5, offset=0.25)'))

    # --- get_dtype / get_device (string results in param space) -----------------------------------
    add(case("get_dtype_cast", "cast(a, dtype=get_dtype(f16)) with f16 loaded in param space (get_dtype's input must be in param space): "
             "merge() casts every input to merge_dtype first, so get_dtype sees float32 and a is unchanged",
             'resolve("cast")(a, dtype=resolve("get_dtype")(f16))', param=("f16",)))
    add(case("get_dtype_of_cast", "cast(a, dtype=get_dtype(cast(f16, dtype=\"float16\"))): get_dtype returns \"float16\", a is rounded to float16",
             'resolve("cast")(a, dtype=resolve("get_dtype")(resolve("cast")(f16, dtype="float16")))', param=("f16",)))
    add(case("get_device_cast", "cast(a, device=get_device(b)) with b in param space: \"cpu\", a unchanged",
             'resolve("cast")(a, device=resolve("get_device")(b))', param=("b",)))

    # --- stack ---------------------------------------------------------------------------------------
    add(case("stack_two", "stack(a, b): a new leading dimension of 2 (t0d becomes [2])",
             'resolve("stack")(a, b)'))
    add(case("stack_three", "stack(a, b, c): a new leading dimension of 3",
             'resolve("stack")(a, b, c)'))
    add(case("stack_one", "stack(a): a new leading dimension of 1",
             'resolve("stack")(a)'))

    # --- omit_non_finite -------------------------------------------------------------------------------
    add(case("omit_non_finite_nan", "omit_non_finite(nan) with omit_non_finite_inputs=False: the method drops t2d",
             'resolve("omit_non_finite")(nan)', options=NO_OMIT))
    add(case("omit_non_finite_finite", "omit_non_finite(a) with omit_non_finite_inputs=False: every key",
             'resolve("omit_non_finite")(a)', options=NO_OMIT))
    add(case("omit_non_finite_in_weighted_sum", "weighted_sum(omit_non_finite(nan), b) with omit_non_finite_inputs=False: t2d dropped",
             'resolve("weighted_sum")(resolve("omit_non_finite")(nan), b, alpha=0.5)', options=NO_OMIT))
    add(case("omit_non_finite_fallback", "fallback(omit_non_finite(nan), b) with omit_non_finite_inputs=False: t2d from b",
             'resolve("fallback")(resolve("omit_non_finite")(nan), b)', options=NO_OMIT))
    add(case("nan_passthrough", "weighted_sum(nan, b) with omit_non_finite_inputs=False: the NaN reaches the output",
             'resolve("weighted_sum")(nan, b, alpha=0.5)', options=NO_OMIT))
    add(case("nan_default_omitted", "weighted_sum(nan, b) with the default omit_non_finite_inputs=True: t2d dropped",
             'resolve("weighted_sum")(nan, b, alpha=0.5)'))

    # --- Python wrappers ------------------------------------------------------------------------------
    W = wrapper_case
    add(W("wrapper_add_difference_abc", "sd_mecha.add_difference(a, b, base): subtract, add_difference, then `| a`",
          "add_difference", ["a", "b", "base"], {}))
    add(W("wrapper_add_difference_alpha05", "sd_mecha.add_difference(a, b, base, alpha=0.5)",
          "add_difference", ["a", "b", "base"], {"alpha": 0.5}))
    add(W("wrapper_add_difference_alpha0", "sd_mecha.add_difference(a, b, base, alpha=0.0): the alpha shortcut",
          "add_difference", ["a", "b", "base"], {"alpha": 0.0}))
    add(W("wrapper_add_difference_clamp", "sd_mecha.add_difference(a, b, base, alpha=0.5, clamp_to_ab=True): clamp(res, a, b) | a",
          "add_difference", ["a", "b", "base"], {"alpha": 0.5, "clamp_to_ab": True}))
    add(W("wrapper_add_difference_clamp_alpha2", "sd_mecha.add_difference(a, b, base, alpha=2.0, clamp_to_ab=True): the clamp is active",
          "add_difference", ["a", "b", "base"], {"alpha": 2.0, "clamp_to_ab": True}))
    add(W("wrapper_add_difference_clamp_false", "sd_mecha.add_difference(a, b, c, alpha=0.3, clamp_to_ab=False) with an unrelated c",
          "add_difference", ["a", "b", "c"], {"alpha": 0.3, "clamp_to_ab": False}))
    add(case("wrapper_add_difference_delta_model",
             "sd_mecha.add_difference(a, b_delta, alpha=0.5) with c=None and b a model node declared in delta space "
             "(works: both a and b carry a merge space; with b a merge node such as `b - base` the wrapper crashes, see the README)",
             'sd_mecha.add_difference(a, model("b.safetensors", merge_space="delta"), alpha=0.5)',
             wrapper=wrapper("add_difference", ["a", {"name": "b", "merge_space": "delta"}], alpha=0.5)))
    add(W("wrapper_add_perpendicular", "sd_mecha.add_perpendicular(a, b, base)",
          "add_perpendicular", ["a", "b", "base"], {}))
    add(W("wrapper_add_perpendicular_alpha05", "sd_mecha.add_perpendicular(a, b, base, alpha=0.5)",
          "add_perpendicular", ["a", "b", "base"], {"alpha": 0.5}))
    add(W("wrapper_add_perpendicular_c_is_a", "sd_mecha.add_perpendicular(a, b, a): a zero delta, perpendicular_component's zeros fallback",
          "add_perpendicular", ["a", "b", "a"], {"alpha": 1.0}))
    add(W("wrapper_copy_region_defaults", "sd_mecha.copy_region(a, b): width 1.0, offset 0.0, top_k False (all of b)",
          "copy_region", ["a", "b"], {}))
    add(W("wrapper_copy_region_wrapped", "sd_mecha.copy_region(a, b, width=0.5, offset=0.75): a wrapped region",
          "copy_region", ["a", "b"], {"width": 0.5, "offset": 0.75}))
    add(W("wrapper_copy_region_c", "sd_mecha.copy_region(a, b, base, width=0.5, offset=0.25): on deltas, added back to base",
          "copy_region", ["a", "b", "base"], {"width": 0.5, "offset": 0.25}))
    add(W("wrapper_copy_region_top_k", "sd_mecha.copy_region(a, b, width=0.5, offset=0.25, top_k=True)",
          "copy_region", ["a", "b"], {"width": 0.5, "offset": 0.25, "top_k": True}))
    add(W("wrapper_copy_region_c_top_k_wrapped", "sd_mecha.copy_region(a, b, base, width=0.5, offset=0.75, top_k=True)",
          "copy_region", ["a", "b", "base"], {"width": 0.5, "offset": 0.75, "top_k": True}))
    add(W("wrapper_copy_region_top_k_false", "sd_mecha.copy_region(a, b, c, width=0.3, offset=0.1, top_k=False)",
          "copy_region", ["a", "b", "c"], {"width": 0.3, "offset": 0.1, "top_k": False}))
    add(W("wrapper_tensor_sum", "sd_mecha.tensor_sum(a, b, width=0.25, offset=0.5): the same wrapper as copy_region",
          "tensor_sum", ["a", "b"], {"width": 0.25, "offset": 0.5}))
    add(W("wrapper_tensor_sum_c_top_k", "sd_mecha.tensor_sum(a, b, base, width=0.7, offset=0.6, top_k=True)",
          "tensor_sum", ["a", "b", "base"], {"width": 0.7, "offset": 0.6, "top_k": True}))
    return cases


# wrapper calls that sd-mecha 1.1.8 can't build: (python, why); checked to still fail
KNOWN_CRASHES = [
    ('sd_mecha.add_difference(a, b - base, alpha=0.5)',
     "a (a model node) has no merge space before finalization and b - base has one: comparing them crashes"),
    ('sd_mecha.add_difference(a, b - base)', "the same crash with the default alpha"),
    ('sd_mecha.add_difference(a, resolve("scale")(b - base, alpha=0.5))', "the same crash with any merge node as b"),
]


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------

def namespace_for(directory):
    return {
        "os": os,
        "torch": torch,
        "sd_mecha": sd_mecha,
        "DIR": directory,
        "model": lambda name, **kwargs: sd_mecha.model(os.path.join(directory, name), **kwargs),
        "resolve": resolve,
    }


def first_line(text):
    lines = str(text).splitlines()
    return lines[0] if lines else ""


def error_text(e, directory):
    return f"{type(e).__name__}: {first_line(e)}".replace(directory, "{dir}")


def do_merge(recipe, dtype, options):
    out = sd_mecha.merge(recipe, merge_dtype=dtype, output_dtype=dtype, threads=0, output=None, **options)
    out.pop("__metadata__", None)
    return out


def worst_excess(got, want, rtol, atol):
    """max over elements of |x - y| / max(rtol * |y|, atol) (<= 1 passes); NaN must match NaN."""
    got = got.double().flatten()
    want = want.double().flatten()
    nan_got, nan_want = got.isnan(), want.isnan()
    if not torch.equal(nan_got, nan_want):
        return math.inf
    keep = ~nan_want
    got, want = got[keep], want[keep]
    if got.numel() == 0:
        return 0.0
    inf = want.isinf()
    if not torch.equal(got[inf], want[inf]):
        return math.inf
    got, want = got[~inf], want[~inf]
    if got.numel() == 0:
        return 0.0
    allowed = torch.clamp(rtol * want.abs(), min=atol)
    return ((got - want).abs() / allowed).max().item()


def run_case(spec, directory, outputs_dir):
    recipe = run_code(spec["python"], namespace_for(directory))
    text = sd_mecha.serialize(recipe)
    assert directory in text, spec["id"]
    result = do_merge(recipe, torch.float32, spec["options"])
    assert result, f"{spec['id']}: empty result"
    tensors = OrderedDict((k, result[k].contiguous().clone()) for k in sorted(result))
    for k, v in tensors.items():
        assert v.dtype == torch.float32, (spec["id"], k, v.dtype)

    # the same recipe built again merges to the same bytes
    again = do_merge(run_code(spec["python"], namespace_for(directory)), torch.float32, spec["options"])
    assert sorted(again) == list(tensors), spec["id"]
    for k, v in tensors.items():
        assert torch.equal(again[k].isnan(), v.isnan()) and torch.equal(again[k].nan_to_num(), v.nan_to_num()), (spec["id"], k)

    # the tolerance is wide enough for an implementation computing in float64: sd-mecha itself
    # with merge_dtype=float64 stays within it (unless the case says why that cannot hold, e.g. a
    # selection by rank whose float64 threshold differs: "no_f64_check"); keys whose result
    # sd-mecha leaves to rounding (see svd.py) are not compared
    excess = 0.0
    ill_posed = spec.get("ill_posed", [])
    if not spec.get("no_f64_check"):
        wide = do_merge(run_code(spec["python"], namespace_for(directory)), torch.float64, spec["options"])
        assert sorted(wide) == list(tensors), spec["id"]
        per_key = {
            k: worst_excess(wide[k], v, spec["tolerance"], spec["atol"]) for k, v in tensors.items() if k not in ill_posed
        }
        excess = max(per_key.values())
        if not excess <= 1:
            bad = ", ".join(f"{k} {e:.3g}x" for k, e in per_key.items() if not e <= 1)
            raise AssertionError(f"{spec['id']}: the float64 merge is outside the tolerance: {bad}")

    name = f"{spec['id']}.safetensors"
    save_file(tensors, os.path.join(outputs_dir, name))

    out = OrderedDict(id=spec["id"], description=spec["description"], python=spec["python"])
    out["text"] = text.replace(directory, "{dir}")
    out["output"] = name
    out["keys"] = list(tensors)
    out["shapes"] = OrderedDict((k, list(v.shape)) for k, v in tensors.items())
    out["options"] = spec["options"]
    out["tolerance"] = spec["tolerance"]
    out["atol"] = spec["atol"]
    if "wrapper" in spec:
        out["wrapper"] = spec["wrapper"]
    if spec.get("no_f64_check"):
        out["no_f64_check"] = spec["no_f64_check"]
    if ill_posed:
        out["ill_posed"] = ill_posed
    return out, excess


def check_known_crashes(directory):
    found = []
    for source, why in KNOWN_CRASHES:
        try:
            run_code(code(source), namespace_for(directory))
        except Exception as e:
            found.append((source, why, error_text(e, directory)))
            continue
        raise AssertionError(f"expected sd-mecha to fail on {source}; update KNOWN_CRASHES and add a case")
    return found


def generate(out_dir):
    models = build_inputs()
    directory = os.path.realpath(tempfile.mkdtemp(prefix="sd-mecha-golden-methods-"))
    inputs_dir = out_dir / "inputs"
    outputs_dir = out_dir / "outputs"
    for d in (inputs_dir, outputs_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    try:
        write_inputs(directory, models)
        for name in INPUT_NAMES:
            shutil.copyfile(os.path.join(directory, f"{name}.safetensors"), inputs_dir / f"{name}.safetensors")
        specs = case_list()
        ids = [s["id"] for s in specs]
        assert len(ids) == len(set(ids)), "duplicate case ids"
        cases, excesses = [], {}
        failures = []
        for spec in specs:
            try:
                out, excess = run_case(spec, directory, str(outputs_dir))
            except Exception as e:
                failures.append(f"{spec['id']}: {error_text(e, directory)}")
                continue
            cases.append(out)
            excesses[spec["id"]] = excess
        if failures:
            raise SystemExit("cases failed:\n  " + "\n  ".join(failures))
        crashes = check_known_crashes(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return cases, excesses, crashes


METHODS_COVERED = [
    "slerp", "perpendicular_component", "geometric_sum", "multiply_quotient", "train_difference_mask",
    "add_opposite_mask", "add_strict_opposite_mask", "add_cosine_a", "add_cosine_b", "crossover",
    "tensor_sum", "top_k_tensor_sum", "get_dtype", "get_device", "stack", "omit_non_finite",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each case's float64 deviation")
    args = parser.parse_args()

    logging.disable(logging.WARNING)  # sd-mecha warns about non-finite outputs; not part of the data
    try:
        from importlib.metadata import version as dist_version
        version = dist_version("sd-mecha")
    except Exception:
        version = getattr(sd_mecha, "__version__", None)
    if version != EXPECTED_SD_MECHA_VERSION:
        print(f"warning: sd-mecha {version} found, the golden data is meant for {EXPECTED_SD_MECHA_VERSION}", file=sys.stderr)
    torch.set_num_threads(1)  # reductions in one fixed order

    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    cases, excesses, crashes = generate(args.out)

    for method in METHODS_COVERED:
        assert any(f'"{method}"' in c["text"] for c in cases), f"no case merges {method}"

    (args.out / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")

    if args.verbose:
        for case_id, excess in excesses.items():
            print(f"  {case_id}: float64 deviation {excess:.3f} of the tolerance")
        for source, why, error in crashes:
            print(f"  sd-mecha fails: {source}\n    {error}\n    ({why})")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(cases)} cases, {len(crashes)} known wrapper crashes, {size / 1024:.0f} KiB in {time.monotonic() - started:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
