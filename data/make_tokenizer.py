"""Derive SD 1.5's CLIP tokenizer files (vocab.json, merges.txt) from OpenAI's BPE vocabulary.

The BPE list ships inside the open_clip_torch wheel; fetch it without torch or torchvision:

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -p /tmp/oc/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz > /tmp/bpe.txt.gz
    python data/make_tokenizer.py /tmp/bpe.txt.gz data/sd15/tokenizer

The layout is CLIP's: 256 byte symbols, the same with the end-of-word marker, one token per merge
of the first 48,894 merges, then the two special tokens: 49,408 tokens in all.
"""

import gzip
import json
import sys
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges so the vocabulary is exactly 49,408


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable-character table, in CLIP's order: printable bytes
    stand for themselves, the rest are moved to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def main(bpe_gz: str, out_dir: str) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408 and len(set(tokens)) == len(tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
