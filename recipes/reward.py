"""The reward model's input and score: ONE definition for rm training, the RL reward and the eval.

    reward_input_ids(tokenizer, messages, max_len)          token ids the reward model reads
    score_conversations(model, tokenizer, conversations, max_len)   one float per conversation
    ensure_distinct_pad(tokenizer)                           a pad token that is not the end-of-turn token

Format: the whole conversation rendered by the tokenizer's chat template (as TRL's RewardTrainer
renders a preference pair), so a finished response ends with the template's end-of-turn token
(Llama-3: <|eot_id|>) and the score head reads its output there. A sequence classifier reads its score
at the rightmost token that is not `config.pad_token_id`; with Llama's usual pad = <|eot_id|> that is the
last content token, so the pad must be another token: Llama-3 reserves <|finetune_right_pad_id|>.

Unfinished responses (an RL completion cut at max_new_tokens) are rendered without an end-of-turn
token: the prompt with the generation prompt, then the response text (`finished=False`).

Truncation rule (only when a conversation is longer than max_len): keep the head, i.e. everything the
template puts before the first non-system turn's content (BOS, the system header with its date and
system prompt, the first turn's role header), and the last max_len - len(head) tokens (the response, the
edit request, then as much of the latest context as fits). What goes is the start of the earliest
context turns. Training never needs it (the stages skip longer rows); the RL reward and the eval do.

This module imports neither eval nor torch at import time: recipes and eval both import it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

Messages = list[dict]

# Tokens a chat template never emits, usable as padding, in order of preference. Llama-3 reserves
# <|finetune_right_pad_id|> for exactly this; <|endoftext|> is SmolLM2's (ChatML ends turns with <|im_end|>).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<|pad|>")
# End-of-turn / end-of-sequence tokens of common templates: never a pad for a reward model.
END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "</s>")


def _end_ids(tokenizer) -> set[int]:
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def ensure_distinct_pad(tokenizer):
    """Set tokenizer.pad_token to a token that is not an end-of-turn/eos token (the first of
    PAD_CANDIDATES in its vocabulary) when it is unset or equal to one; returns the tokenizer.
    A tokenizer with no such token is a ValueError naming it."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in _end_ids(tokenizer):
        return tokenizer
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in _end_ids(tokenizer):
            tokenizer.pad_token = candidate
            return tokenizer
    raise ValueError(
        f"tokenizer {tokenizer.name_or_path}: no pad token distinct from its end-of-turn token "
        f"{tokenizer.eos_token!r} (tried {', '.join(PAD_CANDIDATES)}); a reward model would read its score before "
        f"the end of the turn")


def _render_ids(tokenizer, messages: Messages, finished: bool) -> list[int]:
    if finished:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    else:  # the prompt with its generation prompt, then the response text: no end-of-turn token
        text = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
        text += messages[-1]["content"]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def head_length(tokenizer, messages: Messages) -> int:
    """Tokens before the first non-system turn's content: the part the truncation rule always keeps.
    Found as the common token prefix of the conversation with that content replaced by two different
    letters (so it holds for any chat template that renders earlier turns independently of later ones)."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None:
        return 0
    variants = []
    for letter in ("A", "B"):
        changed = [*messages[:first], {**messages[first], "content": letter}]
        variants.append(_render_ids(tokenizer, changed, True))
    n = 0
    while n < min(map(len, variants)) and variants[0][n] == variants[1][n]:
        n += 1
    return n


def truncate_ids(ids: list[int], head: int, max_len: int) -> list[int]:
    """The truncation rule on token ids: ids[:head] + the last max_len - head ids."""
    if len(ids) <= max_len:
        return ids
    if max_len <= head:
        raise ValueError(f"max_len={max_len} leaves no room after the {head} tokens of BOS and the system header")
    return ids[:head] + ids[len(ids) - (max_len - head):]


def reward_input_ids(tokenizer, messages: Messages, max_len: Optional[int] = None, finished: bool = True) -> list[int]:
    """The token ids the reward model reads for `messages` (the last one the response), cut by the
    truncation rule to at most max_len (None: never cut)."""
    ids = _render_ids(tokenizer, messages, finished)
    if max_len is None or len(ids) <= max_len:
        return ids
    return truncate_ids(ids, head_length(tokenizer, messages), max_len)


def conversation_length(tokenizer, messages: Messages, add_generation_prompt: bool = False) -> int:
    """Tokens of the conversation as the stages train on it (chat template, no truncation)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _by_length(lengths: Sequence[int], batch_size: int):
    """Index batches, longest first (less padding; an out-of-memory error shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _device(model):
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def score_conversations(model, tokenizer, conversations: Sequence[Messages], max_len: Optional[int],
                        batch_size: int = 8, finished: Optional[Sequence[bool]] = None,
                        progress: Optional[Callable[[int], None]] = None, device=None) -> list[float]:
    """The reward model's score of each conversation: reward_input_ids (truncation rule at max_len),
    right-padded with a pad distinct from the end-of-turn token (set on the tokenizer and on the
    model's config if needed), the single output at the last real token. `finished[i]` False: the
    response was cut and is scored without an end-of-turn token. Batched longest first; the result
    is in input order and does not depend on batch_size."""
    import torch

    ensure_distinct_pad(tokenizer)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if config.pad_token_id != tokenizer.pad_token_id:
        config.pad_token_id = tokenizer.pad_token_id
    finished = [True] * len(conversations) if finished is None else list(finished)
    ids = [reward_input_ids(tokenizer, m, max_len, f) for m, f in zip(conversations, finished, strict=True)]
    device = device if device is not None else _device(model)
    scores: list[float] = [0.0] * len(ids)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for batch in _by_length([len(x) for x in ids], batch_size):
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
                attention[row, :len(ids[i])] = 1
            with torch.inference_mode():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, 0]
            for i, value in zip(batch, logits.float().tolist()):
                scores[i] = value
            if progress:
                progress(len(batch))
    finally:
        if was_training:
            model.train()
    return scores
