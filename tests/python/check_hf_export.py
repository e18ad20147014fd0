"""Checks a folder written by `troupe export` with the Hugging Face stack; tests/export.rs runs
it (with the packages scripts/test.sh installs into the cache on PYTHONPATH).

usage: check_hf_export.py FOLDER --vocab V --block T --n-layer L --n-head H --n-embd C
                          --text TEXT --ids JSON [--no-transformers]

1. With `safetensors` (its numpy API): model.safetensors holds exactly GPT-2's tensors under
   Hugging Face's names (`transformer.…`), float32, with the shapes of the given size
   (Conv1D weights as [in, out]), and `format: pt` metadata; config.json describes that size.
2. Unless --no-transformers: `GPT2LMHeadModel.from_pretrained(FOLDER)` loads every tensor
   (nothing missing, unexpected or mismatched), `AutoTokenizer.from_pretrained(FOLDER)` (the
   fast tokenizer, tokenizer.json) and `GPT2Tokenizer` (the slow one, vocab.json and
   merges.txt) encode TEXT, and the model runs on the token ids JSON.

Prints one JSON object: {"tensors", "parameters", "hf": null or {"logits" [T][V], "fast_ids",
"slow_ids", "fast_decoded", "tokenizer_class", "eos_token", "model_max_length", "torch",
"transformers"}}. Exit status: 0 checked, 1 a check failed (the reason on stderr).
"""

import argparse
import json
import os
import sys


def expected_tensors(vocab: int, block: int, n_layer: int, n_embd: int) -> dict:
    c = n_embd
    shapes = {
        "transformer.wte.weight": (vocab, c),
        "transformer.wpe.weight": (block, c),
        "transformer.ln_f.weight": (c,),
        "transformer.ln_f.bias": (c,),
    }
    for i in range(n_layer):
        h = f"transformer.h.{i}"
        shapes.update({
            f"{h}.ln_1.weight": (c,),
            f"{h}.ln_1.bias": (c,),
            f"{h}.attn.c_attn.weight": (c, 3 * c),
            f"{h}.attn.c_attn.bias": (3 * c,),
            f"{h}.attn.c_proj.weight": (c, c),
            f"{h}.attn.c_proj.bias": (c,),
            f"{h}.ln_2.weight": (c,),
            f"{h}.ln_2.bias": (c,),
            f"{h}.mlp.c_fc.weight": (c, 4 * c),
            f"{h}.mlp.c_fc.bias": (4 * c,),
            f"{h}.mlp.c_proj.weight": (4 * c, c),
            f"{h}.mlp.c_proj.bias": (c,),
        })
    return shapes


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def check_files(args) -> dict:
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = os.path.join(args.folder, "model.safetensors")
    with safe_open(path, framework="np") as f:
        metadata = f.metadata() or {}
    check(metadata.get("format") == "pt", f"model.safetensors metadata {metadata}: Hugging Face expects format=pt")
    tensors = load_file(path)
    want = expected_tensors(args.vocab, args.block, args.n_layer, args.n_embd)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    check(not missing and not extra, f"model.safetensors: missing {missing}, unexpected {extra}")
    for name, shape in want.items():
        t = tensors[name]
        check(t.dtype == np.float32, f"{name}: dtype {t.dtype}, expected float32")
        check(tuple(t.shape) == shape, f"{name}: shape {tuple(t.shape)}, expected {shape}")
        check(bool(np.isfinite(t).all()), f"{name}: not finite")

    with open(os.path.join(args.folder, "config.json")) as f:
        config = json.load(f)
    for key, value in [("model_type", "gpt2"), ("vocab_size", args.vocab), ("n_positions", args.block),
                       ("n_layer", args.n_layer), ("n_head", args.n_head), ("n_embd", args.n_embd)]:
        check(config.get(key) == value, f"config.json: {key} = {config.get(key)!r}, expected {value!r}")
    return {"tensors": len(tensors), "parameters": int(sum(t.size for t in tensors.values()))}


def check_transformers(args, ids: list) -> dict:
    import torch
    import transformers
    from transformers import AutoTokenizer, GPT2LMHeadModel, GPT2Tokenizer

    model, info = GPT2LMHeadModel.from_pretrained(args.folder, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        check(not info.get(kind), f"GPT2LMHeadModel.from_pretrained: {kind} {info.get(kind)}")
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0]

    fast = AutoTokenizer.from_pretrained(args.folder)
    slow = GPT2Tokenizer.from_pretrained(args.folder)
    fast_ids = fast.encode(args.text)
    return {
        "logits": logits.tolist(),
        "fast_ids": fast_ids,
        "slow_ids": slow.encode(args.text),
        "fast_decoded": fast.decode(fast_ids),
        "tokenizer_class": type(fast).__name__,
        "eos_token": fast.eos_token,
        "model_max_length": fast.model_max_length,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    for flag in ("--vocab", "--block", "--n-layer", "--n-head", "--n-embd"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--ids", required=True, help="token ids to run, as a JSON list")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    try:
        result = check_files(args)
        result["hf"] = None if args.no_transformers else check_transformers(args, json.loads(args.ids))
    except AssertionError as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
