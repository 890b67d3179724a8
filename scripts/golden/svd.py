#!/usr/bin/env python3
"""Generate golden merge results from the real sd-mecha 1.1.8 for the SVD family: rotate,
truncate_rank, truncate_kronecker and get_rank_from_ratio.

Run from the repository root, outside CI:

    bench/.venv/bin/python scripts/golden/svd.py

Writes into __test__/fixtures/golden/svd/ the same layout as methods.py (inputs/, outputs/,
cases.json; see scripts/golden/README.md), with its own inputs: every file has the keys
t0d [], t1d [8], square [5, 5], tall [6, 5], wide [3, 7] (rotate's Stiefel path), conv
[4, 3, 3, 3], conv1x1 [4, 3, 1, 1] and kron [4, 6, 2] (a 3-D tensor for truncate_kronecker).

Only deterministic paths are recorded: use_approximate_basis=False everywhere (sd-mecha's
randomised range finder draws from torch's generator, which the port does not reproduce).
sd-mecha's `sd_mecha.rotate` wrapper always crashes (`set_cache`), so the wrapper cases build
the graph it evidently means (`rotate(a - c, b - c)` added back to c) from the registered
methods, and the script checks that the wrapper still crashes.
"""

import argparse
import json
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections import OrderedDict

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

import sd_mecha

from generate import run_code
from methods import (
    EXPECTED_SD_MECHA_VERSION, REPO_ROOT, case, code, error_text, namespace_for, run_case, wrapper, write_inputs,
)

OUT_DIR = REPO_ROOT / "__test__" / "fixtures" / "golden" / "svd"

# Results that go through SVD / eig / the Stiefel logarithm: sd-mecha computes them in float32,
# the port in float64, so they differ by float32 rounding amplified by the conditioning of the
# decompositions (small singular-value gaps). Outputs are compared as products (the merged
# tensors), so sign and ordering conventions of the factors do not matter.
SVD_RTOL = 1e-4
SVD_ATOL = 1e-4

SHAPES = OrderedDict(
    t0d=[],
    t1d=[8],
    square=[5, 5],
    tall=[6, 5],
    wide=[3, 7],
    conv=[4, 3, 3, 3],
    conv1x1=[4, 3, 1, 1],
    kron=[4, 6, 2],
)
INPUT_NAMES = ("base", "a", "b", "c", "same")
# the keys rotate treats as wide matrices (n < p after its reshape)
WIDE_KEYS = ("wide", "kron")


def build_inputs():
    """base; a and b fine-tunes of it (base + 0.3 * noise: far enough apart for the rotation
    to matter); c unrelated; same an exact copy of a."""
    g = torch.Generator().manual_seed(20241208)

    def randn(shape):
        return torch.randn(shape, generator=g, dtype=torch.float32)

    base = OrderedDict((k, randn(s)) for k, s in SHAPES.items())
    a = OrderedDict((k, v + 0.3 * randn(v.shape)) for k, v in base.items())
    b = OrderedDict((k, v + 0.3 * randn(v.shape)) for k, v in base.items())
    c = OrderedDict((k, randn(s)) for k, s in SHAPES.items())
    same = OrderedDict((k, v.clone()) for k, v in a.items())
    return OrderedDict(base=base, a=a, b=b, c=c, same=same)


def case_list():
    cases = []
    add = cases.append
    svd_tol = dict(tolerance=SVD_RTOL, atol=SVD_ATOL)
    rot = 'resolve("rotate")'

    # --- rotate ------------------------------------------------------------------------------
    # With centred rows (centralization != 0) a wide n x p key has rank n - 1, so one pair of
    # singular vectors of the Procrustes problem is arbitrary and sd-mecha's result for it depends
    # on rounding (its own float32 and float64 merges differ by more than the values): those keys
    # are listed as ill-posed and only checked for shape and finiteness. The same alignments with
    # centralization=0 exercise the wide (Stiefel) path where it is well defined.
    # A centred square key has rank n - 1 as well: the last singular pair has an arbitrary relative
    # sign, so the reflection (det Q) is arbitrary unless it is cancelled (fractional alignment);
    # alignment 1 does not see it (a·u_n = 0), other integer powers do.
    def add_rotate(case_id, description, expr, centred=True, alignment=1.0, **tol):
        spec = case(case_id, description, expr, **tol)
        if centred:
            square = alignment == round(alignment) and alignment not in (0.0, 1.0)
            spec["ill_posed"] = list(WIDE_KEYS) + (["square"] if square else [])
        add(spec)

    add_rotate("rotate_default", "rotate(a, b): alignment 1, alpha 0 (a full rotation of a's centred rows; 0-D and 1-D keys lerp with alpha 0)",
               f"{rot}(a, b)", **svd_tol)
    add_rotate("rotate_alignment0_alpha0", "rotate(a, b, alignment=0, alpha=0): the shortcut to a",
               f"{rot}(a, b, alignment=0.0, alpha=0.0)", centred=False)
    add_rotate("rotate_alignment1_alpha1", "rotate(a, b, alignment=1, alpha=1): the shortcut to b",
               f"{rot}(a, b, alignment=1.0, alpha=1.0)", centred=False)
    for alignment in (0.3, 0.5, 1.0, 1.7, 2.0, -1.0):
        tag = str(alignment).replace(".", "").replace("-", "m")
        kind = {1.0: "Q itself", 2.0: "an integer power (no reflection cancelled)", -1.0: "the inverse"}.get(
            alignment, "a fractional power (eig; Stiefel log/exp for wide keys), reflection cancelled")
        for alpha in (0.0, 0.5):
            atag = "" if alpha == 0.0 else "_alpha05"
            add_rotate(f"rotate_alignment{tag}{atag}", f"rotate(a, b, alignment={alignment}, alpha={alpha}): {kind}",
                       f"{rot}(a, b, alignment={alignment!r}, alpha={alpha!r})", alignment=alignment, **svd_tol)
        add_rotate(f"rotate_alignment{tag}_uncentred", f"rotate(a, b, alignment={alignment}, centralization=0): {kind}, wide keys well defined",
                   f"{rot}(a, b, alignment={alignment!r}, centralization=0.0)", centred=False, **svd_tol)
    add_rotate("rotate_alignment05_alpha05_uncentred", "rotate(a, b, alignment=0.5, alpha=0.5, centralization=0): a lerped toward b·Q⁻¹ first",
               f"{rot}(a, b, alignment=0.5, alpha=0.5, centralization=0.0)", centred=False, **svd_tol)
    add_rotate("rotate_alignment0_alpha05", "rotate(a, b, alignment=0, alpha=0.5): only the scaling moves",
               f"{rot}(a, b, alignment=0.0, alpha=0.5)", **svd_tol)
    add_rotate("rotate_centralization05", "rotate(a, b, alignment=0.5, centralization=0.5)",
               f"{rot}(a, b, alignment=0.5, centralization=0.5)", **svd_tol)
    add_rotate("rotate_identical", "rotate(a, same, alignment=0.5, alpha=0.3): allclose in float16, so lerp",
               f"{rot}(a, same, alignment=0.5, alpha=0.3)", centred=False)
    add_rotate("rotate_unrelated", "rotate(a, c, alignment=0.5) of unrelated models (the wide geodesic is long: ill-posed in float32 even uncentred)",
               f"{rot}(a, c, alignment=0.5)", **svd_tol)
    add_rotate("rotate_deltas", "add_difference(base, rotate(a - base, b - base, alignment=0.5))",
               f'resolve("add_difference")(base, {rot}(a - base, b - base, alignment=0.5))', **svd_tol)

    # --- truncate_rank (deltas) ----------------------------------------------------------------
    tr = 'resolve("truncate_rank")'
    for rank, note in ((0, "zeros"), (2, "rank 2"), (3, "rank 3 (full for wide)"), (5, "full for square and tall, clamped for the others"),
                       (100, "larger than every matrix: clamped, a itself"), (-1, "negative: clamped to 0, zeros")):
        tag = str(rank).replace("-", "m")
        add(case(f"truncate_rank_{tag}", f"add_difference(base, truncate_rank(a - base, rank={rank}, use_approximate_basis=False)): {note}",
                 f'resolve("add_difference")(base, {tr}(a - base, rank={rank}, use_approximate_basis=False))', **svd_tol))
    add(case("truncate_rank_from_ratio", "truncate_rank(a - base, rank=get_rank_from_ratio(a - base, ratio=0.5)): the rank is an int decided from each key's shape",
             f'resolve("add_difference")(base, {tr}(a - base, rank=resolve("get_rank_from_ratio")(a - base, ratio=0.5), use_approximate_basis=False))', **svd_tol))
    add(case("truncate_rank_from_ratio03", "truncate_rank with rank=get_rank_from_ratio(a - base, ratio=0.3)",
             f'resolve("add_difference")(base, {tr}(a - base, rank=resolve("get_rank_from_ratio")(a - base, ratio=0.3), use_approximate_basis=False))', **svd_tol))
    add(case("truncate_rank_from_ratio_weights", "get_rank_from_ratio on weights (its input may be weight or delta), ratio 1.2 (clamped)",
             f'resolve("add_difference")(base, {tr}(a - base, rank=resolve("get_rank_from_ratio")(a, ratio=1.2), use_approximate_basis=False))', **svd_tol))

    # --- truncate_kronecker (deltas) -------------------------------------------------------------
    tk = 'resolve("truncate_kronecker")'
    for ratio in (0.0, 0.25, 0.5, 0.75, 1.0):
        tag = str(ratio).replace(".", "")
        add(case(f"truncate_kronecker_{tag}", f"add_difference(base, truncate_kronecker(a - base, kronecker_ratio={ratio}, use_approximate_basis=False))",
                 f'resolve("add_difference")(base, {tk}(a - base, kronecker_ratio={ratio!r}, use_approximate_basis=False))', **svd_tol))

    # --- the rotate wrapper (its intent: sd-mecha's own one crashes) ------------------------------------
    for args, kwargs in ((["a", "b"], {}), (["a", "b"], {"alignment": 0.5, "alpha": 0.25}), (["a", "b", "base"], {"alignment": 0.5})):
        tag = "_".join(args) + "".join(f"_{k}{str(v).replace('.', '')}" for k, v in kwargs.items())
        a, b = args[:2]
        inner = f"{rot}({a} - base, {b} - base" if len(args) == 3 else f"{rot}({a}, {b}"
        inner += "".join(f", {k}={v!r}" for k, v in (("alignment", kwargs.get("alignment", 1.0)), ("alpha", kwargs.get("alpha", 0.0)))) + ")"
        expr = f'resolve("add_difference")(base, {inner}, alpha=1.0)' if len(args) == 3 else inner
        spec = case(f"wrapper_rotate_{tag}", f"what sd_mecha.rotate({', '.join(args)}, {kwargs}) means to build (it crashes on set_cache)",
                    expr, wrapper=wrapper("rotate", args, **kwargs), **svd_tol)
        spec["ill_posed"] = list(WIDE_KEYS)
        add(spec)
    return cases


def check_wrapper_crash(directory):
    try:
        run_code(code('sd_mecha.rotate(a, b, alignment=0.5)'), namespace_for(directory))
    except AttributeError as e:
        return error_text(e, directory)
    raise AssertionError("sd_mecha.rotate no longer crashes: record it as a wrapper case and update docs/differences.md")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # log_stiefel warns in float32; not part of the data
    from importlib.metadata import version as dist_version
    if dist_version("sd-mecha") != EXPECTED_SD_MECHA_VERSION:
        print(f"warning: the golden data is meant for sd-mecha {EXPECTED_SD_MECHA_VERSION}", file=sys.stderr)
    torch.set_num_threads(1)
    started = time.monotonic()

    directory = os.path.realpath(tempfile.mkdtemp(prefix="sd-mecha-golden-svd-"))
    inputs_dir, outputs_dir = args.out / "inputs", args.out / "outputs"
    for d in (inputs_dir, outputs_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    try:
        models = build_inputs()
        write_inputs(directory, models)
        for name in INPUT_NAMES:
            shutil.copyfile(os.path.join(directory, f"{name}.safetensors"), inputs_dir / f"{name}.safetensors")
        cases, failures = [], []
        for spec in case_list():
            try:
                out, excess = run_case(spec, directory, str(outputs_dir))
            except Exception as e:
                failures.append(f"{spec['id']}: {error_text(e, directory)}")
                continue
            cases.append(out)
            if args.verbose:
                print(f"  {spec['id']}: float64 deviation {excess:.3f} of the tolerance")
        if failures:
            raise SystemExit("cases failed:\n  " + "\n  ".join(failures))
        crash = check_wrapper_crash(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for method in ("rotate", "truncate_rank", "truncate_kronecker", "get_rank_from_ratio"):
        assert any(f'"{method}"' in c["text"] for c in cases), f"no case merges {method}"
    (args.out / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{len(cases)} cases ({crash}), {size / 1024:.0f} KiB in {time.monotonic() - started:.1f}s -> {args.out}")


if __name__ == "__main__":
    main()
