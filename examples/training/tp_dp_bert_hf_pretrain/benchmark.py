"""Steps/s and per-rank parameter bytes of BERT pretraining at TP=1, TP=2 and TP=1 x DP=2, as a table.

    python benchmark.py --data_dir build/bert_demo/data --model_config base

Each layout runs the training script under torchrun with the same global batch
(the DP=2 replicas take half each); steps/s is the median over the steps after
the first (which includes warm-up). On CPU, torchrun gives each of several
processes one thread, and a single process all cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the examples' shared metrics file
from training_metrics import read_metrics  # noqa: E402
LAYOUTS = (("TP=1", 1, 1), ("TP=2", 2, 2), ("TP=1 x DP=2", 2, 1))  # (name, processes, TP degree)


def run_layout(args, processes: int, tp: int, output_dir: Path) -> list[dict[str, str]]:
    torchrun = Path(sys.executable).with_name("torchrun")
    batch = args.global_batch // (processes // tp)
    command = [
        str(torchrun), "--standalone", f"--nproc_per_node={processes}", str(HERE / "tp_dp_bert_large_hf_pretrain_hdf5.py"),
        "--tensor_parallel_degree", str(tp), "--model_config", args.model_config, "--data_dir", args.data_dir,
        "--output_dir", str(output_dir), "--batch_size", str(batch), "--grad_accum_usteps", "1",
        "--steps_this_run", str(args.steps), "--dropout", "0", "--no-final_checkpoint", "--disable_progress_bar",
    ]  # fmt: skip
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return read_metrics(str(output_dir / "metrics.csv"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="Shards from build_pretraining_shards.py.")
    parser.add_argument("--model_config", default="base", choices=("tiny", "base", "large"))
    parser.add_argument("--global_batch", type=int, default=8, help="Sequences per step (even, for DP=2).")
    parser.add_argument("--steps", type=int, default=4, help="Steps per layout (the first is not timed).")
    parser.add_argument("--output_dir", default="build/bert_benchmark")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.global_batch < 2 or args.global_batch % 2:
        parser.error("--steps must be at least 2 and --global_batch even and at least 2.")
    rows = []
    for name, processes, tp in LAYOUTS:
        metrics = run_layout(args, processes, tp, Path(args.output_dir) / name.replace(" ", "").replace("=", ""))
        timed = [float(m["step_time_s"]) for m in metrics[1:]]
        step_time = statistics.median(timed)
        rows.append((name, processes, 1 / step_time, args.global_batch / step_time, int(metrics[0]["param_bytes_per_rank"])))
    print(f"\nBERT-{args.model_config}, global batch {args.global_batch}, {args.steps - 1} timed steps per layout")
    print("| layout | processes | steps/s | sequences/s | parameter bytes per rank |")
    print("|---|---|---|---|---|")
    for name, processes, steps_per_s, sequences_per_s, param_bytes in rows:
        print(f"| {name} | {processes} | {steps_per_s:.3f} | {sequences_per_s:.2f} | {param_bytes:,} ({param_bytes / 2**20:.0f} MiB) |")


if __name__ == "__main__":
    main()
