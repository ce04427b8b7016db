"""Build the local byte-level BPE tokenizer used by the tiny pi0 (no hub access needed).

The real pi0 uses PaliGemma's 257k-token SentencePiece tokenizer from the hub. Offline, tests and
`make debug` use this small byte-level BPE trained on robot instructions: byte-level so any text
(including the "\\n" that LeRobot's `Pi0NewLineProcessor` appends) tokenizes without unknowns.
Deterministic: the same corpus and vocab size give the same files.

    python data_prep/make_tokenizer.py --output_dir artifacts/tokenizer
"""

import argparse
from pathlib import Path

from lib.policies.processors import build_local_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path("artifacts/tokenizer"))
    parser.add_argument("--vocab_size", type=int, default=500, help="must stay below the tiny pi0 vocab (512)")
    args = parser.parse_args()
    tokenizer = build_local_tokenizer(args.vocab_size)
    tokenizer.save_pretrained(args.output_dir)
    print(f"tokenizer with {len(tokenizer)} tokens written to {args.output_dir}")


if __name__ == "__main__":
    main()
