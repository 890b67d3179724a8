"""What sd-mecha 1.1.8's sdxl-sgm missing-key handler does with pruned checkpoints.

Not part of CI (needs bench/.venv, see README.md). Writes two tiny sdxl-sgm text-encoder
checkpoints (a full one, and one without position_ids, CLIP-L layer 11 and CLIP-G resblock 31)
and merges them with sd-mecha, printing which of those keys its output has. With 1.1.8 it prints
`filled 0` in both cases: keys are filtered by what the input files contain before the handler
can run, so it never fills a key that no input has. This library fills them (the handler's
intent, docs/differences.md).

    bench/.venv/bin/python scripts/golden/missing_keys.py
"""
import os
import tempfile

os.environ.setdefault("TQDM_DISABLE", "1")
import safetensors.torch
import sd_mecha
import torch

POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
PRUNED = (
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.",
    "conditioner.embedders.1.model.transformer.resblocks.31.",
)


def handled(key):
    return key == POSITION_IDS or key.startswith(PRUNED)


config = sd_mecha.extensions.model_configs.resolve("sdxl-sgm")
text_encoder_keys = [k for c in ("clip_l", "clip_g") for k in config.components()[c].keys()]
folder = tempfile.mkdtemp()
full_path, pruned_path = os.path.join(folder, "full.safetensors"), os.path.join(folder, "pruned.safetensors")
safetensors.torch.save_file({k: torch.ones(1) for k in text_encoder_keys}, full_path)
safetensors.torch.save_file({k: torch.ones(1) for k in text_encoder_keys if not handled(k)}, pruned_path)
expected = sum(1 for k in text_encoder_keys if handled(k))

full, pruned = sd_mecha.model(full_path), sd_mecha.model(pruned_path)
for name, recipe in (("pruned alone", sd_mecha.weighted_sum(pruned, pruned)), ("full + pruned", sd_mecha.weighted_sum(full, pruned))):
    out = sd_mecha.merge(recipe, output_dtype=torch.float16)
    out.pop("__metadata__", None)
    filled = sum(1 for k in out if handled(k))
    print(f"{name}: {len(out)} keys written, filled {filled} of the {expected} handled keys")
