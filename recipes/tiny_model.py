"""A tiny random Llama-architecture model with a Llama-3-format chat template, built locally.

Every CPU test and the smoke pipeline use it: no hub access, a few seconds to build, and the same
bytes for the same config and seed. Its tokenizer is a byte-level BPE trained on a fixed corpus
(the bundled HelpSteer3-schema sample), so any UTF-8 text tokenizes and sequences stay short.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from hs3.io import follow_umask

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]

# Llama-3 chat format, written for this project: <|begin_of_text|>, then for every message
# <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>; the generation prompt opens an
# assistant header. (Llama-3.3's own template also adds a dated system header; ours omits it.)
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    "{%- endif -%}"
)

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data_prep" / "sample"

# Llama-3's special tokens as its tokenizer names them (ids 128000.. there; here after the BPE merges),
# and its pre-tokenizer regex. For tests that need Llama-3's exact token layout (build_llama3_tokenizer).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _corpus() -> list[str]:
    """Fixed training text for the tokenizer: the bundled sample rows, in a fixed order."""
    texts = []
    for path in sorted(SAMPLE_DIR.glob("*/*.jsonl")):
        texts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return texts or ["The quick brown fox jumps over the lazy dog."]


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 16,
    )


def llama3_chat_template() -> str:
    """Llama-3.1's chat template (Llama-3.3-70B-Instruct ships the same one), as TRL bundles it
    (trl/chat_templates/llama3_1.jinja): BOS, a system header with the knowledge cutoff and date, then
    each turn; content is trimmed."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "llama3_1.jinja").read_text(encoding="utf-8")


def build_llama3_tokenizer(vocab_size: int = 1024):
    """A small byte-level BPE with Llama-3's pre-tokenizer, its special tokens, its chat template and
    its special-token settings (bos <|begin_of_text|>, eos <|eot_id|>, no pad token set): the token
    layout of Llama-3.3-70B-Instruct on a vocabulary that trains in a second."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=LLAMA3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=llama3_chat_template(), model_max_length=1 << 17)


def build_tiny_model(model_cfg, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny Llama (weights, config, tokenizer, chat template) into out_dir."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(model_cfg.vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        tie_word_embeddings=model_cfg.tie_embeddings,
        bos_token_id=ids("<|begin_of_text|>"),
        eos_token_id=ids("<|eot_id|>"),
        pad_token_id=ids("<|finetune_right_pad_id|>"),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_tiny_model(model_cfg, cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The cached tiny model for this config and corpus, built once (atomically) on first use."""
    fields = {k: model_cfg[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                                        "ffn_hidden_size", "vocab_size", "max_position_embeddings", "tie_embeddings")}
    key = hashlib.sha256(json.dumps([fields, seed, _corpus()], sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_dir) / f"tiny-llama-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        build_tiny_model(model_cfg, tmp, seed)
        follow_umask(tmp)  # mkdtemp makes 0700, safetensors 0600: a cache the group can read (umask 002)
        try:
            os.rename(tmp, target)
        except OSError:  # another process built it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
