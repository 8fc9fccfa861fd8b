"""Task metrics during pretraining: the demo world's checks on a small val subset every N steps.

Loss alone does not say whether the model draws, describes, grounds or hears; these numbers do.
`TaskEval` reads the raw val documents once (up to `limit` per task), tokenizes their prompts once
with the training data's tokenizer set, and on each call runs `anymodal eval`'s generation tasks
(`eval.run.Evaluator`) on the live model. `anymodal train` writes the result to metrics.jsonl as
`{"step", "minutes", "tasks": {...}}` and draws `tasks.png` (accuracy against minutes).

TTS is left out by default: each clip is hundreds of generated tokens plus a codec round trip,
more than the other tasks together.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..eval.run import GEN_KINDS, EvalOptions, Evaluator
from ..sample.bundle import Bundle
from ..tokenizers import load_tokenizers

DEFAULT_TASKS = ("t2i", "a2i", "i2t", "ground", "refer", "asr")
# metrics.jsonl keys kept from eval's result (the per-task headline numbers)
TASK_METRICS = ("t2i_accuracy", "a2i_accuracy", "caption_accuracy", "grounding_acc50", "grounding_miou",
                "refer_accuracy", "asr_wer", "tts_wer")


def check_tasks(tasks) -> tuple[str, ...]:
    bad = [t for t in tasks if t not in GEN_KINDS]
    if bad:
        raise UserError(f"task_eval_tasks: unknown task {bad[0]!r} (valid: {', '.join(GEN_KINDS)})")
    return tuple(tasks)


class TaskEval:
    """Runs the generation tasks on `model` (kept in place; eval mode only while measuring)."""

    def __init__(self, model: torch.nn.Module, tokenizers: str | Path, data: str, limit: int = 10,
                 tasks=DEFAULT_TASKS, seed: int = 0, batch_size: int = 8):
        self.model = model
        self.tasks = check_tasks(tasks)
        device = next(model.parameters()).device
        tok = load_tokenizers(tokenizers, device=str(device))
        self.evaluator = Evaluator(Bundle(model, tok), EvalOptions(limit=limit, seed=seed, batch_size=batch_size,
                                                                    bits_docs=0, progress=False))
        self.per_kind, _, _ = self.evaluator.read(data)
        if not any(self.per_kind[t] for t in self.tasks):
            raise UserError(f"task_eval_data {data} holds no documents of the tasks {', '.join(self.tasks)}")
        for docs in self.per_kind.values():  # tokenize every prompt now, not inside the first timed pass
            for d in docs:
                self.evaluator.prompt(d)
        self.seconds: list[float] = []  # duration of each pass (the trainer's time budget plans with it)

    def __call__(self) -> dict:
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            self.evaluator.refresh()
            result = self.evaluator.run_docs(self.per_kind, [], kinds=self.tasks)
        finally:
            self.model.train(was_training)
        self.seconds.append(time.perf_counter() - t0)
        out = {k: result[k] for k in TASK_METRICS if result.get(k) is not None}
        out["n"] = {t: result["n"][t] for t in self.tasks}
        out["seconds"] = round(self.seconds[-1], 2)
        return out


def format_tasks(rec: dict) -> str:
    """One line for the console: `t2i 0.42 · caption 0.30 · ground 0.55 · …`."""
    short = {"t2i_accuracy": "t2i", "a2i_accuracy": "a2i", "caption_accuracy": "caption",
             "grounding_acc50": "ground", "refer_accuracy": "refer", "asr_wer": "asr WER", "tts_wer": "tts WER"}
    return " · ".join(f"{name} {rec[k]:.2f}" for k, name in short.items() if k in rec)


def print_tasks(step: int, rec: dict) -> None:
    print(f"[train] step {step} tasks: {format_tasks(rec)} ({rec['seconds']:.0f} s)", file=sys.stderr, flush=True)
