"""Running the example scripts as users do, for the tests that train them end to end.

`torchrun(script, processes, *args)` launches `script` under torchrun --standalone
(one thread per process, Hugging Face offline) and fails the test with the script's
output when it exits non-zero; `metric_losses(output_dir)` reads the per-step losses
its metrics.csv records.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent  # torchrun and nxd of the interpreter running the tests


def example_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(script: Path, processes: int, *args: str) -> str:
    """Run `script` on `processes` ranks; its stdout."""
    command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={processes}", str(script), *args]
    result = subprocess.run(command, env=example_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def metric_losses(output_dir: Path) -> list[float]:
    with open(output_dir / "metrics.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]
