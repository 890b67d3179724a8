"""Merges one `.mecha` recipe with sd-mecha 1.1.8 for the benchmarks; prints a JSON line with
the merge's seconds (its defaults: fp32 compute, fp16 output, its own thread count).

usage: reference_recipe.py <recipe.mecha> <out.safetensors> [--progress <file>]

With --progress, the file always holds "<keys done> <keys in all> <seconds at the last key>
<unix time the merge started> <peak RSS KiB>", so a run stopped by a time limit still says how far it got.
"""
import json
import os
import resource
import sys
import time

import sd_mecha

from reference_merge import _NoProgress


def main():
    recipe_path, out = sys.argv[1], sys.argv[2]
    progress_path = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--progress" else None
    with open(recipe_path, encoding="utf-8") as f:
        recipe = sd_mecha.deserialize(f.read())
    started = time.perf_counter()
    if progress_path is None:
        progress = lambda *args, **kwargs: _NoProgress()
    else:
        progress = lambda *args, total=0, **kwargs: _ProgressFile(progress_path, total, started)
    sd_mecha.merge(recipe, output=out, tqdm=progress)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def _peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _ProgressFile(_NoProgress):
    """Rewrites one line of progress per finished key (sd-mecha calls update() once per key)."""

    def __init__(self, path, total, started):
        self.path, self.total, self.started, self.done = path, total, started, 0
        self.started_unix = time.time() - (time.perf_counter() - started)
        self._write()

    def update(self, n=1, *args, **kwargs):
        self.done += n
        self._write()

    def _write(self):
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(f"{self.done} {self.total} {time.perf_counter() - self.started:.2f} {self.started_unix:.3f} {_peak_rss_kib()}\n")
        os.replace(temporary, self.path)


if __name__ == "__main__":
    main()
