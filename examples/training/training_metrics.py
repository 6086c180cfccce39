"""Per-step training metrics in a CSV file, and the loss curves drawn from such files.

    python ../training_metrics.py out_tp2/metrics.csv out_dp2/metrics.csv -o compare.png

draws several runs on one figure (each labelled by its folder unless --labels says otherwise).
Shared by the BERT and Llama training examples, which put this folder on `sys.path`.
"""

from __future__ import annotations

import argparse
import csv
import os

METRIC_FIELDS = ("step", "loss", "learning_rate", "grad_norm", "sequences_per_s", "step_time_s", "param_bytes_per_rank")


class MetricsFile:
    """Append-only `metrics.csv`; resuming at step S keeps the rows up to S and drops the rest."""

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        kept = [row for row in read_metrics(path) if int(row["step"]) <= resume_step] if resume_step else []
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=METRIC_FIELDS)
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()

    def write(self, **values) -> None:
        self._writer.writerow(values)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str) -> list[dict[str, str]]:
    """The rows of a metrics CSV ([] when the file does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(csv_paths: list[str], output: str, labels: list[str] | None = None, title: str = "pretraining loss",
                loss_label: str = "loss") -> str:
    """Draw the loss per step of every run in `csv_paths` on one figure, saved at `output`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in csv_paths]
    if len(labels) != len(csv_paths):
        raise ValueError(f"got {len(labels)} labels for {len(csv_paths)} metrics files; pass one label per file.")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for path, label in zip(csv_paths, labels):
        rows = read_metrics(path)
        if not rows:
            raise FileNotFoundError(f"{path} is missing or has no rows; train first (it is written to --output_dir).")
        axes.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label=label, linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(loss_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.csv files written by the training script")
    parser.add_argument("-o", "--output", default="loss.png")
    parser.add_argument("--labels", nargs="+", help="one label per metrics file")
    parser.add_argument("--title", default="pretraining loss")
    args = parser.parse_args(argv)
    if args.labels and len(args.labels) != len(args.metrics):
        parser.error(f"got {len(args.labels)} --labels for {len(args.metrics)} metrics files; pass one per file.")
    print(plot_losses(args.metrics, args.output, args.labels, title=args.title))


if __name__ == "__main__":
    main()
