"""python -m data_prep --source SRC --out OUT [options]   (./launch.sh data ... forwards here)"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hs3.io import UserError, cli_main

CONF_FILE = Path(__file__).resolve().parent.parent / "conf" / "stage" / "data.yaml"


def pinned_revision() -> str:
    """The hub revision pinned in conf/stage/data.yaml (prep.revision)."""
    import yaml

    try:
        return str(yaml.safe_load(CONF_FILE.read_text())["prep"]["revision"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "main"


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage mistakes end as one `error: ...` line (exit 2), like every other user error."""

    def error(self, message: str):
        raise UserError(f"{message} (python -m data_prep --help lists the options)")


def parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="python -m data_prep",
        description="HelpSteer3 (edit, edit_quality) -> edit SFT conversations (sft/), preference pairs (pairs/), "
                    "RL prompts (prompts/), rejected.jsonl and manifest.json under OUT.",
        epilog="OUT is built in a temp dir beside it and renamed at the end. Rerunning the same build into the same "
               "OUT (same input contents, options and tokenizer) rewrites nothing and reports it up to date, once every "
               "file's size (and sha256, with --verify) matches the manifest; an OUT holding anything else is an error. See docs/data.md for the schemas.",
    )
    p.add_argument("--source", default="hf", metavar="hf|DIR",
                   help="hf (default): nvidia/HelpSteer3 from the Hugging Face hub via datasets.load_dataset. "
                        "DIR: a local copy laid out as the dataset repo: DIR/edit/{train,validation}.jsonl.gz and "
                        "DIR/edit_quality/{train,validation}.jsonl.gz (plain .jsonl accepted too).")
    p.add_argument("--out", required=True, metavar="OUT", help="output directory (new, empty, or this same build)")
    p.add_argument("--revision", default=pinned_revision(), metavar="REV",
                   help="hub revision (branch, tag or commit) for --source hf; default: prep.revision in "
                        "conf/stage/data.yaml (%(default)s)")
    p.add_argument("--feedback-orders", default="all", metavar="all|given|K",
                   help="all (default, as in the paper): one SFT conversation per permutation of a row's feedback "
                        "items (6 for 3 items); given: the order in the data; K: K distinct permutations per row, "
                        "chosen with --seed")
    p.add_argument("--seed", type=int, default=1234,
                   help="seed for --feedback-orders K and --feedback-targets one (default %(default)s)")
    p.add_argument("--subsets", default="edit,edit_quality", metavar="LIST",
                   help="HelpSteer3 subsets to build, comma-separated, from edit, edit_quality, feedback, preference "
                        "(default %(default)s). feedback -> feedback/ (Feedback-model SFT); preference -> select/ "
                        "(Select-model pairs weighted by |overall_preference|; ties rejected as `tie`)")
    p.add_argument("--feedback-targets", default="one", choices=("one", "all"),
                   help="feedback subset: one (default) feedback text per response as the SFT target, drawn with "
                        "--seed (2 per row, the sources' count); all: every text (up to 6 per row)")
    p.add_argument("--feedback-instruction", metavar="TEXT",
                   help="feedback subset: the evaluation instruction of the Feedback model's request (default: "
                        "data_prep.feedback_prompt.FEEDBACK_INSTRUCTION, our reconstruction)")
    p.add_argument("--keep-perfect-feedback", action="store_true",
                   help="edit, edit_quality: keep feedback items that start 'The response is perfectly' in rows with 3 or "
                        "fewer items (default: drop them for every list length, as the paper does; a row left with "
                        "none asks with <None>); the manifest counts the rows either way")
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="count each conversation's tokens with this tokenizer's chat template; length percentiles "
                        "go to the manifest")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="with --tokenizer: reject train rows with a sequence longer than N tokens (reason too_long); "
                        "validation rows are kept, flagged over_max_seq_len and counted in the manifest")
    p.add_argument("--strict", action="store_true", help="fail the run (and write nothing) if any row is rejected")
    p.add_argument("--keep-leaked", action="store_true",
                   help="keep train rows whose context and original_response also occur in a validation split "
                        "(default: remove them from training; reported in the manifest either way)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes that count tokens (default: one per CPU); the output does not depend on it")
    p.add_argument("--verify", action="store_true",
                   help="when OUT already holds this build: check every file's sha256 against the manifest, not only "
                        "its size, before calling it up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p




@cli_main
def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be >= 1")
    from data_prep.build import Options, build, summary_line

    options = Options(feedback_orders=args.feedback_orders, seed=args.seed, tokenizer=args.tokenizer,
                      max_seq_len=args.max_seq_len, strict=args.strict, keep_leaked=args.keep_leaked,
                      subsets=args.subsets, feedback_targets=args.feedback_targets,
                      feedback_instruction=args.feedback_instruction,
                      keep_perfect_feedback=args.keep_perfect_feedback)
    manifest = build(args.source, args.out, revision=args.revision, options=options, progress=not args.no_progress,
                     workers=args.workers, verify=args.verify)
    print(summary_line(manifest, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
