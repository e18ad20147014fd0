#!/usr/bin/env python3
"""PyTorch gloo all_reduce on loopback, the reference for benches/allreduce.rs.

Launcher mode (no --rank): checks that torch can be imported (installing the few missing
pure-python dependencies into ~/.cache/troupe/pydeps with pip, once), starts W worker
processes of this script, and prints one line per size:

    RESULT <bytes> <seconds>     median over repetitions of the slowest rank
or, if torch cannot be used:
    SKIP <reason>

Worker mode (--rank r): torch.distributed with backend gloo, one thread per process.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

HOME = os.path.expanduser("~")
# The torch the setup scripts install (the full wheel, whose CUDA libraries sit next to it),
# then the CPU-only folder of older setups; TROUPE_TORCH_PY overrides.
TORCH_DIR = os.environ.get("TROUPE_TORCH_PY") or next(
    (d for d in (os.path.join(HOME, ".cache/troupe/torch-2.11.0-full"), os.path.join(HOME, ".cache/troupe/torch-2.11.0-cpu"))
     if os.path.isdir(d)), "")
PYDEPS = os.path.join(HOME, ".cache/troupe/pydeps")
# Pure-python packages torch imports; the wheel was installed without dependencies.
KNOWN_DEPS = {
    "typing_extensions": "typing_extensions",
    "sympy": "sympy",
    "mpmath": "mpmath",
    "filelock": "filelock",
    "networkx": "networkx",
    "jinja2": "jinja2",
    "markupsafe": "MarkupSafe",
    "fsspec": "fsspec",
    "numpy": "numpy",
}


def child_env():
    env = dict(os.environ)
    paths = [d for d in (TORCH_DIR, PYDEPS) if d] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["OMP_NUM_THREADS"] = "1"
    return env


def try_import():
    """(ok, missing_module_or_None, message) for `import torch.distributed` in a subprocess."""
    code = (
        "import importlib, sys\n"
        "try:\n"
        "    import torch, torch.distributed as dist\n"
        "    print('OK', torch.__version__, dist.is_gloo_available())\n"
        "except ModuleNotFoundError as e:\n"
        "    print('MISSING', e.name); sys.exit(3)\n"
        "except Exception as e:\n"
        "    print('ERROR', type(e).__name__, str(e).splitlines()[0] if str(e) else ''); sys.exit(4)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    out = (p.stdout.strip().splitlines() or [""])[-1]
    if out.startswith("OK"):
        if out.endswith("False"):
            return False, None, "torch was built without gloo"
        return True, None, out
    if out.startswith("MISSING"):
        return False, out.split()[-1], out
    return False, None, out or p.stderr.strip()[-300:]


def ensure_torch():
    """None if torch is importable (after installing missing pure-python deps), else why not."""
    if not os.path.isdir(TORCH_DIR):
        return f"torch not found at {TORCH_DIR}"
    installed = set()
    for _ in range(len(KNOWN_DEPS) + 1):
        ok, missing, msg = try_import()
        if ok:
            return None
        if missing is None:
            return f"import torch failed: {msg}"
        top = missing.split(".")[0]
        pkg = KNOWN_DEPS.get(top)
        if pkg is None or pkg in installed:
            return f"import torch failed: missing module {missing!r} (not a known pure-python dependency)"
        os.makedirs(PYDEPS, exist_ok=True)
        print(f"gloo bench: installing {pkg} into {PYDEPS}", file=sys.stderr)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", PYDEPS, pkg],
            capture_output=True, text=True, timeout=600,
        )
        if r.returncode != 0:
            return f"pip install {pkg} failed: {r.stderr.strip()[-300:]}"
        installed.add(pkg)
    return "import torch still failing after installing dependencies"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(args):
    why = ensure_torch()
    if why is not None:
        print(f"SKIP {why}")
        return 0
    port = free_port()
    procs = []
    for r in range(args.world):
        cmd = [sys.executable, __file__, "--rank", str(r), "--world", str(args.world), "--port", str(port),
               "--sizes", args.sizes, "--reps", args.reps]
        procs.append(subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        print(f"SKIP gloo workers failed (exit codes {[p.returncode for p in procs]})")
        return 0
    sys.stdout.write(outs[0])
    return 0


def worker(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world)
    sizes = [int(x) for x in args.sizes.split(",")]
    reps = [int(x) for x in args.reps.split(",")]
    for nbytes, n_reps in zip(sizes, reps):
        t = torch.ones(nbytes // 4, dtype=torch.float32)
        times = []
        for rep in range(n_reps + 1):  # rep 0 warms up
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            dt = time.perf_counter() - t0
            if rep > 0:
                times.append(dt)
        times.sort()
        med = torch.tensor([times[len(times) // 2]], dtype=torch.float64)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)  # slowest rank
        if args.rank == 0:
            print(f"RESULT {nbytes} {med.item()}", flush=True)
    dist.destroy_process_group()
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--sizes", required=True, help="comma-separated byte sizes")
    ap.add_argument("--reps", required=True, help="comma-separated repetitions per size")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--port", type=int)
    args = ap.parse_args()
    return launcher(args) if args.rank is None else worker(args)


if __name__ == "__main__":
    sys.exit(main())
