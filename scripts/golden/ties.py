#!/usr/bin/env python3
"""Generate golden merge results from the real sd-mecha 1.1.8 for the TIES family (ties.py):
ties_sum, ties_sum_extended, ties_sum_with_dropout, model_stock, geometric_median, dropout, and
the wrappers add_difference_ties(_extended), add_ties_with_dare, n_model_stock and dropout.

Run from the repository root, outside CI:

    bench/.venv/bin/python scripts/golden/ties.py

Writes into __test__/fixtures/golden/ties/ (see scripts/golden/README.md):

* inputs/<name>.safetensors   the small models of methods.py (same generator, same bytes), plus
                              the statistics models s_base (zeros), s_ramp (distinct magnitudes
                              (1+i)/4096 with random signs, shuffled) and s_1, s_2, s_4 (constant
                              1, 2 and 4), each one key "w" [64, 64].
* outputs/<case id>.safetensors  sd_mecha.merge()'s result (float32).
* cases.json                  deterministic cases (compared within a tolerance) and random ones
                              (compared by statistics; "random" says which).

Deterministic cases reuse methods.py's case format and checks (same recipe twice → same bytes;
a float64 merge within the tolerance). Random cases are merged with a fixed seed; for
`dropout` with an overlap that is not an odd integer sd-mecha crashes (`torch.lerp` on NumPy
arrays), so those run with `ties.torch.lerp` replaced by the NumPy lerp it means, and the
subset distribution that sd-mecha's `overlapping_sets_pmf` computes is recorded with them.
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
import types
from collections import OrderedDict

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import methods  # noqa: E402  the sibling script: inputs, case format, merging and checks
from methods import case, code, wrapper, wrapper_case, run_case, do_merge, namespace_for, error_text  # noqa: E402
from generate import run_code  # noqa: E402

import sd_mecha  # noqa: E402
from sd_mecha.extensions.builtin.merge_methods import ties as sd_ties  # noqa: E402

OUT_DIR = methods.REPO_ROOT / "__test__" / "fixtures" / "golden" / "ties"
STATS_SHAPE = [64, 64]
STATS_NAMES = ("s_base", "s_ramp", "s_1", "s_2", "s_4")
SEED = 1234


def build_stats_inputs():
    g = torch.Generator().manual_seed(777)
    n = STATS_SHAPE[0] * STATS_SHAPE[1]
    magnitudes = (torch.arange(n, dtype=torch.float32) + 1) / n
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    ramp = (magnitudes * signs)[torch.randperm(n, generator=g)].reshape(STATS_SHAPE)
    const = lambda v: torch.full(STATS_SHAPE, float(v))
    return OrderedDict(s_base={"w": const(0)}, s_ramp={"w": ramp}, s_1={"w": const(1)}, s_2={"w": const(2)}, s_4={"w": const(4)})


def stats_code(expr, names):
    lines = [f'{n} = model("{n}.safetensors")' for n in names]
    return "\n".join(lines + [expr])


def r(method):
    return f'resolve("{method}")'


# why sd-mecha's own float64 merge cannot be within the tolerance of its float32 one
SELECTION = ("top-k selection by rank: in float64 the kth magnitude is rounded to float32 (kthvalue runs on .float()) "
             "and compared with float64 magnitudes, so elements at the threshold flip")
SINGULAR = ("model stock on rows of length 1: cos = -1 makes t = -2/0, and nan_to_num turns the infinity into the dtype's "
            "largest value, which differs between float32 and float64")
MEDIAN_STOP = ("the Weiszfeld loop stops when the float32 objective stops changing (ftol=1e-20), while the median still "
               "moves: float64 iterates further")


def deterministic_cases():
    cases = []
    no_f64 = {
        "ties_sum_k05": SELECTION, "ties_sum_k00": SELECTION, "ties_sum_vote_sgn": SELECTION, "ties_ext_apply_stock": SELECTION,
        "ties_ext_median": SELECTION + "; " + MEDIAN_STOP, "ties_ext_median_k0": SELECTION + "; " + MEDIAN_STOP,
        "model_stock_two": SINGULAR, "model_stock_unrelated": SINGULAR, "wrapper_n_model_stock_eps": SINGULAR,
        "median_three": MEDIAN_STOP, "median_deltas": MEDIAN_STOP, "wrapper_add_ties_with_dare_k05": SELECTION,
        "wrapper_add_difference_ties_alpha05_k05": SELECTION, "wrapper_add_difference_ties_extended_defaults": SELECTION,
        "wrapper_add_difference_ties_extended_k05_apply_medianTrue_alpha07": SELECTION + "; " + MEDIAN_STOP,
    }

    # sd-mecha's float32 Weiszfeld loop stops at the first step where its float32 objective repeats
    # exactly (ftol=1e-20), e.g. step 37 of 100 for t1d of (a, b, c), while the median still moves by
    # ~1e-4 relative per few steps; which step that is depends on float32 rounding noise (sd-mecha's
    # own float64 merge lands 5e-4 away), so medians of three or more distinct points are compared
    # within 1e-3 of the values' scale (~1)
    loose_median = {"ties_ext_median", "median_three", "median_deltas",
                    "wrapper_add_difference_ties_extended_k05_apply_medianTrue_alpha07"}

    def add(spec):
        if spec["id"] in no_f64:
            spec["no_f64_check"] = no_f64[spec["id"]]
        if spec["id"] in loose_median:
            spec["tolerance"], spec["atol"] = 1e-3, 1e-3
        # model stock's t = n·c/(1 + (n−1)·c) carries the relative error of the cosine c, which
        # torch takes in float32 over rows of 1–8 values: for nearly orthogonal short rows that is
        # ~1e-5 (the port sums in float64)
        elif spec["id"].startswith(("model_stock", "wrapper_n_model_stock")):
            spec["tolerance"], spec["atol"] = 1e-4, 1e-6
        cases.append(spec)

    d2 = "a - base, b - base"
    d3 = "a - base, b - base, c - base"

    def back(inner):
        return f'{r("add_difference")}(base, {inner})'

    # --- ties_sum ----------------------------------------------------------------------------
    add(case("ties_sum_default", "ties_sum of two fine-tune deltas, default k=1 (keep all), sign election by counts",
             back(f'{r("ties_sum")}({d2})')))
    for k in (0.5, 0.0):
        add(case(f"ties_sum_k{str(k).replace('.', '')}", f"ties_sum(k={k}) of three deltas (k=0 keeps each delta's largest magnitude)",
                 back(f'{r("ties_sum")}({d3}, k={k})')))
    add(case("ties_sum_vote_sgn", "ties_sum(k=0.5, vote_sgn=True): the sign of the sum is elected",
             back(f'{r("ties_sum")}({d3}, k=0.5, vote_sgn=True)')))
    add(case("ties_sum_identical", "ties_sum of identical deltas (a - base, same - base)",
             back(f'{r("ties_sum")}(a - base, same - base, k=0.5)')))
    add(case("ties_sum_one", "ties_sum of one delta, k=0.5", back(f'{r("ties_sum")}(a - base, k=0.5)')))
    add(case("ties_sum_k2", "ties_sum(k=2.0): int((1 - k) * numel) < 1, so everything is kept",
             back(f'{r("ties_sum")}({d2}, k=2.0)')))

    # --- ties_sum_extended -------------------------------------------------------------------
    add(case("ties_ext_default", "ties_sum_extended defaults (k=0.2; apply_stock=False applies model stock's t). "
             "sd-mecha writes the 0-D key as [1] (t is unsqueezed); the port keeps []",
             back(f'{r("ties_sum_extended")}({d2})')))
    add(case("ties_ext_three", "ties_sum_extended(k=0.5) of three deltas, model stock's t per row",
             back(f'{r("ties_sum_extended")}({d3}, k=0.5)')))
    add(case("ties_ext_apply_stock", "ties_sum_extended(k=0.5, apply_stock=True): the inverted flag, no stock factor",
             back(f'{r("ties_sum_extended")}({d3}, k=0.5, apply_stock=True)')))
    add(case("ties_ext_median", "ties_sum_extended(k=0.5, apply_median=True): geometric median of the elected deltas",
             back(f'{r("ties_sum_extended")}({d3}, k=0.5, apply_median=True)')))
    add(case("ties_ext_vote_sgn_k1", "ties_sum_extended(k=1.0, vote_sgn=True)",
             back(f'{r("ties_sum_extended")}({d3}, k=1.0, vote_sgn=True)')))
    add(case("ties_ext_identical", "ties_sum_extended of identical deltas (cos = 1, t = 1)",
             back(f'{r("ties_sum_extended")}(a - base, same - base, k=0.5)')))
    add(case("ties_ext_median_k0", "ties_sum_extended(k=0.0, apply_median=True, maxiter=5)",
             back(f'{r("ties_sum_extended")}({d2}, k=0.0, apply_median=True, maxiter=5)')))

    # --- ties_sum_with_dropout without randomness ----------------------------------------------
    add(case("dare_p0", "ties_sum_with_dropout(probability=0.0): every element kept, then ties_sum_extended(k=0.5)",
             back(f'{r("ties_sum_with_dropout")}({d3}, probability=0.0, k=0.5, seed={SEED})')))
    add(case("dare_p0_median", "ties_sum_with_dropout(probability=0.0, apply_median=True, apply_stock=True)",
             back(f'{r("ties_sum_with_dropout")}({d2}, probability=0.0, apply_median=True, apply_stock=True, seed={SEED})')))
    add(case("dare_p1", "ties_sum_with_dropout(probability=1.0) returns 0: base unchanged",
             back(f'{r("ties_sum_with_dropout")}({d2}, probability=1.0, seed={SEED})')))

    # --- model_stock -------------------------------------------------------------------------
    add(case("model_stock_two", "model_stock of two deltas (sd-mecha writes the 0-D key as [1])",
             back(f'{r("model_stock")}({d2})')))
    add(case("model_stock_three", "model_stock of three deltas", back(f'{r("model_stock")}({d3})')))
    add(case("model_stock_identical", "model_stock of identical deltas (t = 1)",
             back(f'{r("model_stock")}(a - base, same - base)')))
    add(case("model_stock_unrelated", "model_stock of unrelated deltas (c - base, a - base), cos_eps=1e-3",
             back(f'{r("model_stock")}(c - base, a - base, cos_eps=0.001)')))

    # --- geometric_median --------------------------------------------------------------------
    add(case("median_three", "geometric_median(a, b, c)", f'{r("geometric_median")}(a, b, c)'))
    add(case("median_two", "geometric_median(a, b)", f'{r("geometric_median")}(a, b)'))
    add(case("median_identical", "geometric_median(a, same, b): two points coincide", f'{r("geometric_median")}(a, same, b)'))
    add(case("median_maxiter0", "geometric_median(a, b, c, maxiter=0): the mean", f'{r("geometric_median")}(a, b, c, maxiter=0)'))
    add(case("median_ftol", "geometric_median(a, b, c, eps=0.01, ftol=0.001): an early stop",
             f'{r("geometric_median")}(a, b, c, eps=0.01, ftol=0.001)'))
    add(case("median_deltas", "geometric_median of deltas added to base", back(f'{r("geometric_median")}({d3})')))

    # --- dropout without randomness ------------------------------------------------------------
    add(case("dropout_p0", "dropout(probability=0.0): every delta kept, averaged",
             back(f'{r("dropout")}({d3}, probability=0.0, seed={SEED})')))
    add(case("dropout_p0_rescale", "dropout(probability=0.0, rescale=2.0): (1 - p)^rescale = 1",
             back(f'{r("dropout")}({d2}, probability=0.0, rescale=2.0, seed={SEED})')))

    # --- wrappers ------------------------------------------------------------------------------
    W = wrapper_case
    add(W("wrapper_add_ties_with_dare_p0", "sd_mecha.add_ties_with_dare(base, a, b, probability=0.0, seed=1234)",
          "add_ties_with_dare", ["base", "a", "b"], {"probability": 0.0, "seed": SEED}))
    add(W("wrapper_add_ties_with_dare_k05", "sd_mecha.add_ties_with_dare(base, a, b, c, probability=0.0, k=0.5, alpha=0.5, apply_stock=True, seed=1)",
          "add_ties_with_dare", ["base", "a", "b", "c"], {"probability": 0.0, "k": 0.5, "alpha": 0.5, "apply_stock": True, "seed": 1}))
    add(W("wrapper_n_model_stock", "sd_mecha.n_model_stock(base, a, b, c)", "n_model_stock", ["base", "a", "b", "c"], {}))
    add(W("wrapper_n_model_stock_eps", "sd_mecha.n_model_stock(base, a, b, cos_eps=0.01)", "n_model_stock", ["base", "a", "b"], {"cos_eps": 0.01}))
    add(W("wrapper_dropout_p0", "sd_mecha.dropout(base, a, b, probability=0.0, seed=5)", "dropout", ["base", "a", "b"], {"probability": 0.0, "seed": 5}))
    add(W("wrapper_dropout_alpha1", "sd_mecha.dropout(base, a, b, c, probability=0.0, alpha=1.0, seed=5)", "dropout", ["base", "a", "b", "c"],
          {"probability": 0.0, "alpha": 1.0, "seed": 5}))
    # add_difference_ties(_extended) crash in sd-mecha 1.1.8 (see KNOWN_CRASHES): the cases are
    # the graphs they mean, `add_difference(base, ties(...)) | base`
    for name, method, kwargs, extra in (
        ("add_difference_ties", "ties_sum", {}, "k=1.0"),
        ("add_difference_ties", "ties_sum", {"alpha": 0.5, "k": 0.5}, "k=0.5"),
        ("add_difference_ties_extended", "ties_sum_extended", {}, "k=0.2, vote_sgn=False, apply_stock=False, cos_eps=1e-06, apply_median=False, eps=1e-06, maxiter=100, ftol=1e-20"),
        ("add_difference_ties_extended", "ties_sum_extended", {"k": 0.5, "apply_median": True, "alpha": 0.7},
         "k=0.5, vote_sgn=False, apply_stock=False, cos_eps=1e-06, apply_median=True, eps=1e-06, maxiter=100, ftol=1e-20"),
    ):
        alpha = kwargs.get("alpha", 1.0)
        tag = "_".join(f"{k}{v}".replace(".", "") for k, v in kwargs.items()) or "defaults"
        expr = f'{r("add_difference")}(base, {r(method)}(a - base, b - base, c - base, {extra}), alpha={alpha!r}) | base'
        add(case(f"wrapper_{name}_{tag}", f"what sd_mecha.{name}(base, a, b, c{''.join(f', {k}={v!r}' for k, v in kwargs.items())}) means "
                 "(sd-mecha's wrapper crashes on the MergeSpace == None comparison)", expr,
                 wrapper=wrapper(name, ["base", "a", "b", "c"], **kwargs)))
    return cases


KNOWN_CRASHES = [
    ("sd_mecha.add_difference_ties(base, a, b)", "its add_difference wrapper compares the model's merge space with the ties node's None"),
    ("sd_mecha.add_difference_ties_extended(base, a, b)", "the same crash"),
    ('resolve("add_difference")(base, resolve("model_stock")(a - base))', None),  # one delta: stacks an empty list of cosines (at merge time)
]


class NumpyLerpTorch(types.ModuleType):
    """torch, with a lerp that also takes NumPy arrays (what overlapping_sets_pmf means)."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def lerp(a, b, w):
        if isinstance(a, np.ndarray):
            return a + w * (b - a)
        return torch.lerp(a, b, w)


def random_cases():
    """(spec, names, expr, patched): statistics cases on the [64, 64] inputs."""
    out = []
    deltas3 = "s_1 - s_base, s_2 - s_base, s_4 - s_base"
    add_ = lambda spec, names, expr, patched=False: out.append((spec, names, expr, patched))
    back = lambda inner: f'{r("add_difference")}(s_base, {inner})'
    for p in (0.3, 0.9):
        add_({"id": f"rand_dare_p{str(p).replace('.', '')}", "random": {"kind": "dare", "probability": p, "della_eps": 0.0}},
             ("s_base", "s_ramp"), back(f'{r("ties_sum_with_dropout")}(s_ramp - s_base, probability={p}, k=1.0, apply_stock=True, seed={SEED})'))
    add_({"id": "rand_dare_norescale", "random": {"kind": "dare", "probability": 0.5, "della_eps": 0.0, "rescale": False}},
         ("s_base", "s_ramp"), back(f'{r("ties_sum_with_dropout")}(s_ramp - s_base, probability=0.5, rescale=False, k=1.0, apply_stock=True, seed={SEED})'))
    add_({"id": "rand_della", "random": {"kind": "dare", "probability": 0.5, "della_eps": 0.4}},
         ("s_base", "s_ramp"), back(f'{r("ties_sum_with_dropout")}(s_ramp - s_base, probability=0.5, della_eps=0.4, k=1.0, apply_stock=True, seed={SEED})'))
    add_({"id": "rand_della_wide", "random": {"kind": "dare", "probability": 0.3, "della_eps": 1.5}},
         ("s_base", "s_ramp"), back(f'{r("ties_sum_with_dropout")}(s_ramp - s_base, probability=0.3, della_eps=1.5, k=1.0, apply_stock=True, seed={SEED})'))
    for p, overlap, emphasis, rescale, patched in (
        (0.6, 1.0, 0.0, 1.0, False),
        (0.3, 3.0, 0.0, 0.5, False),
        (0.5, 0.0, 0.0, 1.0, True),
        (0.4, 0.7, 0.5, 1.0, True),
        (0.4, 1.3, 0.0, 1.0, True),
        (0.2, 2.5, 0.0, 1.0, True),
    ):
        tag = f"p{p}_o{overlap}_e{emphasis}_r{rescale}".replace(".", "")
        spec = {"id": f"rand_dropout_{tag}",
                "random": {"kind": "dropout", "probability": p, "overlap": overlap, "overlap_emphasis": emphasis, "rescale": rescale}}
        if overlap % 2 != 1:
            sd_ties.torch = NumpyLerpTorch()
            try:
                spec["random"]["pmf"] = [float(v) for v in sd_ties.overlapping_sets_pmf(3, p, overlap, emphasis)]
            finally:
                sd_ties.torch = torch
        add_(spec, ("s_base", "s_1", "s_2", "s_4"),
             back(f'{r("dropout")}({deltas3}, probability={p}, rescale={rescale}, overlap={overlap}, overlap_emphasis={emphasis}, seed={SEED})'),
             patched)
    return out


def run_random(spec, names, expr, patched, directory, outputs_dir):
    python = stats_code(expr, names)
    recipe = run_code(python, namespace_for(directory))
    text = sd_mecha.serialize(recipe)
    if patched:
        sd_ties.torch = NumpyLerpTorch()
    try:
        result = do_merge(recipe, torch.float32, {})
    finally:
        sd_ties.torch = torch
    tensors = OrderedDict((k, result[k].contiguous().clone()) for k in sorted(result))
    name = f"{spec['id']}.safetensors"
    save_file(tensors, os.path.join(outputs_dir, name))
    out = OrderedDict(id=spec["id"], description=expr, python=python, text=text.replace(directory, "{dir}"), output=name)
    out["keys"] = list(tensors)
    out["shapes"] = OrderedDict((k, list(v.shape)) for k, v in tensors.items())
    out["random"] = spec["random"]
    out["patched"] = patched
    return out


def check_known_crashes(directory):
    found = []
    for source, why in KNOWN_CRASHES:
        try:
            recipe = run_code(code(source), namespace_for(directory))
            if why is None:
                do_merge(recipe, torch.float32, {})
        except Exception as e:
            found.append((source, why or "raises at merge time", error_text(e, directory)))
            continue
        raise AssertionError(f"expected sd-mecha to fail on {source}")
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    started = time.monotonic()

    models = methods.build_inputs()
    models.update(build_stats_inputs())
    directory = os.path.realpath(tempfile.mkdtemp(prefix="sd-mecha-golden-ties-"))
    inputs_dir, outputs_dir = args.out / "inputs", args.out / "outputs"
    for d in (inputs_dir, outputs_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    try:
        methods.write_inputs(directory, models)
        for name in models:
            shutil.copyfile(os.path.join(directory, f"{name}.safetensors"), inputs_dir / f"{name}.safetensors")
        cases, failures, excesses = [], [], {}
        for spec in deterministic_cases():
            try:
                out, excess = run_case(spec, directory, str(outputs_dir))
            except Exception as e:
                failures.append(f"{spec['id']}: {error_text(e, directory)}")
                continue
            # sd-mecha's model stock factor is unsqueezed on the last dim: a 0-D key comes out as [1]
            quirks = {k: s for k, s in out["shapes"].items() if k in methods.SHAPES and s != methods.SHAPES[k]}
            if quirks:
                out["port_shapes"] = OrderedDict((k, methods.SHAPES[k]) for k in quirks)
            cases.append(out)
            excesses[spec["id"]] = excess
        for spec, names, expr, patched in random_cases():
            try:
                cases.append(run_random(spec, names, expr, patched, directory, str(outputs_dir)))
            except Exception as e:
                failures.append(f"{spec['id']}: {error_text(e, directory)}")
        if failures:
            raise SystemExit("cases failed:\n  " + "\n  ".join(failures))
        crashes = check_known_crashes(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    for method in ("ties_sum", "ties_sum_extended", "ties_sum_with_dropout", "model_stock", "geometric_median", "dropout"):
        assert any(f'"{method}"' in c["text"] for c in cases), f"no case merges {method}"
    (args.out / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    if args.verbose:
        for case_id, excess in excesses.items():
            print(f"  {case_id}: float64 deviation {excess:.3f} of the tolerance")
        for source, why, error in crashes:
            print(f"  sd-mecha fails: {source}\n    {error}\n    ({why})")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(cases)} cases, {len(crashes)} known crashes, {size / 1024:.0f} KiB in {time.monotonic() - started:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
