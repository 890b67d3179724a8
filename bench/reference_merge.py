"""Runs one merge with sd-mecha 1.1.8 for the benchmarks; prints a JSON line with timings.

usage: reference_merge.py <a.safetensors> <b.safetensors> <out.safetensors> <alpha> [method]
"""
import json
import os
import sys
import time

import sd_mecha


def main():
    a, b, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    method = sys.argv[5] if len(sys.argv) > 5 else "weighted_sum"
    # The registered method (sd_mecha's top-level names may be wrappers).
    resolve = sd_mecha.extensions.merge_methods.resolve
    recipe = resolve(method)(sd_mecha.model(a), sd_mecha.model(b), alpha=alpha)
    timed_merge(recipe, out)


def timed_merge(recipe, out):
    """Merges with sd-mecha's defaults (fp32 compute, fp16 output, its own thread count; no
    progress bar) and prints the JSON timing line the benchmarks read."""
    started = time.perf_counter()
    sd_mecha.merge(recipe, output=out, tqdm=lambda *args, **kwargs: _NoProgress())
    merged = time.perf_counter()
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)  # sd-mecha does not flush; time it separately for a like-for-like figure
    os.close(fd)
    synced = time.perf_counter()
    print(json.dumps({"seconds": merged - started, "seconds_with_fsync": synced - started}))


class _NoProgress:
    def set_postfix(self, *args, **kwargs):
        pass

    def update(self, *args, **kwargs):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
