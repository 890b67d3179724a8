"""Bakes one LoRA into a checkpoint with sd-mecha 1.1.8 for the benchmarks; prints a JSON line with timings.

usage: reference_lora.py <base.safetensors> <lora.safetensors> <out.safetensors> <alpha>

The recipe is sd-mecha's examples/lora_merge.py:
`add_difference(base, convert(lora, base), alpha=alpha) | base`, merged with sd-mecha's defaults
(fp32 compute, fp16 output, its own thread count), as `bench/lora-bench.mjs` compares it.
"""
import sys

import sd_mecha

from reference_merge import timed_merge  # the sibling script


def main():
    base_path, lora_path, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    resolve = sd_mecha.extensions.merge_methods.resolve
    base = sd_mecha.model(base_path)
    lora = sd_mecha.model(lora_path)
    recipe = resolve("add_difference")(base, sd_mecha.convert(lora, base), alpha=alpha) | base
    timed_merge(recipe, out)


if __name__ == "__main__":
    main()
