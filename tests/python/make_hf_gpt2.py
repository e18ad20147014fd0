"""Makes a small GPT-2 with `transformers` for tests/finetune.rs: random weights from a fixed
seed, saved with `save_pretrained` (model.safetensors, config.json) beside a fast tokenizer
built from a troupe tokenizer.json; then runs the model on 4 x 64 seeded token ids.

usage: make_hf_gpt2.py OUT TOKENIZER_JSON --vocab V --positions T --n-embd C --n-layer L --n-head H --seed S

Prints one JSON object: {"ids": [4][64], "logits": [4][64][V], "transformers": version}.
"""

import argparse
import json

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("tokenizer_json")
    for name in ["--vocab", "--positions", "--n-embd", "--n-layer", "--n-head", "--seed"]:
        p.add_argument(name, type=int, required=True)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.positions, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=args.tokenizer_json, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(args.out)

    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (4, 64), generator=generator)
    with torch.no_grad():
        logits = model(ids).logits
    print(json.dumps({"ids": ids.tolist(), "logits": logits.tolist(), "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
