"""Forward passes without generation: the policy's length-normalised log-likelihood of a response
(reward models score in eval/reward_scorers.py)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

Messages = list[dict]


def _by_length(lengths: Sequence[int], batch_size: int):
    """Index batches, longest first (less padding; an out-of-memory error shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def mean_logprobs(model, tokenizer, prompts: Sequence[Messages], responses: Sequence[str], batch_size: int = 8,
                  progress: Optional[Callable[[int], None]] = None) -> list[float]:
    """Per (prompt, response): mean log-probability of the response's tokens (its end-of-turn
    token included) given the prompt, under the chat template."""
    import torch

    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        prefix = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if full_ids[:len(prefix_ids)] != prefix_ids:  # a template that rewrites earlier turns: score by text split
            full_ids = prefix_ids + tokenizer(full[len(prefix):], add_special_tokens=False)["input_ids"]
        rows.append((full_ids, len(prefix_ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[float] = [0.0] * len(rows)
    for batch in _by_length([len(r[0]) for r in rows], batch_size):
        width = max(len(rows[i][0]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)  # which target positions count
        for b, i in enumerate(batch):
            ids, n_prefix = rows[i]
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention[b, :len(ids)] = 1
            scored[b, n_prefix:len(ids)] = True
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits
            for b, i in enumerate(batch):  # one row at a time: float32 log-softmax over a 128k vocabulary is large
                # token t is predicted from position t-1
                targets = input_ids[b, 1:].to(logits.device)
                logprobs = torch.log_softmax(logits[b, :-1].float(), dim=-1).gather(-1, targets[:, None])[:, 0]
                mask = scored[b, 1:].to(logits.device)
                results[i] = float((logprobs * mask).sum() / mask.sum().clamp(min=1))
        if progress:
            progress(len(batch))
    return results
