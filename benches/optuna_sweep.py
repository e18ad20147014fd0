"""Optuna's search driving `troupe local`, for `cargo bench --bench sweep`.

The same search space, trial count, step budget and data as the troupe sweep beside it:
Optuna's TPE sampler (seeded) and median pruner. Each trial is one `troupe local` run with
`--set` overrides, run to completion one after another (Optuna's usual single-process loop);
the script follows the run's events.jsonl, reports every validation loss to the trial, and
sends SIGTERM to the run when the pruner says so.

usage: optuna_sweep.py TROUPE_BIN OUT_DIR TRIALS STEPS EVAL_INTERVAL SEED THREADS
prints one JSON line: best value, best params, total steps, pruned trials.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna


def main():
    troupe, out, trials, steps, interval, seed, threads = sys.argv[1:8]
    trials, steps, interval, seed = int(trials), int(steps), int(interval), int(seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, trials // 4))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=interval - 1)
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    total_steps = 0

    def objective(trial):
        nonlocal total_steps
        lr = trial.suggest_float("train.learning_rate", 1e-4, 3e-2, log=True)
        warmup = trial.suggest_int("train.warmup_steps", 5, 60)
        name = f"optuna-{trial.number:03d}"
        cmd = [
            troupe, "local", "--out", out, "--workers", "1", "--sample-tokens", "0",
            "--set", f"run.name={name}", "--set", "deploy.enabled=false",
            "--set", f"train.steps={steps}", "--set", f"eval.interval={interval}", "--set", "train.min_learning_rate=1e-5",
            "--set", f"checkpoint.interval={steps}", "--set", f"train.threads_per_worker={threads}",
            "--set", f"train.learning_rate={lr!r}", "--set", f"train.warmup_steps={warmup}",
        ]
        log = open(os.path.join(out, f"{name}.log"), "w")
        run = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        events = os.path.join(out, name, "events.jsonl")
        seen, offset, last, pruned, furthest = set(), 0, None, False, 0
        while True:
            done = run.poll() is not None
            if os.path.exists(events):
                with open(events) as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                offset += len(complete.encode())
                for line in complete.splitlines():
                    event = json.loads(line)
                    furthest = max(furthest, event.get("step", 0))
                    if event.get("event") == "eval" and event["step"] not in seen:
                        seen.add(event["step"])
                        last = event["val_loss"]
                        trial.report(last, event["step"])
                        if not pruned and trial.should_prune():
                            pruned = True
                            run.send_signal(signal.SIGTERM)
            if done:
                break
            time.sleep(0.2)
        total_steps += furthest
        if pruned:
            raise optuna.TrialPruned()
        if run.returncode != 0 or last is None or not math.isfinite(last):
            raise RuntimeError(f"{name} failed (exit {run.returncode})")
        return last

    started = time.time()
    study.optimize(objective, n_trials=trials, catch=(RuntimeError,))
    best = study.best_trial
    print(json.dumps({
        "best": best.value,
        "params": best.params,
        "total_steps": total_steps,
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "seconds": time.time() - started,
    }))


if __name__ == "__main__":
    main()
