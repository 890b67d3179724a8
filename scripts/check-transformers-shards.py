"""Checks sharded checkpoints against Hugging Face `transformers` itself, both ways (run outside
CI, in the bench venv, after `npm run build`; `bash bench/setup-reference.sh` and
`bench/.venv/bin/pip install mergekit==0.1.5` provide torch and transformers):

    bench/.venv/bin/python scripts/check-transformers-shards.py

1. `save_pretrained` writes two tiny Qwen2 models as sharded checkpoints (small max_shard_size);
2. `mecha merge` reads those folders and writes weighted_sum(a, b, 0.25) sharded, with
   `--max-shard-size`;
3. `from_pretrained` loads the output with no missing or unexpected keys, and every weight is
   0.75·a + 0.25·b (to bf16 rounding).
Prints one line per check and exits non-zero on the first failure.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

HERE = os.path.dirname(os.path.abspath(__file__))
CLI = os.path.join(HERE, "..", "dist", "cli.js")


def tiny_qwen(seed: int, path: str) -> dict:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="20KB", safe_serialization=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        a_dir, b_dir, out = (os.path.join(tmp, n) for n in ("a", "b", "merged"))
        a, b = tiny_qwen(1, a_dir), tiny_qwen(2, b_dir)
        shards = [n for n in os.listdir(a_dir) if n.endswith(".safetensors")]
        assert len(shards) > 1, f"transformers wrote {shards}"
        print(f"ok: transformers wrote {len(shards)} shards and an index")

        recipe = os.path.join(tmp, "r.json")
        with open(recipe, "w") as f:
            json.dump(
                {
                    "nodes": [
                        {"model": a_dir},
                        {"model": b_dir},
                        {"merge": "weighted_sum", "args": [{"node": 0}, {"node": 1}], "kwargs": {"alpha": 0.25}},
                    ]
                },
                f,
            )
        run = subprocess.run(
            ["node", CLI, "merge", recipe, "-o", out, "--max-shard-size", "20KB", "--output-dtype", "bf16", "--quiet"],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr
        written = sorted(os.listdir(out))
        assert "model.safetensors.index.json" in written and len(written) > 2, written
        print(f"ok: mecha merge read both checkpoints and wrote {len(written) - 1} shards")

        # from_pretrained needs the config next to the weights, as any checkpoint has
        for name in ("config.json", "generation_config.json"):
            if os.path.exists(os.path.join(a_dir, name)):
                with open(os.path.join(a_dir, name)) as src, open(os.path.join(out, name), "w") as dst:
                    dst.write(src.read())
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        print("ok: from_pretrained loaded the output with no missing or unexpected keys")

        loaded = model.state_dict()
        for key, va in a.items():
            expected = (0.75 * va.float() + 0.25 * b[key].float()).to(torch.bfloat16)
            got = loaded[key]
            if not torch.equal(got, expected):
                diff = (got.float() - expected.float()).abs().max().item()
                # one bf16 ulp at most: the merge rounds f32 → bf16 once, as the expected value does
                assert diff <= expected.float().abs().max().item() * 2**-7, f"{key}: max diff {diff}"
        print(f"ok: all {len(a)} weights are 0.75·a + 0.25·b")
    return 0


if __name__ == "__main__":
    sys.exit(main())
