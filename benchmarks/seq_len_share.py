"""How many rows a 4096-token training limit affects, on data_prep_bench.py's full-scale SYNTHETIC set.

    .venv/bin/python benchmarks/seq_len_share.py [--fraction 1.0] [--max-seq-len 4096] [--max-new-tokens 2048]

Writes the synthetic HelpSteer3-layout input of benchmarks/data_prep_bench.py (14,461 edit and 3,274
edit_quality rows, responses of 1-8k characters: synthetic text, NOT HelpSteer3), builds it with
Llama-3's tokenizer (llama-models + tiktoken; else data_prep_bench's stand-in BPE, and it says so) and
Llama-3.3's chat template (Llama-3.1's, as TRL bundles it: it adds a ~25-token system header), with
--max-seq-len, and prints per subset/split the share of rows rejected (train) or flagged (validation),
and the share of RL prompts that leave fewer than --max-new-tokens tokens for a completion.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_prep_bench import make_tokenizer, write_input  # noqa: E402

from data_prep.build import Options, build  # noqa: E402
from hs3.io import read_jsonl  # noqa: E402
from recipes.tiny_model import llama3_chat_template  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=1.0)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="seq_len_share-") as tmp:
        work = Path(tmp)
        sizes = write_input(work / "input", args.fraction)
        tokenizer_dir, what = make_tokenizer(work / "tokenizer", work / "input")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.chat_template = llama3_chat_template()
        tokenizer.save_pretrained(tokenizer_dir)
        print(f"[share] synthetic input {sizes}; tokenizer: {what}; Llama-3.1/3.3 chat template")
        manifest = build(str(work / "input"), work / "out", progress=False,
                         options=Options(tokenizer=str(tokenizer_dir), max_seq_len=args.max_seq_len))
        for name, counts in manifest["counts"].items():
            if name.endswith("/train"):
                n = counts["rejected_by_reason"].get("too_long", 0)
                print(f"[share] {name}: {n} of {counts['read']} rows over {args.max_seq_len} tokens "
                      f"({100 * n / counts['read']:.1f}%), rejected as too_long")
            else:
                n = counts["over_max_seq_len"]["rows"]
                print(f"[share] {name}: {n} of {counts['read']} rows over {args.max_seq_len} tokens "
                      f"({100 * n / counts['read']:.1f}%), kept and flagged")
        limit = args.max_seq_len - args.max_new_tokens
        prompts = [p for split in ("train", "validation") for p in read_jsonl(work / "out" / "prompts" / f"{split}.jsonl")]
        lengths = [len(tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)) for p in prompts]
        over = sum(n > limit for n in lengths)
        print(f"[share] RL prompts kept by the build: {over} of {len(lengths)} longer than {limit} tokens "
              f"(seq_len {args.max_seq_len} - max_new_tokens {args.max_new_tokens}): {100 * over / len(lengths):.1f}%")
        print(f"[share] token lengths sft/train: {manifest['token_lengths']['sft/train']}")


if __name__ == "__main__":
    main()
