"""Token counts of chat conversations, equal to `len(tokenizer.apply_chat_template(messages))`.

Counting every conversation with apply_chat_template is slow at HelpSteer3's scale: each row becomes
6 conversations that share all but one message, and most of the text is the same words again and
again. A fast (Rust) tokenizer works in stages, and two of them make the count additive:
  1. it splits the input at added (special) tokens, and encodes the text between them separately;
  2. its pre-tokenizer splits that text into pre-tokens (a regex: words, numbers, spaces, ...),
     and BPE encodes each pre-token on its own.
So a rendered chat's length is the number of special tokens plus the sum of its pre-tokens' lengths.
We render each conversation with the chat template (apply_chat_template, tokenize=False), split it
at special tokens, split each distinct piece into pre-tokens with the same regex, and encode each
distinct pre-token once, in batches. For tokenizers whose pre-tokenizer is not a plain regex split
(or that normalize text first) we encode each distinct piece whole instead, which is still exact.
A row's feedback orders differ only in the edit request: that conversation is rendered once and the
other requests are substituted where the template put the first one verbatim, and (for Llama-3-style
regexes) edit requests are cut at line starts so the same feedback items are pre-tokenized once.
The first conversations are checked against apply_chat_template; if a count differs, the counter
switches to encoding whole rendered texts for good.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

import regex

Conversation = list[dict]
VERIFY_FIRST = 32  # conversations compared with apply_chat_template before trusting the shortcut
# The pattern of tokenizers' ByteLevel(use_regex=True) pre-tokenizer (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_tokenizer(name_or_path: str):
    from hs3.io import UserError

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--tokenizer {name_or_path}: cannot load it ({first_line[:200]})") from None
    if not tokenizer.chat_template:
        raise UserError(f"--tokenizer {name_or_path}: it has no chat template, so conversations cannot be counted")
    return tokenizer


def pretokenizer_pattern(tokenizer) -> str | None:
    """The regex a byte-level BPE tokenizer splits text with before BPE, when that is all it does."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or backend.pre_tokenizer is None:
        return None
    spec = json.loads(backend.pre_tokenizer.__getstate__())
    if spec.get("type") == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space"):
        return GPT2_PATTERN
    if spec.get("type") == "Sequence" and len(spec.get("pretokenizers", [])) == 2:
        split, byte_level = spec["pretokenizers"]
        if (split.get("type") == "Split" and "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated"
                and not split.get("invert") and byte_level.get("type") == "ByteLevel"
                and not byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space")):
            return split["pattern"]["Regex"]
    return None


# Pre-tokenizer regexes (Llama-3's, Qwen2's) under which the position right after the last newline of a
# whitespace run always ends a pre-token, and no pre-token looks across it: text cut there can be
# split into pre-tokens piece by piece. Used to split an edit request into its feedback items, so
# that the 6 orders of the same 3 items are pre-tokenized once.
NEWLINE_SAFE_PATTERNS = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def cut_after_newlines(text: str) -> list[str]:
    """`text` cut right after each newline that ends a whitespace run (the next line starts, after
    spaces or tabs, with a non-space character): under NEWLINE_SAFE_PATTERNS a pre-token ends there.
    Not cutting is always exact, so any doubtful position is simply left uncut."""
    lines = text.split("\n")
    chunks, current = [], []
    for line, following in zip(lines, lines[1:]):
        current.append(line)
        start = following.lstrip(" \t")
        if start and not start[0].isspace():
            chunks.append("\n".join(current) + "\n")
            current = []
    current.append(lines[-1])
    chunks.append("\n".join(current))
    return [chunk for chunk in chunks if chunk]


class TokenCounter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._specials = set(specials)
        self._split_specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        pattern = pretokenizer_pattern(tokenizer)
        self._pretokenize = regex.compile(pattern).findall if pattern else None
        self._cut_lines = cut_after_newlines if pattern in NEWLINE_SAFE_PATTERNS else None
        self._pretoken_lengths: dict[str, int] = {}
        self._encode = self._make_encoder(tokenizer)
        self._verified = 0
        self.shortcut = self._split_specials is not None  # turned off if a check fails

    @staticmethod
    def _make_encoder(tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return lambda texts: [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def count(self, conversations: Sequence[Conversation], add_generation_prompt: bool = False) -> list[int]:
        """Token count of each conversation (with the generation prompt when asked)."""
        full, prompts = (list(conversations), []) if not add_generation_prompt else ([], list(conversations))
        full_lengths, prompt_lengths, _ = self.count_batch(full, prompts)
        return prompt_lengths if add_generation_prompt else full_lengths

    def count_batch(self, full: list[Conversation], prompts: list[Conversation],
                    variants: Sequence[tuple[Conversation, int, list[str]]] = ()) -> tuple[list, list, list]:
        """Token counts of whole conversations, of prompts (+ the generation prompt), and of variants:
        (conversation, i, contents) stands for the conversation with message i's content replaced by
        each of contents in turn (a row's feedback orders). All are counted together, so the
        messages they share are split and encoded once."""
        texts = self._render(full, False) + self._render(prompts, True)
        if not self.shortcut:
            texts += [text for conv, i, contents in variants for text in self._render_each(conv, i, contents)]
            lengths = self._encode(texts) if texts else []
        else:
            parts = [self._split_specials.split(text) for text in texts]
            requests: set[str] = set()
            for conversation, index, contents in variants:
                variant_parts, variant_requests = self._variant_parts(conversation, index, contents)
                parts += variant_parts
                requests.update(variant_requests)
            lengths = self._count_parts(parts, requests)
            if self._verified < VERIFY_FIRST and lengths:
                lengths = self._verify(full, prompts, variants, lengths)
        n_full, n_prompts = len(full), len(prompts)
        variant_lengths, start = [], n_full + n_prompts
        for _, _, contents in variants:
            variant_lengths.append(lengths[start:start + len(contents)])
            start += len(contents)
        return lengths[:n_full], lengths[n_full:n_full + n_prompts], variant_lengths

    def _render_each(self, conversation: Conversation, index: int, contents: list[str]) -> list[str]:
        return self._render([self._with_content(conversation, index, c) for c in contents], False)

    def _variant_parts(self, conversation: Conversation, index: int, contents: list[str]):
        """Each variant split at special tokens, and the pieces that hold the varied content.
        Rendered once with the first content, the others substituted into its piece, where the
        template provably put it in verbatim (found exactly once, no edge whitespace a template
        might trim, no special token inside); otherwise each variant is rendered and split."""
        first = self._render([self._with_content(conversation, index, contents[0])], False)[0]
        parts = self._split_specials.split(first)
        holders = [j for j, part in enumerate(parts) if contents[0] in part]
        if (len(holders) == 1 and first.count(contents[0]) == 1
                and all(c == c.strip() and not self._split_specials.search(c) for c in contents)):
            j = holders[0]
            pieces = [parts[j].replace(contents[0], c) for c in contents]
            return [parts[:j] + [piece] + parts[j + 1:] for piece in pieces], pieces
        split = [self._split_specials.split(text) for text in self._render_each(conversation, index, contents)]
        return split, [part for parts, c in zip(split, contents) for part in parts if c in part]

    def _render(self, conversations: list[Conversation], add_generation_prompt: bool) -> list[str]:
        if not conversations:
            return []
        return self.tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)

    @staticmethod
    def _with_content(conversation: Conversation, index: int, content: str) -> Conversation:
        return conversation[:index] + [{**conversation[index], "content": content}] + conversation[index + 1:]

    def _verify(self, full, prompts, variants, lengths: list[int]) -> list[int]:
        """Compare the first conversations with apply_chat_template; fall back for good on a mismatch."""
        checked = [(conv, False) for conv in full] + [(conv, True) for conv in prompts] + \
                  [(self._with_content(conv, i, c), False) for conv, i, contents in variants for c in contents]
        for (conv, generation), n in list(zip(checked, lengths))[: VERIFY_FIRST - self._verified]:
            plain = self.tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False,
                                                       add_generation_prompt=generation)
            self._verified += 1
            if len(plain) != n:
                self.shortcut = False
                return self._encode([self._render([c], g)[0] for c, g in checked])
        return lengths

    def _count_parts(self, split_texts: list[list[str]], cut_pieces: set[str]) -> list[int]:
        """Lengths of texts given as their special-token splits: special tokens count 1 each."""
        pieces = {part: 0 for parts in split_texts for part in parts if part and part not in self._specials}
        for piece, n in zip(pieces, self._count_pieces(list(pieces), cut_pieces)):
            pieces[piece] = n
        return [sum(1 if part in self._specials else pieces[part] for part in parts if part) for parts in split_texts]

    def _count_pieces(self, pieces: list[str], cut_pieces: set[str]) -> list[int]:
        if not pieces:
            return []
        if self._pretokenize is None:
            return self._encode(pieces)
        # Edit requests are cut into lines first: their feedback items repeat across the orders.
        cut = self._cut_lines
        chunked = [cut(p) if cut is not None and p in cut_pieces else [p] for p in pieces]
        chunks = {c: 0 for cs in chunked for c in cs}
        known = self._pretoken_lengths
        split = [self._pretokenize(chunk) for chunk in chunks]
        new = list({p for pretokens in split for p in pretokens if p not in known})
        if new:
            known.update(zip(new, self._encode(new)))
        for chunk, pretokens in zip(chunks, split):
            chunks[chunk] = sum(map(known.__getitem__, pretokens))
        return [sum(map(chunks.__getitem__, cs)) for cs in chunked]
