"""Token counting: the fast path must give exactly len(apply_chat_template(...)) for every text."""
from __future__ import annotations

import pytest

from data_prep.build import Options, build
from data_prep.tokens import NEWLINE_SAFE_PATTERNS, TokenCounter, pretokenizer_pattern
from recipes.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS
from tests.conftest import SAMPLE_DIR

LLAMA3_PATTERN = next(p for p in NEWLINE_SAFE_PATTERNS if r"\p{N}{1,3}" in p)
# Texts that stress pre-token boundaries: newline runs with spaces and tabs, CRLF, punctuation
# before newlines, trailing and leading whitespace, digits, CJK, code.
TRICKY = [
    "Plain sentence. However, it lacks detail.",
    "Line one.\n\nLine two!\n  \n  indented\tafter blank\n",
    "  leading spaces and trailing  ",
    "Windows\r\nline\r\n\r\nends.\r\n",
    "code:\n    def f(x):\n        return x  # 12345\n\n\n",
    "日本語のテキスト。\n\n한국어 텍스트.\n中文。",
    "punct!!!\n\n\n...\n \n \nend",
    "\n\nstarts with newlines and ends with spaces   \n   ",
]


def llama3_style_tokenizer():
    """A small byte-level BPE with Llama-3's pre-tokenizer regex and the project's chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = [line for path in sorted(SAMPLE_DIR.glob("*/*.jsonl")) for line in path.read_text().splitlines()]
    tok.train_from_iterator(corpus + TRICKY, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=CHAT_TEMPLATE)


def conversations() -> list[list[dict]]:
    convs = []
    for i, text in enumerate(TRICKY):
        convs.append([{"role": "user", "content": text}, {"role": "assistant", "content": TRICKY[i - 1]},
                      {"role": "user", "content": "Edit the response to the previous prompt based on the following "
                                                  "feedback:\n\n" + "\n\n".join(TRICKY[i:i + 3])}])
    return convs


def plain(tokenizer, conv, generation=False) -> int:
    return len(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False, add_generation_prompt=generation))


@pytest.fixture(scope="module")
def llama3_tokenizer():
    return llama3_style_tokenizer()


def test_llama3_pattern_is_recognised(llama3_tokenizer, tiny_model_dir):
    from transformers import AutoTokenizer

    assert pretokenizer_pattern(llama3_tokenizer) == LLAMA3_PATTERN
    assert pretokenizer_pattern(AutoTokenizer.from_pretrained(tiny_model_dir)) is not None  # GPT-2-style ByteLevel


@pytest.mark.parametrize("which", ["llama3", "tiny"])
def test_counts_equal_apply_chat_template(which, llama3_tokenizer, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = llama3_tokenizer if which == "llama3" else AutoTokenizer.from_pretrained(tiny_model_dir)
    convs = conversations()
    counter = TokenCounter(tokenizer)
    counter._verified = 10**9  # no self-check: this test is the check
    # Feedback orders as variants of one conversation: some with edge whitespace (rendered one by one).
    variants = [(conv, 2, [conv[2]["content"], conv[2]["content"][::-1], conv[2]["content"] + "\n"]) for conv in convs]
    full, prompts, varied = counter.count_batch(convs, convs, variants)
    assert full == [plain(tokenizer, c) for c in convs]
    assert prompts == [plain(tokenizer, c, generation=True) for c in convs]
    assert varied == [[plain(tokenizer, TokenCounter._with_content(c, i, text)) for text in contents]
                      for c, i, contents in variants]
    assert counter.shortcut


def test_a_wrong_shortcut_falls_back_to_exact_counts(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    counter = TokenCounter(tokenizer)
    counter._pretokenize = lambda text: [text[i:i + 1] for i in range(len(text))]  # a broken pre-tokenizer
    convs = conversations()
    assert counter.count(convs) == [plain(tokenizer, c) for c in convs]
    assert not counter.shortcut  # the self-check caught it


def test_workers_do_not_change_the_output(tmp_path, tiny_model_dir):
    import json

    from tests.test_data_prep_build import edit_row, write_source

    rows = [edit_row(i, edited_response="word " * (1 + i % 30),
                     feedback=[f"It lacks {i}.", "However, fine.  ", f"but {i}\n"]) for i in range(200)]
    src = write_source(tmp_path / "src", {"edit/train": rows})
    counted = Options(tokenizer=str(tiny_model_dir))
    one = build(str(src), tmp_path / "one", options=counted, progress=False, workers=1)
    two = build(str(src), tmp_path / "two", options=counted, progress=False, workers=2)
    assert one["outputs"] == two["outputs"] and one["token_lengths"] == two["token_lengths"]
    median = one["token_lengths"]["sft/train"]["p50"]
    cut = Options(tokenizer=str(tiny_model_dir), max_seq_len=median)
    one = build(str(src), tmp_path / "one-cut", options=cut, progress=False, workers=1)
    two = build(str(src), tmp_path / "two-cut", options=cut, progress=False, workers=2)
    assert one["outputs"] == two["outputs"] and one["counts"] == two["counts"]
    assert 0 < one["counts"]["edit/train"]["rejected_by_reason"]["too_long"] < 200
    assert json.loads((tmp_path / "two-cut/manifest.json").read_text())["token_lengths"] == one["token_lengths"]


def test_max_seq_len_rejects_train_rows_and_keeps_every_validation_row(tmp_path, tiny_model_dir):
    """--max-seq-len is a training limit: train rows over it are rejected (too_long); validation rows are
    all kept, their longer lines flagged "over_max_seq_len" and counted per split. Before, validation
    rows were rejected too (with 200, every edit/validation row of the sample was dropped)."""
    from hs3.io import read_jsonl
    from tests.conftest import SAMPLE_DIR

    counted = build(str(SAMPLE_DIR), tmp_path / "all", options=Options(tokenizer=str(tiny_model_dir)), progress=False)
    limit = 200
    cut = build(str(SAMPLE_DIR), tmp_path / "cut", options=Options(tokenizer=str(tiny_model_dir), max_seq_len=limit),
                progress=False)
    assert cut["counts"]["edit/train"]["rejected_by_reason"].get("too_long", 0) > 0
    for subset, kinds in (("edit", ("sft", "prompts")), ("edit_quality", ("pairs",))):
        validation = cut["counts"][f"{subset}/validation"]
        assert validation["rejected"] == counted["counts"][f"{subset}/validation"]["rejected"] == 0
        assert validation["used"] == validation["read"] > 0
        flagged_rows = set()
        for kind in kinds:
            kept = read_jsonl(tmp_path / "cut" / kind / "validation.jsonl")
            before = read_jsonl(tmp_path / "all" / kind / "validation.jsonl")
            assert [{k: v for k, v in line.items() if k != "over_max_seq_len"} for line in kept] == before
            flagged = [line for line in kept if line.get("over_max_seq_len")]
            assert all(line["over_max_seq_len"] is True for line in flagged)
            assert len(flagged) == validation["over_max_seq_len"]["lines"].get(kind, 0)
            flagged_rows |= {line["source"]["row"] for line in flagged}
        assert validation["over_max_seq_len"]["rows"] == len(flagged_rows)
    assert cut["counts"]["edit/validation"]["over_max_seq_len"]["rows"] > 0  # the limit bites on validation too
    # Which lines are flagged: exactly those longer than the limit, counted with apply_chat_template.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for line in read_jsonl(tmp_path / "cut" / "sft" / "validation.jsonl"):
        assert bool(line.get("over_max_seq_len")) == (plain(tokenizer, line["messages"]) > limit)
