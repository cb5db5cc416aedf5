"""Token counts of chat conversations, as `len(tokenizer.apply_chat_template(messages))` gives them.

Counting every conversation with apply_chat_template is slow at HelpSteer3's scale: each row becomes
6 conversations that share all but one message. A tokenizer splits its input at added (special)
tokens before anything else, so the rendered chat is a sequence of independent text pieces between
special tokens, and its length is the sum of theirs. We render each conversation with the chat
template, split it there, and encode each distinct piece once, in batches (the Rust tokenizer
spreads a batch over the cores). The first conversations are checked against apply_chat_template;
a tokenizer whose count the shortcut does not reproduce is counted the plain way instead.
"""
from __future__ import annotations

import re
from typing import Sequence

Conversation = list[dict]
VERIFY_FIRST = 32  # conversations compared with apply_chat_template before trusting the shortcut


def load_tokenizer(name_or_path: str):
    from recipes.io import UserError

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--tokenizer {name_or_path}: cannot load it ({first_line[:200]})") from None
    if not tokenizer.chat_template:
        raise UserError(f"--tokenizer {name_or_path}: it has no chat template, so conversations cannot be counted")
    return tokenizer


class TokenCounter:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = sorted({t for t in tokenizer.get_added_vocab()}, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._specials = set(specials)
        self._encode = self._make_encoder(tokenizer)
        self._verified = 0
        self.exact_shortcut = self._split is not None  # turned off if a check fails

    @staticmethod
    def _make_encoder(tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return lambda texts: [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def render(self, conversations: Sequence[Conversation], add_generation_prompt: bool = False) -> list[str]:
        if not conversations:
            return []
        return self.tokenizer.apply_chat_template(list(conversations), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def count(self, conversations: Sequence[Conversation], add_generation_prompt: bool = False) -> list[int]:
        """Token count of each conversation (with the generation prompt when asked)."""
        texts = self.render(conversations, add_generation_prompt)
        if not self.exact_shortcut:
            return self._encode(texts)
        lengths = self._count_by_pieces(texts)
        if self._verified < VERIFY_FIRST:  # compare the first conversations with the plain count
            checked = list(conversations[: VERIFY_FIRST - self._verified])
            plain = self.tokenizer.apply_chat_template(checked, tokenize=True, return_dict=False,
                                                       add_generation_prompt=add_generation_prompt)
            self._verified += len(checked)
            if [len(ids) for ids in plain] != lengths[: len(checked)]:
                self.exact_shortcut = False
                return self._encode(texts)
        return lengths

    def _count_by_pieces(self, texts: list[str]) -> list[int]:
        split_texts = [self._split.split(text) for text in texts]
        pieces = {}
        for parts in split_texts:
            for part in parts:
                if part and part not in self._specials:
                    pieces[part] = 0
        unique = list(pieces)
        for piece, n in zip(unique, self._encode(unique) if unique else []):
            pieces[piece] = n
        return [sum(1 if part in self._specials else pieces[part] for part in parts if part) for parts in split_texts]
