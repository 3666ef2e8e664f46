"""Training metrics: a one-line summary per interval (through tqdm), `metrics.jsonl`, TensorBoard events,
and an optional loss plot."""

import json
import math
import os
import sys


class MetricsLog:
    """Appends one JSON object per logging interval and per validation to OUT/metrics.jsonl."""

    def __init__(self, out: str, resume_step: int | None, enabled: bool = True):
        self.path = os.path.join(out, "metrics.jsonl")
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif os.path.exists(self.path):
            os.remove(self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the earlier event files' records from purge_step on: a resumed run's from the
            # step after its checkpoint (whose own records stay, as in metrics.jsonl), a fresh run's all.
            purge_step = 0 if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=purge_step)
        except ImportError:  # tensorboard is a declared dependency; tolerate its absence anyway
            print("megajoy: tensorboard is not installed; writing metrics.jsonl only", file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """A resumed run replays steps after its checkpoint: drop the records the killed run wrote for them."""
        if not os.path.exists(self.path):
            return
        kept = [json.dumps(r) + "\n" for r in read_metrics(self.path, torn_tail_ok=True) if r["step"] <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_line(record: dict, train_iters: int) -> str:
    parts = [f"step {record['step']}/{train_iters}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("mtp_loss", "mtp {:.4f}"), ("val_loss", "val {:.4f}"),
                     ("lr", "lr {:.2e}"), ("grad_norm", "grad {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"),
                     ("tflops_per_gpu", "{:.3g} TFLOP/s/GPU"), ("mfu", "MFU {:.1%}"),
                     ("expert_load_max_mean", "load max/mean {:.2f}")):
        if record.get(key) is not None:
            parts.append(fmt.format(record[key]))
    return " | ".join(parts)


def read_metrics(path: str, torn_tail_ok: bool = False) -> list[dict]:
    """The records of a metrics.jsonl. With `torn_tail_ok`, an unfinished last line (a run killed while
    writing it) is dropped with a note; an unreadable line anywhere else is an error naming it."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_tail_ok and number == len(lines):
                print(f"megajoy: {path}:{number}: dropped an unfinished last record", file=sys.stderr)
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({e.msg}): {line[:80]!r}") from None
    return records


def plot_losses(metrics_path: str, png_path: str, title: str = "megajoy") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train loss"), (valid, "validation loss")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label.startswith("val") else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
