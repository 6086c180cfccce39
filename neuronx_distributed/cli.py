"""The `nxd` command: `nxd checkpoint inspect|verify|merge|reshard|convert` (no process group needed).

Every argument is checked before anything is written (argparse types here, the
folders in `checkpoint_tools`); errors print one line that says what to do and
exit with status 2 (1: `verify` found a damaged checkpoint), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

from .errors import CheckpointArgumentError, CheckpointCorruptError, NeuronxDistributedError
from .parallel_layers import checkpoint_format as fmt
from .parallel_layers import checkpoint_tools, upstream_checkpoint

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _bytes(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500MB or 5GB")
    size = int(float(match.group(1)) * _UNITS[match.group(2)[:1].upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is less than one byte; pass a size such as 500MB or 5GB")
    return size


def _tensor_parallel_size(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TP degree; pass an integer >= 1, e.g. --tp 2")
    return int(text)


def _human(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def _inspect(args) -> int:
    manifest = fmt.read_manifest(args.dir)
    total = sum(entry.bytes for entry in manifest.files)
    print(f"{args.dir}: TP degree {manifest.tensor_parallel_size}, model_key {manifest.model_key!r}, "
          f"{len(manifest.tensors)} tensors, {_human(total)} in {len(manifest.files)} files")
    for entry in manifest.files:
        print(f"  {entry.path}  {_human(entry.bytes)}  crc32 {entry.crc32}")
    rows = [("tensor", "layout", "global shape", "dtype", "dim/stride", "bytes")]
    for name, entry in manifest.tensors.items():
        sharding = f"{entry.partition_dim}/{entry.partition_stride}" if entry.layout == fmt.SHARDED else "-"
        layout = entry.layout if entry.file is None else f"{entry.layout} (once, {fmt.rank_folder(entry.file)})"
        rows.append((name, layout, "x".join(map(str, entry.shape)) or "scalar", entry.dtype, sharding,
                     _human(entry.nbytes)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _verify(args) -> int:
    try:
        manifest = checkpoint_tools.verify(args.dir, progress=True)
    except CheckpointCorruptError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    stale = fmt.stale_paths(args.dir, manifest)
    if stale:
        print(f"note: files from an unfinished save, not part of the checkpoint: {', '.join(stale)}")
    print(f"OK: {len(manifest.files)} files match their checksums")
    return 0


def _merge(args) -> int:
    files = checkpoint_tools.merge(args.dir, args.out, args.model_key, args.max_shard_size, progress=True)
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


def _reshard(args) -> int:
    manifest = checkpoint_tools.reshard(args.dir, args.out, args.tp, progress=True)
    print(f"wrote a TP={manifest.tensor_parallel_size} checkpoint to {args.out}")
    return 0


def _convert(args) -> int:
    model_key = args.model_key or None
    checkpoint = upstream_checkpoint.UpstreamCheckpoint(args.dir)
    world = checkpoint.tensor_parallel_size
    if args.config is not None:
        shapes = upstream_checkpoint.model_shapes(checkpoint, model_key)
        layouts = upstream_checkpoint.hf_config_layouts(args.config, world, shapes)
    elif world == 1:
        layouts = {}  # one rank holds every tensor whole
    else:
        raise CheckpointArgumentError(
            f"{args.dir!r} was saved at TP={world}, and upstream files do not record how each tensor is sharded; pass "
            "--config with the model's Hugging Face config (config.json or its folder) so the layout is known."
        )
    if args.to == "nxd":
        upstream_checkpoint.convert(args.dir, args.out, layouts, model_key, progress=True)
        print(f"wrote a TP={world} checkpoint to {args.out}")
        return 0
    checkpoint_tools.check_output_folder(args.dir, args.out, "merge")
    parent = os.path.dirname(os.path.abspath(args.out))
    staging = tempfile.mkdtemp(prefix=".nxd-convert-", dir=parent)
    try:
        upstream_checkpoint.convert(args.dir, staging, layouts, model_key, progress=True)
        files = checkpoint_tools.merge(staging, args.out, progress=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    config_file = os.path.join(args.config, "config.json") if args.config and os.path.isdir(args.config) else args.config
    if config_file and os.path.isfile(config_file):
        shutil.copyfile(config_file, os.path.join(args.out, "config.json"))
        files.append("config.json")
    print(f"wrote {', '.join(files)} to {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nxd", description="NeuronxDistributed tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    checkpoint = commands.add_parser("checkpoint", help="inspect, verify, merge or reshard a sharded checkpoint")
    actions = checkpoint.add_subparsers(dest="action", required=True)
    inspect = actions.add_parser("inspect", help="TP degree, files and a table of every tensor")
    inspect.add_argument("dir")
    inspect.set_defaults(run=_inspect)
    check = actions.add_parser("verify", help="check every file against the manifest's checksums")
    check.add_argument("dir")
    check.set_defaults(run=_verify)
    merge = actions.add_parser(
        "merge", help="write the model unsharded (model.safetensors), readable by load(..., sharded=False) and from_pretrained"
    )
    merge.add_argument("dir")
    merge.add_argument("out")
    merge.add_argument("--model-key", default=None, help="key of the model's state dict (default: the one saved)")
    merge.add_argument("--max-shard-size", type=_bytes, default=checkpoint_tools.DEFAULT_MAX_SHARD_BYTES,
                       help="split the output into files of at most this size (default 5GB)")
    merge.set_defaults(run=_merge)
    reshard = actions.add_parser("reshard", help="write the whole checkpoint at another TP degree (--tp 1: unsharded)")
    reshard.add_argument("dir")
    reshard.add_argument("out")
    reshard.add_argument("--tp", type=_tensor_parallel_size, required=True, help="the target tensor-parallel degree (>= 1)")
    reshard.set_defaults(run=_reshard)
    convert = actions.add_parser(
        "convert", help="write a checkpoint of upstream NeuronxDistributed (tp_rank_XX_pp_rank_00/checkpoint.pt or xser) "
        "in our sharded format at its TP degree, or with --to hf as a merged model.safetensors folder"
    )
    convert.add_argument("dir")
    convert.add_argument("out")
    convert.add_argument("--to", choices=("nxd", "hf"), default="nxd",
                         help="nxd: our sharded checkpoint (default); hf: the unsharded model for from_pretrained")
    convert.add_argument("--config", default=None,
                         help="the model's Hugging Face config.json (or its folder): how each tensor is sharded "
                              "(needed above TP=1; upstream files do not record it); copied into OUT with --to hf")
    convert.add_argument("--model-key", default="model",
                         help="key of the model's state dict in the rank files (default 'model'; '' for a bare state dict)")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `nxd` with `argv` (default: the command line); return the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except NeuronxDistributedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # permissions, disk full, a path that went away: the system's words suffice
        print(f"error: {error}; check the paths, their permissions and the free space.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # merge and reshard remove what they wrote unless they had finished writing
        print("interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
