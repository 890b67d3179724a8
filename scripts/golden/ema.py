"""exchange_ema with the real sd-mecha 1.1.8, for `__test__/interfaces.spec.ts`.

Not part of CI (needs bench/.venv, see README.md). Writes a small sd1-ldm checkpoint with real
key names (two UNet weights, their EMA copies, EMA bookkeeping, a VAE and a text-encoder key)
and what sd-mecha's `exchange_ema` makes of it, to `__test__/fixtures/golden/ema/`:

- `input.safetensors`: the checkpoint (f32, values from a seeded generator);
- `expected.safetensors`: `merge(exchange_ema(model(input)), validate_mm_contract=False,
  output_dtype=float32)`. With the default contract validation 1.1.8 raises instead; the error
  is printed and recorded in `expected.json`, as the difference this library removes.

    bench/.venv/bin/python scripts/golden/ema.py
"""
import json
import os
import pathlib

os.environ.setdefault("TQDM_DISABLE", "1")
import safetensors.torch
import sd_mecha
import torch

OUT = pathlib.Path(__file__).resolve().parents[2] / "__test__" / "fixtures" / "golden" / "ema"
SHAPES = {
    "model.diffusion_model.out.2.weight": [4, 8, 3, 3],
    "model.diffusion_model.input_blocks.0.0.bias": [8],
    "model_ema.diffusion_modelout2weight": [4, 8, 3, 3],
    "model_ema.diffusion_modelinput_blocks00bias": [8],
    "model_ema.decay": [],
    "first_stage_model.decoder.conv_out.bias": [3],
    "cond_stage_model.transformer.text_model.final_layer_norm.bias": [16],
}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(20261204)
    tensors = {k: torch.randn(shape, generator=generator, dtype=torch.float32) for k, shape in SHAPES.items()}
    source = OUT / "input.safetensors"
    safetensors.torch.save_file(tensors, str(source))
    method = sd_mecha.extensions.merge_methods.resolve("exchange_ema")
    recipe = method(sd_mecha.model(str(source)))
    try:
        sd_mecha.merge(recipe, output_dtype=torch.float32)
        default_error = None
    except Exception as e:  # 1.1.8: the method has no key map for the contract check
        default_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    out = sd_mecha.merge(recipe, validate_mm_contract=False, output_dtype=torch.float32)
    out = {k: v.contiguous() for k, v in out.items() if k != "__metadata__"}
    safetensors.torch.save_file(out, str(OUT / "expected.safetensors"))
    (OUT / "expected.json").write_text(
        json.dumps({"keys": sorted(out), "default_contract_error": default_error}, indent=2) + "\n"
    )
    print(f"wrote {len(out)} keys; with the default contract validation: {default_error}")


if __name__ == "__main__":
    main()
