#!/usr/bin/env python3
"""A PyTorch DistributedDataParallel reference for troupe's training throughput (benches/peers.rs).

A small nanoGPT-style GPT with exactly troupe's model, data, batch, optimizer and schedule, read
from the same run configuration (TOML) and the same prepared data folder, trained by W
processes with torch.distributed (gloo) and DDP. It replicates troupe in detail so that both
losses can be compared step by step, not just "roughly":

- model (common/src/model/gpt.rs): GPT-2 layout with biases, pre-LayerNorm (eps 1e-5), GELU
  with the tanh approximation (GPT-2's "gelu_new"; nanoGPT uses the exact erf GELU), causal
  scaled_dot_product_attention, the output head tied to the token embedding, no dropout here;
- initial weights: troupe draws them from its own SplitMix64 + Marsaglia polar generator
  (common/src/model/rng.rs) in parameter order, N(0, 0.02) and N(0, 0.02/sqrt(2 n_layer)) for
  the two residual projections, zero biases, unit LayerNorm weights. This script reproduces
  that stream bit for bit, so both systems start from the same weights;
- data (common/src/data): train.bin is little-endian u16 ids; sample i is the window of
  block_size + 1 tokens at i * block_size; the order is troupe's per-epoch Fisher-Yates shuffle
  (SplitMix64 seeded by run.seed), and step s takes stream positions
  [s * global_batch, (s + 1) * global_batch), rank r its contiguous slice. Reproduced exactly,
  so both systems see the same sequences at every step;
- step (worker/src/trainer/ddp.rs): micro-batches of train.micro_batch (gradient accumulation
  under no_sync), each loss scaled so the all-reduced gradient is that of the mean loss over
  the global batch; clip_grad_norm_ to train.grad_clip; AdamW with weight decay on tensors of
  dimension >= 2 only (matrices and both embeddings), lr from troupe's schedule (linear warmup
  as (s + 1) / (warmup + 1), cosine to min_learning_rate at train.steps).

Launcher mode (no --rank): finds a torch that can be imported, starts W worker processes of
this script (env:// rendezvous on loopback) and prints, from rank 0:

    TORCH <version> <path>
    STEP <step> <loss> <seconds>     per step: global mean train loss, wall time of the step
    VAL <loss> <sequences>           mean loss over the first eval.sequences validation windows
    DONE
or, if torch cannot be used:
    SKIP <reason>

A step's time is the wall time from the end of the previous step (or the start barrier) to the
end of this one on rank 0: the loop runs back to back, so step times tile the run, as troupe's
coordinator measures them. Tokens/s = global_batch * block_size / step time.

Env: TROUPE_TORCH_PY (a folder to put on PYTHONPATH that holds torch; default: the first of
~/.cache/troupe/torch-2.11.0-full, ~/.cache/troupe/torch-2.11.0-cpu, or python3's own torch
that imports), TROUPE_BENCH_THREADS (intra-op threads per process, default 1).
"""

import argparse
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover
    tomllib = None

HOME = os.path.expanduser("~")
MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


# ---------------------------------------------------------------------------------------------
# Finding torch

def torch_candidates():
    env = os.environ.get("TROUPE_TORCH_PY")
    if env:
        return [env]
    return [os.path.join(HOME, ".cache/troupe/torch-2.11.0-full"),
            os.path.join(HOME, ".cache/troupe/torch-2.11.0-cpu"),
            ""]  # "": python3's own site-packages


def child_env(torch_dir, threads):
    env = dict(os.environ)
    paths = ([torch_dir] if torch_dir else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


def find_torch(threads):
    """(torch_dir, 'version path') of the first candidate where torch.distributed with gloo
    imports, or (None, why not)."""
    code = ("import torch, torch.distributed as d\n"
            "assert d.is_available() and d.is_gloo_available(), 'torch.distributed/gloo unavailable'\n"
            "print('OK', torch.__version__, torch.__file__)\n")
    failures = []
    for cand in torch_candidates():
        if cand and not os.path.isdir(cand):
            failures.append(f"{cand}: no such folder")
            continue
        try:
            p = subprocess.run([sys.executable, "-c", code], env=child_env(cand, threads),
                               capture_output=True, text=True, timeout=300)
        except Exception as e:  # noqa: BLE001
            failures.append(f"{cand or 'python3'}: {e}")
            continue
        last = (p.stdout.strip().splitlines() or [""])[-1]
        if p.returncode == 0 and last.startswith("OK "):
            return cand, last[3:]
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        failures.append(f"{cand or 'python3'}: {err[:200]}")
    return None, "no importable torch with gloo (" + "; ".join(failures) + ")"


# ---------------------------------------------------------------------------------------------
# troupe's random streams, reproduced (common/src/model/rng.rs, common/src/data/sampler.rs)

def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def _f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def _bits_f64(b):
    return struct.unpack("<d", struct.pack("<Q", b))[0]


SQRT_2 = 1.4142135623730951
LN_2 = 0.6931471805599453
MIN_POSITIVE = 2.2250738585072014e-308


def portable_ln(x):
    """troupe's libm-free ln (rng.rs), operation for operation: the same bits as troupe."""
    extra = 0
    if x < MIN_POSITIVE:
        x, extra = x * float(1 << 54), -54
    bits = _f64_bits(x)
    e = ((bits >> 52) & 0x7FF) - 1023 + extra
    m = _bits_f64((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)
    if m > SQRT_2:
        m *= 0.5
        e += 1
    t = (m - 1.0) / (m + 1.0)
    t2 = t * t
    series = 0.0
    for k in range(11, -1, -1):
        series = series * t2 + 1.0 / float(2 * k + 1)
    return float(e) * LN_2 + 2.0 * t * series


class TroupeRng:
    """SplitMix64 with Marsaglia's polar normals: troupe's parameter initialisation stream."""

    def __init__(self, seed):
        self.state = seed & MASK64
        self.spare = None

    def next_u64(self):
        self.state = (self.state + GAMMA) & MASK64
        return mix64(self.state)

    def next_f64(self):
        return (self.next_u64() >> 11) * (1.0 / float(1 << 53))

    def normal(self):
        if self.spare is not None:
            z, self.spare = self.spare, None
            return z
        while True:
            u = 2.0 * self.next_f64() - 1.0
            v = 2.0 * self.next_f64() - 1.0
            s = u * u + v * v
            if 0.0 < s < 1.0:
                factor = math.sqrt(-2.0 * portable_ln(s) / s)
                self.spare = v * factor
                return u * factor


def epoch_permutation(num_samples, seed, epoch):
    """troupe's Sampler::permutation: Fisher-Yates driven by SplitMix64::for_epoch."""
    state = mix64(seed ^ mix64((epoch + GAMMA) & MASK64))
    order = list(range(num_samples))

    def next_u64():
        nonlocal state
        state = (state + GAMMA) & MASK64
        return mix64(state)

    for i in range(num_samples - 1, 0, -1):
        bound = i + 1
        product = next_u64() * bound  # Lemire's method without modulo bias
        if (product & MASK64) < bound:
            threshold = ((-bound) & MASK64) % bound
            while (product & MASK64) < threshold:
                product = next_u64() * bound
        j = product >> 64
        order[i], order[j] = order[j], order[i]
    return order


class Sampler:
    """Global-cursor sampler: stream position p is perm(seed, p // n)[p % n]."""

    def __init__(self, num_samples, seed):
        self.n, self.seed, self.cached = num_samples, seed, None

    def sample_at(self, position):
        epoch, slot = divmod(position, self.n)
        if self.cached is None or self.cached[0] != epoch:
            self.cached = (epoch, epoch_permutation(self.n, self.seed, epoch))
        return self.cached[1][slot]


def rank_range(global_batch, rank, world):
    base, extra = divmod(global_batch, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def lr_at(step, train):
    """troupe's lr_at (optim.rs): nanoGPT's warmup + cosine schedule."""
    max_lr, min_lr = train["learning_rate"], train["min_learning_rate"]
    warmup, steps = train["warmup_steps"], train["steps"]
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    if step >= steps:
        return min_lr
    ratio = (step - warmup) / (steps - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return max_lr - (1.0 - coeff) * (max_lr - min_lr)


# ---------------------------------------------------------------------------------------------
# The model (nanoGPT style, troupe's shapes and choices)

def build_model(torch, cfg):
    nn, F = torch.nn, torch.nn.functional

    class CausalSelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_head = cfg["n_head"]
            self.c_attn = nn.Linear(cfg["n_embd"], 3 * cfg["n_embd"], bias=cfg["bias"])
            self.c_proj = nn.Linear(cfg["n_embd"], cfg["n_embd"], bias=cfg["bias"])

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = nn.Linear(cfg["n_embd"], 4 * cfg["n_embd"], bias=cfg["bias"])
            self.c_proj = nn.Linear(4 * cfg["n_embd"], cfg["n_embd"], bias=cfg["bias"])

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(cfg["n_embd"], eps=1e-5, bias=cfg["bias"])
            self.attn = CausalSelfAttention()
            self.ln_2 = nn.LayerNorm(cfg["n_embd"], eps=1e-5, bias=cfg["bias"])
            self.mlp = Mlp()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg["vocab_size"], cfg["n_embd"]),
                wpe=nn.Embedding(cfg["block_size"], cfg["n_embd"]),
                h=nn.ModuleList([Block() for _ in range(cfg["n_layer"])]),
                ln_f=nn.LayerNorm(cfg["n_embd"], eps=1e-5, bias=cfg["bias"]),
            ))

        def forward(self, idx, targets):
            tr = self.transformer
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = tr.wte(idx) + tr.wpe(pos)
            for block in tr.h:
                x = block(x)
            logits = F.linear(tr.ln_f(x), tr.wte.weight)  # the head is tied to wte
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)

    return GPT()


def troupe_init_(torch, model, cfg, seed):
    """Sets the parameters to troupe's initial values for `seed` (gpt.rs Gpt::new): one normal
    stream in canonical parameter order; Normal tensors consume it, zeros and ones do not."""
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * cfg["n_layer"])
    rng = TroupeRng(seed)
    tr = model.transformer

    def normal_(p, s):
        values = [rng.normal() * s for _ in range(p.numel())]
        with torch.no_grad():
            # float64 -> float32 rounds to nearest, like Rust's `as f32`.
            p.copy_(torch.tensor(values, dtype=torch.float64).view(p.shape).to(torch.float32))

    def linear_(lin, s):
        normal_(lin.weight, s)  # [out, in], row-major: tch's layout and draw order
        if lin.bias is not None:
            torch.nn.init.zeros_(lin.bias)

    def ln_(ln):
        torch.nn.init.ones_(ln.weight)
        if ln.bias is not None:
            torch.nn.init.zeros_(ln.bias)

    normal_(tr.wte.weight, std)
    normal_(tr.wpe.weight, std)
    for block in tr.h:
        ln_(block.ln_1)
        linear_(block.attn.c_attn, std)
        linear_(block.attn.c_proj, resid_std)
        ln_(block.ln_2)
        linear_(block.mlp.c_fc, std)
        linear_(block.mlp.c_proj, resid_std)
    ln_(tr.ln_f)


# ---------------------------------------------------------------------------------------------
# Worker

def read_tokens(torch, path):
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) % 2:
        raise SystemExit(f"{path}: odd length, not u16 tokens")
    if sys.byteorder != "little":
        raise SystemExit("big-endian host not supported")
    # Little-endian u16 ids: read as int16, widen, undo the sign.
    return torch.frombuffer(bytearray(raw), dtype=torch.int16).to(torch.int64) & 0xFFFF


def worker(args):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    with open(args.config, "rb") as f:
        conf = tomllib.load(f)
    train, mcfg, run = conf["train"], conf["model"], conf["run"]
    train["warmup_steps"] = min(train["warmup_steps"], train["steps"])  # as troupe's --steps does
    data_dir = conf["data"]["dir"]
    with open(os.path.join(data_dir, "meta.json")) as f:
        vocab_size = json.load(f)["vocab_size"]
    cfg = dict(mcfg, vocab_size=vocab_size)
    if cfg.get("dropout", 0.0) != 0.0:
        print("note: dropout is ignored (troupe's benchmark config has none)", file=sys.stderr)
    block, global_batch, micro = cfg["block_size"], train["global_batch"], train["micro_batch"]
    seed = run["seed"]

    dist.init_process_group("gloo", rank=args.rank, world_size=args.world)
    rank, world = dist.get_rank(), dist.get_world_size()

    train_tokens = read_tokens(torch, os.path.join(data_dir, "train.bin"))
    val_tokens = read_tokens(torch, os.path.join(data_dir, "val.bin"))
    num_samples = (len(train_tokens) - 1) // block
    sampler = Sampler(num_samples, seed)
    window = torch.arange(block + 1)

    def batch(tokens, ids):
        w = tokens[torch.tensor(ids, dtype=torch.int64)[:, None] * block + window]  # [n, block+1]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    model = build_model(torch, cfg)
    troupe_init_(torch, model, cfg, seed)
    ddp = DDP(model)  # broadcasts rank 0's parameters (already identical here)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr_at(0, train), betas=(train["beta1"], train["beta2"]), eps=train["eps"])

    mine = rank_range(global_batch, rank, world)
    losses, seconds = [], []
    dist.barrier()
    t_prev = time.perf_counter()
    for step in range(train["steps"]):
        cursor = step * global_batch
        ids = [sampler.sample_at(cursor + off) for off in mine]
        chunks = [ids[i:i + micro] for i in range(0, len(ids), micro)]
        loss_share = 0.0
        for k, chunk in enumerate(chunks):
            x, y = batch(train_tokens, chunk)
            # DDP averages gradients over ranks: scale so the sum is d(mean loss over the
            # global batch), as troupe's chunk.len() / global_batch weights are.
            weight = len(chunk) / global_batch
            if k < len(chunks) - 1:
                with ddp.no_sync():
                    loss = ddp(x, y)
                    (loss * (weight * world)).backward()
            else:
                loss = ddp(x, y)
                (loss * (weight * world)).backward()
            loss_share += loss.item() * weight
        if train["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, train)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t = time.perf_counter()
        seconds.append(t - t_prev)
        t_prev = t
        losses.append(loss_share)

    # Outside the timed loop: the global loss per step (sum of the ranks' shares) and the
    # validation loss over the first eval.sequences windows of val.bin, as troupe evaluates.
    loss_t = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(loss_t)
    num_val = (len(val_tokens) - 1) // block
    total_val = min(num_val, conf["eval"]["sequences"])
    val_ids = list(rank_range(total_val, rank, world))
    val_sum = torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(val_ids), micro):
            chunk = val_ids[i:i + micro]
            x, y = batch(val_tokens, chunk)
            val_sum += model(x, y).double() * len(chunk)
    dist.all_reduce(val_sum)
    if rank == 0:
        for step, (loss, secs) in enumerate(zip(loss_t.tolist(), seconds)):
            print(f"STEP {step} {loss!r} {secs!r}")
        print(f"VAL {val_sum.item() / max(total_val, 1)!r} {total_val}")
        print("DONE", flush=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's teardown: gloo's threads can abort it there ("terminate
    # called without an active exception"), after all the work is done and reported.
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# Launcher

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(args):
    if tomllib is None:
        print("SKIP python3 >= 3.11 is needed (tomllib)")
        return 0
    torch_dir, info = find_torch(args.threads)
    if torch_dir is None:
        print(f"SKIP {info}")
        return 0
    print(f"TORCH {info}", flush=True)
    env = child_env(torch_dir, args.threads)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(args.world))
    procs, outs, readers = [], [], []
    try:
        for r in range(args.world):
            cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--world", str(args.world),
                   "--threads", str(args.threads), "--rank", str(r)]
            p = subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, text=True)
            procs.append(p)
            outs.append([])
            # Read each rank's output as it comes, so that no rank blocks on a full pipe.
            readers.append(threading.Thread(target=lambda p=p, out=outs[-1]: out.append(p.stdout.read()), daemon=True))
            readers[-1].start()
        # Until every rank has exited; the first one that fails ends the run (the others would
        # wait in gloo for their peer until its timeout).
        deadline = time.monotonic() + 3600
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for t in readers:
        t.join(timeout=10)
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes):
        print(f"SKIP DDP workers failed (exit codes {codes}; their errors are above)")
        return 0
    sys.stdout.write("".join(outs[0]))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="troupe run configuration (TOML)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TROUPE_BENCH_THREADS", "1")))
    ap.add_argument("--rank", type=int, help="(internal) worker mode")
    args = ap.parse_args()
    return launcher(args) if args.rank is None else worker(args)


if __name__ == "__main__":
    sys.exit(main())
