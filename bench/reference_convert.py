"""Runs one key-format conversion with sd-mecha 1.1.8 for the benchmarks; prints a JSON line with timings.

usage: reference_convert.py <in.safetensors> <target config> <out.safetensors>

The recipe is `sd_mecha.convert(sd_mecha.model(in), target)`, merged with sd-mecha's defaults
(fp32 compute, fp16 output, its own thread count), as `bench/convert-bench.mjs` compares it.
"""
import sys

import sd_mecha

from reference_merge import timed_merge  # the sibling script


def main():
    path, target, out = sys.argv[1], sys.argv[2], sys.argv[3]
    recipe = sd_mecha.convert(sd_mecha.model(path), target)
    timed_merge(recipe, out)


if __name__ == "__main__":
    main()
