"""What a running or finished HF stage shows of itself: TensorBoard logs, OUT/curves.png and
OUT/progress.json.

- report_to(cfg): the Trainer's `report_to` from `train.report_to` (tensorboard by default, into
  OUT/tensorboard; wandb when asked, in project train.wandb_project as run train.run_name, logged in
  by the user's `wandb login` or WANDB_API_KEY (read by wandb itself, never written by us); none).
- RunObserver, a TrainerCallback every stage gets (recipes.training.callbacks): on each log it writes
  OUT/progress.json (step, total steps, elapsed seconds, ETA: what `./launch.sh status RUN_DIR` shows);
  on each checkpoint it gives the files the umask's mode (safetensors writes 0600); at the end of
  training it draws OUT/curves.png from the trainer's log history.
- plot_curves(log_history, path): loss (train and eval), learning rate, grad norm, the other eval
  metrics, and for rl the reward, KL and copy rate; one panel per quantity, against the step.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from hs3.io import atomic_path, atomic_write_json, follow_umask

PROGRESS_FILE = "progress.json"
CURVES_FILE = "curves.png"
REPORTERS = ("tensorboard", "wandb", "none")

# Panels in order: (title, keys of the log history drawn in it). Keys found nowhere are skipped.
PANELS = [
    ("loss", ("loss", "eval_loss")),
    ("learning rate", ("learning_rate",)),
    ("grad norm", ("grad_norm",)),
    ("reward", ("reward", "eval_reward")),
    ("KL", ("kl", "eval_kl")),
    ("copy rate", ("copy_rate", "eval_copy_rate")),
]
_SKIP = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
         "train_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def reporters(value: str) -> list[str]:
    """`train.report_to` (comma-separated) as a list; 'none' alone means no reporter."""
    names = [v.strip() for v in str(value).split(",") if v.strip()]
    return [] if names in ([], ["none"]) else names


def report_to(cfg) -> list[str]:
    """TrainingArguments.report_to for the stage; TensorBoard's event files go to OUT/tensorboard
    (transformers reads TENSORBOARD_LOGGING_DIR)."""
    import importlib.util

    from recipes.config import ConfigError

    names = reporters(cfg.train.report_to)
    for name in names:
        if name in ("tensorboard", "wandb") and importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to={cfg.train.report_to}: the {name} package is not installed "
                              f"({'EXTRAS=hf,eval,wandb ./launch.sh setup, or ' if name == 'wandb' else ''}pip install "
                              f"{name}; or train.report_to=none)")
    if "tensorboard" in names:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(cfg.out) / "tensorboard")
    if "wandb" in names:  # read by transformers' WandbCallback; the key stays wandb's own business
        os.environ.setdefault("WANDB_DIR", str(cfg.out))
        os.environ["WANDB_PROJECT"] = wandb_project(cfg)
    return names or ["none"]


def wandb_project(cfg) -> str:
    """train.wandb_project, else $WANDB_PROJECT, else helpsteer3-edit."""
    return str(cfg.train.get("wandb_project") or os.environ.get("WANDB_PROJECT") or "helpsteer3-edit")


def run_name(cfg) -> str:
    """train.run_name, else RUN_DIR's name and the entry's (`my_run-sft`)."""
    return str(cfg.train.get("run_name") or f"{Path(str(cfg.run_dir)).resolve().name}-{cfg.get('name') or cfg.stage}")


def _series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and "step" in entry:
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def panels(log_history: list[dict]) -> list[tuple[str, list[str]]]:
    """The panels this history can fill: the fixed ones, then one per other eval metric."""
    present = {k for entry in log_history for k in entry}
    chosen = [(title, [k for k in keys if k in present]) for title, keys in PANELS]
    chosen = [(title, keys) for title, keys in chosen if keys]
    used = {k for _, keys in chosen for k in keys}
    for key in sorted(present - used - _SKIP):
        if key.startswith("eval_") and _series(log_history, key)[0]:
            chosen.append((f"eval {key.removeprefix('eval_')}", [key]))
    return chosen


def plot_curves(log_history: list[dict], path: str | os.PathLike, title: str = "") -> list[str]:
    """Draw the history into a PNG at path (atomically); returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = panels(log_history) or [("loss", ["loss"])]
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, chosen):
        for key in keys:
            steps, values = _series(log_history, key)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return [name for name, _ in chosen]


def read_progress(out: str | os.PathLike) -> dict | None:
    """OUT/progress.json, or None."""
    import json

    try:
        return json.loads((Path(out) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def describe_progress(progress: dict, now: float | None = None) -> str:
    """`step 40/100 (40%), 12m elapsed, ETA 18m` for a running stage; finished ones say so."""
    step, total = progress.get("step", 0), progress.get("max_steps") or 0
    text = f"step {step}/{total}" + (f" ({100 * step // total}%)" if total else "")
    elapsed = progress.get("elapsed_s")
    if elapsed is not None:
        text += f", {duration(elapsed)} elapsed"
    if progress.get("finished"):
        return text + ", finished"
    eta = progress.get("eta_s")
    if eta is not None:
        age = max(0.0, (now or time.time()) - progress.get("updated", now or time.time()))
        text += f", ETA {duration(max(0.0, eta - age))}"
    return text


def duration(seconds: float) -> str:
    """`45s`, `12m05s`, `3h07m`: how progress.json times read in logs and `status`."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _make_callback_class():
    from transformers import TrainerCallback

    class RunObserver(TrainerCallback):
        """progress.json on every log, umask modes on every checkpoint, curves.png at the end."""

        def __init__(self, out: str | os.PathLike, stage: str = ""):
            self.out = Path(out)
            self.stage = stage
            self.start = time.time()
            self.first_step: int | None = None

        def _write_progress(self, state) -> None:
            now = time.time()
            if self.first_step is None:
                self.first_step = state.global_step
            done = state.global_step - self.first_step  # steps of this process (a resume starts later)
            elapsed = now - self.start
            remaining = max(0, (state.max_steps or 0) - state.global_step)
            eta = elapsed / done * remaining if done > 0 else None
            atomic_write_json(self.out / PROGRESS_FILE, {
                "stage": self.stage, "step": state.global_step, "max_steps": state.max_steps,
                "epoch": state.epoch, "elapsed_s": round(elapsed, 1),
                "eta_s": None if eta is None else round(eta, 1), "updated": round(now, 1),
                "finished": bool(state.max_steps) and state.global_step >= state.max_steps,
                "pid": os.getpid()})

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first_step = time.time(), state.global_step
            if state.is_world_process_zero:
                self._write_progress(state)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                self._write_progress(state)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                follow_umask(Path(args.output_dir) / f"checkpoint-{state.global_step}")

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self._write_progress(state)
                plot_curves(state.log_history, self.out / CURVES_FILE, title=f"{self.stage} {self.out}")

    return RunObserver


def __getattr__(name):
    # transformers is imported only when a trainer asks for the callback.
    if name == "RunObserver":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
