"""Forward passes without generation: the reward model's score of a conversation, and the
policy's length-normalised log-likelihood of a response."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

Messages = list[dict]


def _by_length(lengths: Sequence[int], batch_size: int):
    """Index batches, longest first (less padding; an out-of-memory error shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


class RewardScorer:
    """A sequence-classification model with one output (the rm stage's final/), scoring
    prompt + response formatted with its chat template, as TRL's RewardTrainer formats them."""

    def __init__(self, path: str, dtype: str = "float32", batch_size: int = 8, max_length: int = 4096):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from eval.engines import gpu_device_map
        from recipes.models import load_pretrained, torch_dtype

        self.model = load_pretrained(
            AutoModelForSequenceClassification, path, dtype=torch_dtype(dtype), device_map=gpu_device_map()).eval()
        self.tokenizer = load_pretrained(AutoTokenizer, path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # keep the response when a conversation is too long
        self.batch_size = batch_size
        self.max_length = max_length

    def score(self, conversations: Sequence[Messages], progress: Optional[Callable[[int], None]] = None) -> list[float]:
        import torch

        texts = [self.tokenizer.apply_chat_template(list(m), tokenize=False) for m in conversations]
        ids = [self.tokenizer(t, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
               for t in texts]
        scores: list[float] = [0.0] * len(ids)
        for batch in _by_length([len(x) for x in ids], self.batch_size):
            inputs = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(self.model.device)
            with torch.inference_mode():
                logits = self.model(**inputs).logits[:, 0].float().tolist()
            for i, value in zip(batch, logits):
                scores[i] = value
            if progress:
                progress(len(batch))
        return scores


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
