"""Tokens/s and model FLOPs utilisation of a `troupe local` run, from its events.jsonl.

    python3 scripts/gpu_mfu.py EVENTS CONFIG GPU_NAME FIGURES [SKIP]

Prints a summary and adds it to FIGURES (JSON, created if missing) under "training". The
first SKIP steps (default 10: start-up, allocator warm-up, cuDNN/flash-attention autotuning)
are left out of the median. FLOPs per token follow nanoGPT's estimate_mfu (PaLM's appendix B):
6 N + 12 L d T, with N the parameters without position embeddings (the head shares the token
embedding). The GPU's dense bf16 peak comes from TROUPE_PEAK_TFLOPS, else from its name.
Used by scripts/gpu-check.sh; tested in tests/scripts.rs.
"""
import json
import os
import re
import statistics
import sys

PEAK_TFLOPS_BF16 = [("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0)]


def main(events_path, config_path, gpu_name, figures_path, skip=10):
    steps = [e for e in map(json.loads, open(events_path)) if e.get("event") == "step"]
    if len(steps) <= skip:
        sys.exit(f"only {len(steps)} steps were recorded in {events_path}, need more than {skip}")
    text = open(config_path).read()

    def number(key):
        return int(re.search(rf"^{key}\s*=\s*(\d+)", text, re.M).group(1))

    layers, width, context = number("n_layer"), number("n_embd"), number("block_size")
    data_dir = re.search(r'^dir\s*=\s*"(.*)"', text, re.M).group(1)
    if not os.path.isabs(data_dir):
        data_dir = os.path.join(os.path.dirname(os.path.abspath(config_path)), data_dir)
    vocab = json.load(open(os.path.join(data_dir, "meta.json")))["vocab_size"]
    bias = re.search(r"^bias\s*=\s*false", text, re.M) is None
    # Per block: attention (qkv 3d^2, projection d^2) and MLP (8 d^2) weights, their biases
    # (3d + d + 4d + d) and two LayerNorms (4d); then the token embedding and the last LayerNorm.
    per_block = 12 * width * width + ((13 * width) if bias else (4 * width))
    params = layers * per_block + vocab * width + (2 * width if bias else width)
    flops_per_token = 6 * params + 12 * layers * width * context
    peak_env = os.environ.get("TROUPE_PEAK_TFLOPS")
    peak_tflops = float(peak_env) if peak_env else next((p for name, p in PEAK_TFLOPS_BF16 if name in gpu_name), 0.0)
    tokens_per_second = statistics.median(s["tokens_per_sec"] for s in steps[skip:])
    mfu = tokens_per_second * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None
    print(f"   {params / 1e6:.1f} M parameters (vocabulary {vocab}), {flops_per_token / 1e9:.3f} GFLOP per token")
    mfu_text = f"MFU {mfu * 100:.1f}% of {peak_tflops:.0f} TFLOPS bf16" if mfu is not None else "MFU unknown (set TROUPE_PEAK_TFLOPS)"
    print(f"   median over steps {skip}-{len(steps) - 1}: {tokens_per_second:,.0f} tokens/s, {mfu_text}")
    print(f"   loss {steps[0]['loss']:.4f} at step 0, {steps[-1]['loss']:.4f} at step {len(steps) - 1}")
    figures = json.load(open(figures_path)) if os.path.exists(figures_path) else {}
    figures["training"] = {
        "gpu": gpu_name,
        "steps": len(steps),
        "parameters": params,
        "vocab_size": vocab,
        "flops_per_token": flops_per_token,
        "tokens_per_second": tokens_per_second,
        "peak_tflops_bf16": peak_tflops,
        "mfu": mfu,
        "losses": [s["loss"] for s in steps],
    }
    with open(figures_path, "w") as f:
        json.dump(figures, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    main(*sys.argv[1:5], *([int(sys.argv[5])] if len(sys.argv) == 6 else []))
