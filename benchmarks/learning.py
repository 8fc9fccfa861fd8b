"""What a training recipe teaches in a fixed budget: train, export, then `anymodal eval` on the demo
world's val split; prints one JSON object with the recipe, what training did and the metrics.

Several recipes given with `--recipe` run one after another in one invocation (the first recipe
first), so two recipes are compared on the same data, the same eval documents and the same
machine state; each recipe is a comma-separated list of `anymodal train` overrides laid over the
common ones:

    flock /tmp/anymodal-cpu.lock .venv/bin/python benchmarks/learning.py \\
        --data runs/demo/tokens/train --val 'runs/demo/world/val-*.tar' --minutes 10 \\
        --recipe 'lr=2e-3' --recipe 'lr=4e-3' model_preset=model/demo_4m seq_len=512 micro_batch=8

`--minutes` is the training budget (`max_minutes`: the run ends when its minutes are up, with the
LR annealed); `--steps` gives a step count instead (or a cap with --minutes), which compares
recipes independently of the machine's speed. Eval runs `--eval-limit` documents per task (100
by default: every must-figure of the demo issue is a share of at least 100 documents).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        sys.exit(f"failed (exit {r.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t0


def split_overrides(recipe: str) -> list[str]:
    """'a=1,data=[{path: x, weight: 0.7}, {path: y, weight: 0.3}]' -> the two overrides: commas
    inside brackets or braces belong to the value."""
    parts, depth, cur = [], 0, ""
    for ch in recipe:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur.strip()] if p]


def run_recipe(args, name: str, overrides: list[str]) -> dict:
    out = Path(args.out) / name
    run, bundle, log = out / "run", out / "bundle", out / "log.txt"
    out.mkdir(parents=True, exist_ok=True)
    anymodal = [sys.executable, "-m", "anymodal.cli"]
    budget = [f"max_minutes={args.minutes}"] if args.minutes else []
    steps = [f"steps={args.steps}"] if args.steps else (["steps=1000000"] if args.minutes else [])
    train_cmd = [*anymodal, "train", "--config", args.config, f"data={args.data}", f"run_dir={run}",
                 "progress=false", *budget, *steps, *args.common, *overrides]
    if args.task_eval_every:
        train_cmd += [f"task_eval_every={args.task_eval_every}", f"task_eval_data={args.val}"]
    train_s = _run(train_cmd + ["--resume"], log)
    _run([*anymodal, "export", "--run", str(run), "--out", str(bundle)], log)
    metrics_path = out / "metrics.json"
    eval_s = _run([*anymodal, "eval", "--model", str(bundle), "--data", args.val, "--out", str(metrics_path),
                   "--limit", str(args.eval_limit), *(["--cfg", args.cfg] if args.cfg else []),
                   "--examples", str(out / "examples.jsonl"),
                   *(["--tasks", args.tasks] if args.tasks else [])], log)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps_recs = [r for r in recs if "tokens_per_s" in r]
    tasks = [{"minutes": r["minutes"], **{k: v for k, v in r["tasks"].items() if k != "n"}}
             for r in recs if "tasks" in r]
    m = json.loads(metrics_path.read_text())
    last = steps_recs[-1] if steps_recs else {}
    return {
        "recipe": overrides,
        "train": {"steps": last.get("step"), "tokens": last.get("tokens_seen"),
                  "wall_minutes": round(train_s / 60, 2),
                  "tokens_per_s_median": sorted(r["tokens_per_s"] for r in steps_recs)[len(steps_recs) // 2]
                  if steps_recs else None,
                  "final_loss": last.get("loss")},
        "metrics": {k: m.get(k) for k in ("t2i_accuracy", "t2i_position_accuracy", "t2i_size_accuracy",
                                          "a2i_accuracy", "caption_accuracy", "grounding_acc50",
                                          "grounding_miou", "refer_accuracy", "asr_wer", "tts_wer")},
        "unseen": {k: m["unseen"].get(k) for k in ("t2i_accuracy", "a2i_accuracy", "caption_accuracy",
                                                   "grounding_acc50", "refer_accuracy")},
        "by_objects": m.get("by_objects"),
        "bits_per_token": m.get("bits_per_token"),
        "n": m.get("n"),
        "eval_minutes": round(eval_s / 60, 2),
        "learning_curve": tasks,
        "dir": str(out),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="token shards (anymodal prepare), or a mixture list")
    ap.add_argument("--val", required=True, help="raw val shards of the demo world (for eval)")
    ap.add_argument("--config", default="train/demo")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per recipe (0 = steps only)")
    ap.add_argument("--steps", type=int, default=0, help="training steps (a cap when --minutes is set)")
    ap.add_argument("--eval-limit", type=int, default=100, help="eval documents per task")
    ap.add_argument("--cfg", default=None, help="guidance at eval, as `anymodal eval --cfg` (default: its own)")
    ap.add_argument("--tasks", default="", help="eval tasks (comma-separated; default: all)")
    ap.add_argument("--task-eval-every", type=int, default=0, help="in-training task metrics every N steps")
    ap.add_argument("--recipe", action="append", default=[],
                    help="comma-separated train overrides of one recipe (repeat to compare recipes); "
                         "commas inside [...] or {...} belong to the value")
    ap.add_argument("--out", default="runs/learning")
    ap.add_argument("common", nargs="*", help="train overrides shared by every recipe")
    args = ap.parse_args()
    if not args.minutes and not args.steps:
        sys.exit("give --minutes or --steps")
    recipes = [split_overrides(r) for r in args.recipe] or [[]]
    results = []
    for i, overrides in enumerate(recipes):
        results.append(run_recipe(args, f"recipe_{i}", overrides))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"data": args.data, "val": args.val, "config": args.config, "common": args.common,
                      "minutes": args.minutes, "steps": args.steps, "eval_limit": args.eval_limit,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
