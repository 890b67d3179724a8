"""Reference data for the Rust whole-tensor methods, produced by sd-mecha 1.1.8 itself.

usage: gen.py OUT_DIR [full]

Each family gets <family>.safetensors and <family>.json. The safetensors file holds the inputs
once per set ("in/<set>/a", "in/<set>/b") and every output concatenated into one flat tensor per
dtype ("out/f32", "out/f64"). The JSON holds {"cases": [[fn, set, [params], out, out64], ...],
"filters": [[shape, alpha, tilt, out], ...]}: out is the offset of the case's output in the flat
tensor of the set's dtype (null when sd-mecha raised), its shape that of the set's a; out64 (full
tier only, f32 sets) is the offset in "out/f64" of the same math run in f64. NaN parameters are null.
The default tier is small enough to live in the repository; "full" adds parameters and sets.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

import sd_mecha.extensions.builtin.merge_methods  # noqa: F401  (registers the modules)


def _mod(name):
    return sys.modules[f"sd_mecha.extensions.builtin.merge_methods.{name}"]


linear, cosine, crossover, slicing = (_mod(n) for n in ["linear", "cosine", "crossover", "slicing"])

torch.set_num_threads(1)
OUT = sys.argv[1]
FULL = len(sys.argv) > 2 and sys.argv[2] == "full"
os.makedirs(OUT, exist_ok=True)

SHAPES = {"s0": [], "s8": [8], "s65": [6, 5], "s4333": [4, 3, 3, 3], "s37": [3, 7]}


def input_sets(dtype, shapes):
    g = torch.Generator().manual_seed(1234)
    sets = {}
    for sname, shape in shapes.items():
        a = torch.randn(shape, generator=g, dtype=torch.float64)
        b = torch.randn(shape, generator=g, dtype=torch.float64)
        d = torch.randn(shape, generator=g, dtype=torch.float64)
        sets[f"{sname}_rand"] = (a, b)
        sets[f"{sname}_base"] = (a, a + 0.01 * d)  # sharing a base: b = a + small delta
        sets[f"{sname}_same"] = (a, a.clone())
    return {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in sets.items()}


def special_sets(dtype):
    g = torch.Generator().manual_seed(99)
    a = torch.randn([6, 5], generator=g, dtype=torch.float64)
    b = torch.randn([6, 5], generator=g, dtype=torch.float64)
    sets = {
        "zero_a": (torch.zeros(6, 5), b),
        "zero_b": (a, torch.zeros(6, 5)),
        "neg": (a, -a),
        "twice": (a, 2 * a),
        # ties and signed zeros for the sorting method
        "ties": (torch.round(a * 2) / 2, torch.round(b * 2) / 2),
        "zcol": (torch.cat([torch.zeros(6, 1), a[:, 1:]], 1), b),  # a column of zeros
        "tiny": (a * 1e-10, b * 1e-9),
        # non-finite values, and signed zeros (torch.round keeps the sign: round(-0.3) = -0.)
        "nonfin": (a.clone().index_put_((torch.tensor([0, 1, 3]), torch.tensor([0, 2, 3])),
                                torch.tensor([math.inf, math.nan, -math.inf], dtype=torch.float64)),
                   b.clone().index_put_((torch.tensor([2]), torch.tensor([2])), torch.tensor([math.nan], dtype=torch.float64))),
        "negzero": (torch.round(a * 0.7), torch.round(b * 0.7)),
        "big1d": (torch.randn([300], generator=g, dtype=torch.float64), torch.randn([300], generator=g, dtype=torch.float64)),
        "big2d": (torch.randn([40, 33], generator=g, dtype=torch.float64), torch.randn([40, 33], generator=g, dtype=torch.float64)),
    }
    return {k: (x.to(dtype), y.to(dtype)) for k, (x, y) in sets.items()}


class Family:
    def __init__(self, name):
        self.name, self.tensors, self.cases, self.filters, self.sets_used = name, {}, [], [], set()
        self.flat = {torch.float32: [], torch.float64: []}
        self.flat_len = {torch.float32: 0, torch.float64: 0}

    def add_set(self, sid, a, b):
        if sid not in self.sets_used:
            self.sets_used.add(sid)
            self.tensors[f"in/{sid}/a"] = a.clone().contiguous()
            self.tensors[f"in/{sid}/b"] = b.clone().contiguous()

    def push(self, t):
        off = self.flat_len[t.dtype]
        self.flat[t.dtype].append(t.reshape(-1))
        self.flat_len[t.dtype] += t.numel()
        return off

    def case(self, fn, sid, a, b, params, call):
        self.add_set(sid, a, b)
        out = out64 = None
        try:
            res = call(a.clone(), b.clone())
            assert res.dtype == a.dtype and res.shape == a.shape, (fn, sid, params)
            out = self.push(res)
            if FULL and a.dtype == torch.float32:
                out64 = self.push(call(a.double(), b.double()))
        except ValueError:  # sd-mecha raised: the Rust side must return an error
            pass
        params = [None if math.isnan(p) else p for p in params]
        self.cases.append([fn, sid, params, out, out64])

    def save(self):
        for dt, tag in [(torch.float32, "f32"), (torch.float64, "f64")]:
            parts = self.flat[dt]
            self.tensors[f"out/{tag}"] = torch.cat(parts) if parts else torch.zeros(0, dtype=dt)
        path = os.path.join(OUT, f"{self.name}.safetensors")
        save_file(self.tensors, path)
        jpath = os.path.join(OUT, f"{self.name}.json")
        with open(jpath, "w") as f:
            json.dump({"cases": self.cases, "filters": self.filters}, f, separators=(",", ":"))
        print(self.name, len(self.cases), "cases", os.path.getsize(path), "+", os.path.getsize(jpath), "bytes")


def talpha(x, like):
    # sd-mecha turns float literals for Tensor parameters into float32 tensors, even when merging
    # in f64; the f64 sets pass an f64 alpha instead, so that they test the f64 math itself
    return torch.tensor(x, dtype=like.dtype)


def all_sets():
    out = []
    for dt, tag, shapes in [(torch.float32, "f32", SHAPES),
                            (torch.float64, "f64", {k: SHAPES[k] for k in ["s0", "s65", "s4333"]})]:
        for sid, (a, b) in input_sets(dt, shapes).items():
            out.append((f"{tag}_{sid}", a, b))
        if dt == torch.float32:
            for sid, (a, b) in special_sets(dt).items():
                out.append((f"{tag}_{sid}", a, b))
    return out


ALL_SETS = all_sets()
SMALL_SKIP = {"f32_s8_same", "f32_s37_same", "f32_s0_same", "f64_s0_base", "f64_s0_same", "f64_s65_same",
              "f64_s4333_same"}
SETS = [s for s in ALL_SETS if FULL or ("big" not in s[0] and s[0] not in SMALL_SKIP)]
pick = (lambda full, small: full if FULL else small)

# linear: slerp, perpendicular_component
fam = Family("linear_whole")
slerp = linear.slerp.__wrapped__
perp = linear.perpendicular_component.__wrapped__
for sid, a, b in SETS:
    for alpha in pick([0.0, 1.0, 0.3, 0.5, 0.75, -0.25, 1.5], [0.0, 0.3, -0.25]):
        fam.case("slerp", sid, a, b, [alpha], lambda x, y, al=alpha: slerp(x, y, talpha(al, x)))
    fam.case("perpendicular_component", sid, a, b, [], lambda x, y: perp(x, y))
fam.save()

# cosine
fam = Family("cosine")
ca = cosine.add_cosine_a.__wrapped__
cb = cosine.add_cosine_b.__wrapped__
for sid, a, b in SETS:
    for alpha in pick([0.0, 0.3, 0.5, 0.9, 1.0, -0.5], [0.0, 0.3, 0.9]):
        fam.case("add_cosine_a", sid, a, b, [alpha], lambda x, y, al=alpha: ca(x, y, talpha(al, x)))
        fam.case("add_cosine_b", sid, a, b, [alpha], lambda x, y, al=alpha: cb(x, y, talpha(al, x)))
fam.save()

# crossover
fam = Family("crossover")
co = crossover.crossover.__wrapped__
full_combos = [(al, ti) for al in [0.0, 1.0, 0.3, 0.5, 0.8]
               for ti in [0.0, 0.5, 1.0, 1.3, 2.0, 2.5, 3.5, 4.0, 5.0, -1.0, 7.9]]
small_combos = [(0.0, 0.5), (1.0, 0.5), (0.3, 0.0), (0.3, 0.5), (0.3, 1.3), (0.3, 2.0), (0.3, 3.5), (0.3, 5.0),
                (0.8, -1.0), (0.5, 0.0)]
errors = [(1.5, 0.0), (-0.1, 0.5), (1.5, 1.0), (float("nan"), 0.0)]
for sid, a, b in ALL_SETS:
    small_skip = sid in ("f32_big1d", "f64_s4333_base") or sid.startswith("f32_s37") or sid in SMALL_SKIP
    if "ties" in sid or "zcol" in sid or (not FULL and small_skip):
        continue
    special = not any(sid.startswith(f"f{w}_s") for w in ("32", "64"))
    combos = pick(full_combos, [(0.3, 0.0)] if "big" in sid else small_combos[2::2] if special else small_combos)
    combos = combos + errors
    for alpha, tilt in combos:
        fam.case("crossover", sid, a, b, [alpha, tilt], lambda x, y, al=alpha, ti=tilt: co(x, y, al, ti))
# the filter itself, bit for bit
for shape in pick([[5], [8], [7, 3], [64, 17], [4, 3, 3, 2], [9, 8, 5], [2, 1, 4], [40, 17], [150], [128, 641]],
                  [[5], [8], [7, 3], [4, 3, 3, 2], [2, 1, 4], [150]]):
    for alpha in [0.3, 0.5, 0.75]:
        for tilt in [0.0, 0.5, 1.3, 2.0, 2.5, 3.5]:
            fam.filters.append([shape, alpha, tilt, fam.push(crossover.create_filter(shape, alpha, tilt))])
fam.save()

# slicing
fam = Family("slicing")
ts = slicing.tensor_sum.__wrapped__
tk = slicing.top_k_tensor_sum.__wrapped__
pairs = pick([(0.5, 0.0), (0.3, 0.2), (0.5, 0.7), (1.0, 0.3), (-0.3, 0.5), (0.4, -0.3), (0.0, 0.5), (1.5, 0.0),
              (0.6, 0.0), (1.0, 0.0), (0.25, 1.75), (0.5, -1.0), (0.0, 0.0), (0.2, 0.9)],
             [(0.5, 0.0), (0.3, 0.2), (0.5, 0.7), (-0.3, 0.5), (0.0, 0.5), (0.25, 1.75)])
for sid, a, b in SETS:
    for width, offset in pairs:
        if FULL or sid.startswith(("f32_s", "f64_s")):  # specials add nothing to copying rows
            fam.case("tensor_sum", sid, a, b, [width, offset], lambda x, y, w=width, o=offset: ts(x, y, w, o))
        fam.case("top_k_tensor_sum", sid, a, b, [width, offset], lambda x, y, w=width, o=offset: tk(x, y, w, o))
fam.save()
