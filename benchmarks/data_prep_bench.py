"""Benchmark: the data step at HelpSteer3's full scale, against a naive baseline.

    .venv/bin/python benchmarks/data_prep_bench.py [--fraction 1.0] [--skip-baseline] [--workdir DIR]

1. Writes a synthetic input in the HelpSteer3 layout (14,461 edit, 3,274 edit_quality, 40,821 feedback and
   40,476 preference rows, split 95/5; multi-turn contexts; responses of 1-8k characters; 3 feedback items,
   some rows with 4-5; feedback rows 1-3 helpfulness-prefixed texts per response; preference -3..3, ~10%
   ties). `--subsets` picks which (default all four).
2. Times `data_prep.build` on it: all 6 feedback orders, token counting with a ~128k-vocabulary
   tokenizer (Llama-3's, from the `llama-models` wheel, converted by transformers; the project's
   Llama-3-format chat template).
3. Times the naive baseline on the same input: the same conversations, each counted with
   `apply_chat_template` per row inside a single-process `datasets.map`, written with `to_json`.
Prints both times and the ratio. Goal: the build under 60 s on 2 cores and >= 3x faster.
Needs the `bench` extra (llama-models, tiktoken): `EXTRAS=hf,eval,megatron,test,bench ./launch.sh setup`.
Without it a byte-level BPE is trained on the synthetic text instead (its vocabulary is far below 128k),
and the script says so: figures from such a run are not comparable.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep import build_edit_conversation  # noqa: E402
from data_prep.build import Options, build, percentiles  # noqa: E402
from data_prep.feedback import data_step_feedback  # noqa: E402
from recipes.tiny_model import CHAT_TEMPLATE  # noqa: E402

EDIT_ROWS, EDIT_QUALITY_ROWS, VALIDATION_SHARE = 14_461, 3_274, 0.05
ROWS = {"edit": EDIT_ROWS, "edit_quality": EDIT_QUALITY_ROWS, "feedback": 40_821, "preference": 40_476}
LEVELS = ("not", "slightly", "partially", "mostly", "perfectly")

WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an which but not have has "
    "response answer user model prompt feedback however improve lack benefit attribute function value list "
    "data code error result example explain because would could should more less clear concise accurate "
    "detail step first second third finally also therefore although instead python return import def class "
    "self print range len dict string integer loop variable query table select where group order limit "
    "energy force mass velocity equation derivative integral probability sample mean variance theorem proof "
    "die der und nicht ist das mit eine für auf el la que los las una por para con es du le les des est pas "
    "東京 日本 学生 問題 説明 데이터 사용자 응답 文章 模型 反馈 回答 improve, lacks. but: (x) [i] {k} = + - * / ->"
).split()
FEEDBACK_OPENERS = ["The response is mostly helpful. However,", "The response is partially helpful, but",
                    "The response is not helpful because it lacks", "The response could improve by",
                    "The response would benefit from", "The response is perfectly fine, but"]


def text(rng: random.Random, low: int, high: int) -> str:
    """Words and line breaks up to a length drawn from [low, high] characters."""
    target = rng.randint(low, high)
    words = rng.choices(WORDS, k=target // 5 + 1)
    out = " ".join(words)
    lines = [out[i:i + rng.randint(60, 160)] for i in range(0, len(out), 120)]
    return "\n".join(lines)[:target]


def context(rng: random.Random) -> list[dict]:
    turns = []
    for t in range(rng.choice([1, 1, 2, 3])):
        if t:
            turns.append({"role": "assistant", "content": text(rng, 1000, 4000)})
        turns.append({"role": "user", "content": text(rng, 50, 1500)})
    return turns


def feedback(rng: random.Random) -> list[str]:
    n = rng.choices([3, 4, 5], weights=[90, 6, 4])[0]
    return [f"{rng.choice(FEEDBACK_OPENERS)} {text(rng, 150, 600)}" for _ in range(n)]


def annotator_feedback(rng: random.Random) -> list[str]:
    return [f"The response is {rng.choice(LEVELS)} helpful. {text(rng, 150, 600)}" for _ in range(rng.randint(1, 3))]


def write_input(root: Path, fraction: float, seed: int = 0, subsets=tuple(ROWS)) -> dict[str, int]:
    rng = random.Random(seed)
    sizes = {}
    for subset, total in ((s, ROWS[s]) for s in subsets):
        total = max(int(total * fraction), 20)
        n_val = round(total * VALIDATION_SHARE)
        for split, n in (("train", total - n_val), ("validation", n_val)):
            rows = []
            for _ in range(n):
                row = {"domain": rng.choice(["general", "stem", "code", "multilingual"]),
                       "language": rng.choice(["english", "python", "german", "japanese", "chinese"]),
                       "context": context(rng), "original_response": text(rng, 1000, 8000)}
                if subset in ("feedback", "preference"):
                    row["response1"], row["response2"] = row.pop("original_response"), text(rng, 1000, 8000)
                if subset == "feedback":
                    row.update(feedback1=annotator_feedback(rng), feedback2=annotator_feedback(rng))
                elif subset == "preference":
                    row.update(overall_preference=rng.choices(range(-3, 4), weights=[10, 15, 15, 10, 15, 15, 10])[0],
                               individual_preference=[{"score": 1, "reasoning": text(rng, 50, 300)}])
                elif subset == "edit":
                    row.update(edited_response=text(rng, 1000, 8000), feedback=feedback(rng),
                               change_summary=text(rng, 50, 300))
                else:
                    row.update(good_edited_response=text(rng, 1000, 8000), bad_edited_response=text(rng, 1000, 8000),
                               feedback=feedback(rng))
                rows.append(json.dumps(row, ensure_ascii=False))
            path = root / subset / f"{split}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode("utf-8"), compresslevel=1, mtime=0))
            sizes[f"{subset}/{split}"] = n
    return sizes


def make_tokenizer(root: Path, corpus_dir: Path) -> tuple[Path, str]:
    """Llama-3's 128k tokenizer with the project's chat template, saved as a HF tokenizer dir."""
    from transformers import PreTrainedTokenizerFast

    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_models")
        model_file = Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"
        from transformers.convert_slow_tokenizer import TikTokenConverter

        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
        specials += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(specials))]
        backend = TikTokenConverter(vocab_file=str(model_file), extra_special_tokens=specials).converted()
        what = "Llama-3 tokenizer (llama-models wheel, tiktoken -> transformers)"
    except Exception as exc:  # no llama-models / tiktoken: train a 128k byte-level BPE instead
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        print(f"[bench] Llama-3 tokenizer unavailable ({exc}); training a 128k byte-level BPE", file=sys.stderr)
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        lines = (line for p in sorted(corpus_dir.rglob("*.gz")) for line in gzip.open(p, "rt", encoding="utf-8"))
        backend.train_from_iterator(lines, trainers.BpeTrainer(
            vocab_size=128_256, special_tokens=["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                                "<|eot_id|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        what = "128k byte-level BPE trained on the synthetic text"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        chat_template=CHAT_TEMPLATE, model_max_length=1 << 20)
    tokenizer.save_pretrained(root)
    return root, f"{what}, vocab {len(tokenizer)}"


def naive_baseline(source: Path, out: Path, tokenizer_dir: Path, subsets=tuple(ROWS)) -> tuple[int, list[int]]:
    """The straightforward way: datasets.map per row, apply_chat_template per conversation, one process."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    conversations, sft_train_lengths = 0, []

    def edit_row(row):
        selected = data_step_feedback(row["feedback"])
        messages, lengths = [], []
        for perm in itertools.permutations(selected):
            conv = build_edit_conversation(row["context"], row["original_response"], list(perm))
            conv.append({"role": "assistant", "content": row["edited_response"]})
            lengths.append(len(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)))
            messages.append(conv)
        prompt = build_edit_conversation(row["context"], row["original_response"], selected)
        prompt_len = len(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                       return_dict=False))
        return {"sft": messages, "sft_lengths": lengths, "prompt": prompt, "prompt_length": prompt_len}

    def quality_row(row):
        prompt = build_edit_conversation(row["context"], row["original_response"], data_step_feedback(row["feedback"]))
        lengths = [len(tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": row[k]}],
                                                     tokenize=True, return_dict=False))
                   for k in ("good_edited_response", "bad_edited_response", "original_response")]
        return {"prompt": prompt, "lengths": lengths}

    def feedback_row(row):
        from data_prep.feedback_prompt import build_feedback_request

        lengths = [len(tokenizer.apply_chat_template(
            build_feedback_request(row["context"], row[f"response{r}"]) + [{"role": "assistant", "content": row[f"feedback{r}"][0]}],
            tokenize=True, return_dict=False)) for r in (1, 2)]
        return {"lengths": lengths}

    def preference_row(row):
        lengths = [len(tokenizer.apply_chat_template(row["context"] + [{"role": "assistant", "content": row[k]}],
                                                     tokenize=True, return_dict=False)) for k in ("response1", "response2")]
        return {"lengths": lengths}

    functions = {"edit": edit_row, "edit_quality": quality_row, "feedback": feedback_row, "preference": preference_row}
    for subset, fn in ((s, functions[s]) for s in subsets):
        for split in ("train", "validation"):
            ds = datasets.load_dataset("json", data_files=str(source / subset / f"{split}.jsonl.gz"), split="train",
                                       cache_dir=str(out / "cache"))
            mapped = ds.map(fn, num_proc=None, load_from_cache_file=False)
            mapped.to_json(out / f"{subset}-{split}.jsonl", force_ascii=False)
            conversations += len(mapped) * {"edit": 6, "edit_quality": 3}.get(subset, 2)
            if (subset, split) == ("edit", "train"):
                sft_train_lengths = [n for lengths in mapped["sft_lengths"] for n in lengths]
    return conversations, sft_train_lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=1.0, help="share of the full row counts (default 1.0)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--subsets", default=",".join(ROWS), help="HelpSteer3 subsets to generate and build (default: all four)")
    ap.add_argument("--workdir", help="where to put the synthetic input and outputs (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="data_prep_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        subsets = tuple(s for s in ROWS if s in args.subsets.split(","))
        sizes = write_input(work / "input", args.fraction, subsets=subsets)
        size_mb = sum(p.stat().st_size for p in (work / "input").rglob("*.gz")) / 1e6
        print(f"[bench] synthetic input: {sizes} ({size_mb:.0f} MB gzipped) in {time.perf_counter() - t:.1f} s")
        tokenizer_dir, what = make_tokenizer(work / "tokenizer", work / "input")
        print(f"[bench] tokenizer: {what}")

        shutil.rmtree(work / "out", ignore_errors=True)
        t = time.perf_counter()
        timings = {}
        manifest = build(str(work / "input"), work / "out", progress=True, timings=timings,
                         options=Options(feedback_orders="all", tokenizer=str(tokenizer_dir), max_seq_len=16_384,
                                         subsets=subsets))
        ours = time.perf_counter() - t
        lines = {k: v["lines"] for k, v in manifest["outputs"].items()}
        print(f"[bench] data_prep.build: {ours:.1f} s (phases {timings})  outputs {lines}")
        print(f"[bench] token lengths sft/train: {manifest['token_lengths']['sft/train']}")
        if args.skip_baseline:
            return
        shutil.rmtree(work / "baseline", ignore_errors=True)
        (work / "baseline").mkdir()
        t = time.perf_counter()
        conversations, naive_lengths = naive_baseline(work / "input", work / "baseline", tokenizer_dir, subsets)
        naive = time.perf_counter() - t
        same = percentiles(naive_lengths) == manifest["token_lengths"]["sft/train"]
        print(f"[bench] token counts of sft/train agree with per-conversation apply_chat_template: {same}")
        print(f"[bench] naive baseline (datasets.map + per-row apply_chat_template): {naive:.1f} s "
              f"({conversations} conversations counted)")
        print(f"[bench] data_prep {ours:.1f} s vs naive {naive:.1f} s: {naive / ours:.1f}x faster "
              f"(goal: < 60 s and >= 3x)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
