"""Merges one `.mecha` recipe with sd-mecha 1.1.8 for the benchmarks; prints a JSON line with
the merge's seconds (its defaults: fp32 compute, fp16 output, its own thread count).

usage: reference_recipe.py <recipe.mecha> <out.safetensors>
"""
import json
import sys
import time

import sd_mecha

from reference_merge import _NoProgress


def main():
    recipe_path, out = sys.argv[1], sys.argv[2]
    with open(recipe_path, encoding="utf-8") as f:
        recipe = sd_mecha.deserialize(f.read())
    started = time.perf_counter()
    sd_mecha.merge(recipe, output=out, tqdm=lambda *args, **kwargs: _NoProgress())
    print(json.dumps({"seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
