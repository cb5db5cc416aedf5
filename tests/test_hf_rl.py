"""rl on the HF engine: RLOO's leave-one-out baseline on the trainer's own advantages; copy rate."""
from __future__ import annotations

import pytest
import torch

from recipes import rl
from recipes.config import compose
from hs3.io import read_jsonl


@pytest.fixture(scope="module")
def random_reward_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a fresh one-output head: a reward model whose scores differ per completion."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "final"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_rloo_advantage_is_reward_minus_mean_of_the_other_rollouts(edit_data_dir, tmp_path, tiny_model_dir,
                                                                    random_reward_model):
    k = 4
    cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         f"rm={random_reward_model}", f"rl.k={k}", "rl.max_new_tokens=8",
                         "rl.mask_truncated_completions=false",  # every completion scored (all are cut at 8 here)
                         "rl.kl_coef=0.0"])  # no KL term: the reward is exactly the reward model's score
    trainer = rl.build_trainer(cfg)
    prompts = [trainer.train_dataset[i] for i in range(cfg.rl.prompts_per_step)]
    batch = [row for row in prompts for _ in range(k)]  # RLOOTrainer's sampler repeats each prompt k times

    trainer.model.train()
    scored = trainer._generate_and_score_completions(batch)  # the trainer's own reward + advantage code

    reward_name = trainer.reward_func_names[0]
    rewards = torch.tensor(trainer._logs["rewards"][reward_name]).view(-1, k)
    assert rewards.std() > 0, "rewards must differ for the baseline to be tested"
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    torch.testing.assert_close(scored["advantages"], (rewards - others_mean).view(-1))
    assert trainer._metrics["train"]["copy_rate"] == [0.0]  # logged by the reward function, not part of the reward


def with_some_finished(trainer, finished_rows):
    """Wrap the trainer's real generation so that the completions of `finished_rows` end with <|eot_id|>
    (the last generated token replaced): a known mix of finished and cut completions."""
    generate = trainer._generate_single_turn
    eot = trainer.processing_class.convert_tokens_to_ids("<|eot_id|>")

    def wrapped(*args, **kwargs):
        ids = generate(*args, **kwargs)
        return [row[:-1] + [eot] if i in finished_rows else row for i, row in enumerate(ids)]

    trainer._generate_single_turn = wrapped


def test_truncated_completions_are_out_of_loss_baseline_and_reward(edit_data_dir, tmp_path, tiny_model_dir,
                                                                   random_reward_model, caplog):
    """rl.mask_truncated_completions (default true): a completion cut at max_new_tokens gets no reward
    (NaN), no advantage, no loss mask, and is not in its siblings' leave-one-out baseline; a finished one
    is scored by recipes.reward on its re-templated conversation, which ends in <|eot_id|>. Before, all
    were scored as complete (the re-templated text got an <|eot_id|> it never generated)."""
    from recipes import reward

    k = 4
    cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         f"rm={random_reward_model}", f"rl.k={k}", "rl.max_new_tokens=8", "rl.kl_coef=0.0"])
    assert cfg.rl.mask_truncated_completions is True
    trainer = rl.build_trainer(cfg)
    assert trainer.args.mask_truncated_completions is True  # TRL's own option (trl/trainer/rloo_config.py:542)
    finished_rows = {0, 1, 2, 5, 6}  # prompt 0: 3 finished + 1 cut; prompt 1: 2 finished + 2 cut
    with_some_finished(trainer, finished_rows)
    batch = [trainer.train_dataset[i] for i in range(cfg.rl.prompts_per_step) for _ in range(k)]
    trainer.model.train()
    with caplog.at_level("WARNING"):
        scored = trainer._generate_and_score_completions(batch)
    assert "All reward functions returned None" not in caplog.text  # intended: counted as truncated_rate

    rewards = torch.tensor(trainer._logs["rewards"]["reward_model"])
    finished = torch.tensor([i in finished_rows for i in range(len(batch))])
    assert rewards[~finished].isnan().all() and not rewards[finished].isnan().any()
    assert (scored["completion_mask"][~finished] == 0).all() and (scored["completion_mask"][finished].sum(1) > 0).all()
    # Leave-one-out over the finished siblings only; cut completions get advantage 0.
    expected = torch.zeros(len(batch))
    for group in range(cfg.rl.prompts_per_step):
        members = [i for i in range(group * k, (group + 1) * k) if i in finished_rows]
        for i in members:
            others = [rewards[j] for j in members if j != i]
            expected[i] = rewards[i] - sum(others) / len(others)
    torch.testing.assert_close(scored["advantages"], expected)
    assert trainer._metrics["train"]["truncated_rate"] == [3 / 8]

    # A finished completion's reward is the shared scorer's score of the conversation ending in <|eot_id|>.
    completion_text = trainer.processing_class.decode(scored["completion_ids"][0], skip_special_tokens=True)
    conversation = [*batch[0]["prompt"], {"role": "assistant", "content": completion_text}]
    edit_reward = trainer.reward_funcs[0]
    ids = reward.reward_input_ids(edit_reward.tokenizer, conversation, cfg.train.seq_len)
    assert ids[-1] == edit_reward.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    [expected_score] = reward.score_conversations(edit_reward.model, edit_reward.tokenizer, [conversation], cfg.train.seq_len)
    assert abs(rewards[0].item() - expected_score) < 1e-5


def test_unmasked_truncated_completions_are_scored_without_an_end_of_turn(tmp_path, tiny_model_dir, random_reward_model):
    """rl.mask_truncated_completions=false: a cut completion is scored as it stands, no <|eot_id|> appended."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes import reward

    tokenizer = AutoTokenizer.from_pretrained(random_reward_model)
    model = AutoModelForSequenceClassification.from_pretrained(random_reward_model)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    scorer = rl.EditReward(model, tokenizer, 1024, mask_truncated=False)
    scorer.end_ids = {eot, tokenizer.pad_token_id}
    prompt = [{"role": "user", "content": "Tell me about rain."}]
    completion = [{"role": "assistant", "content": "Rain is water that"}]
    cut, done = scorer([prompt, prompt], [completion, completion], [[5, 6], [5, eot]], ["x", "y"])
    open_ids = reward.reward_input_ids(tokenizer, prompt + completion, finished=False)
    assert eot not in open_ids[-3:] and tokenizer.decode(open_ids).endswith("Rain is water that")
    assert cut == pytest.approx(reward.score_conversations(model, tokenizer, [prompt + completion], 1024, finished=[False])[0], abs=1e-5)
    assert done == pytest.approx(reward.score_conversations(model, tokenizer, [prompt + completion], 1024)[0], abs=1e-5)
    assert abs(done - cut) > 1e-4


def test_rl_skips_and_counts_prompts_without_room_for_a_completion(edit_data_dir, tmp_path, tiny_model_dir,
                                                                   random_reward_model):
    from recipes import training

    cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         f"rm={random_reward_model}", "rl.max_new_tokens=8"])
    tokenizer = training.load_tokenizer(cfg)
    prompts = [r["prompt"] for r in read_jsonl(edit_data_dir / "prompts" / "train.jsonl")]
    lengths = [len(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
               for p in prompts]
    limit = sorted(lengths)[len(lengths) // 2]  # half of the prompts are longer
    seq_len = limit + 8
    cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         f"rm={random_reward_model}", "rl.max_new_tokens=8", f"train.seq_len={seq_len}"])
    trainer = rl.build_trainer(cfg)
    over = sum(n > limit for n in lengths)
    assert 0 < over < len(prompts)
    assert trainer.skipped_too_long == {"train": over} and len(trainer.train_dataset) == len(prompts) - over


def test_with_lora_the_reference_is_the_adapter_disabled_policy(edit_data_dir, tmp_path, tiny_model_dir,
                                                                random_reward_model):
    """peft.enabled: no second model copy; the KL reference is the policy with its adapter switched off,
    so at the start (LoRA's B = 0) the policy equals its reference and the logged KL is exactly 0."""
    from peft import PeftModel

    cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
                         f"rm={random_reward_model}", "rl.max_new_tokens=8", "peft.enabled=true", "peft.r=4"])
    trainer = rl.build_trainer(cfg)
    assert trainer.ref_model is None and isinstance(trainer.model, PeftModel)
    trainer.model.train()
    trainer._generate_and_score_completions([trainer.train_dataset[0]] * cfg.rl.k)
    assert trainer._metrics["train"]["kl"] == [0.0]


# ---- rollouts through vLLM (rl.vllm; docs/vllm.md) -------------------------------------------------

def test_rl_vllm_keys_reach_trls_rloo_config(tmp_path, edit_data_dir, tiny_model_dir, random_reward_model):
    """rl.vllm=server|colocate become RLOOConfig's use_vllm keys (what build_trainer passes); rl.vllm=none
    keeps transformers' generate, with a static KV cache (compiled decoding) on CUDA only."""
    from trl import RLOOConfig

    from recipes import training

    base = [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}", f"rm={random_reward_model}"]

    def args(*extra):
        cfg = compose("rl", base + list(extra))
        return training.common_args(cfg, RLOOConfig, evaluate=False, **rl.vllm_args(cfg))

    none = args()
    assert none.use_vllm is False and none.cache_implementation == ("static" if torch.cuda.is_available() else None)
    server = args("rl.vllm=server", "rl.vllm_server_url=http://10.0.0.5:8000", "train.seq_len=512")
    assert (server.use_vllm, server.vllm_mode, server.vllm_server_base_url) == (True, "server", "http://10.0.0.5:8000")
    assert server.vllm_max_model_length == 512
    colocate = args("rl.vllm=colocate", "rl.vllm_gpu_memory_utilization=0.45", "rl.vllm_tensor_parallel_size=2")
    assert (colocate.vllm_mode, colocate.vllm_gpu_memory_utilization, colocate.vllm_tensor_parallel_size) == ("colocate", 0.45, 2)


def test_rl_vllm_that_cannot_run_is_a_one_line_error(tmp_path, edit_data_dir, tiny_model_dir, random_reward_model):
    from tests.conftest import run_cli

    base = ["-m", "launcher", "rl", f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={tiny_model_dir}",
            f"rm={random_reward_model}"]
    for extra, message in ((["rl.vllm=server"], "rl.vllm=server needs rl.vllm_server_url"),
                           (["rl.vllm=sever"], "rl.vllm=sever"),
                           # this environment has no vllm (it lives in .venv-vllm): TRL could not import its client
                           (["rl.vllm=colocate"], "rl.vllm=colocate: TRL's vLLM rollouts need vllm in the training environment")):
        proc = run_cli(*base, *extra)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "rl" / "config.yaml").exists()  # refused before anything was written


def test_slurm_layout_serves_rollouts_on_some_gpus_and_trains_on_the_others(tmp_path):
    """rl.vllm=server rl.vllm_gpus=4 on an 8-GPU node: the job starts vLLM (TRL's server flags, TP 4) on GPUs
    0-3, waits for its /health, and trains on GPUs 4-7 (4 processes) against it."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    from launcher.slurm import job_config, render_script
    from recipes.config import ConfigError

    args = ["executor=slurm", "cluster=example", f"run_dir={tmp_path}", "rl.vllm=server", "rl.vllm_gpus=4",
            "rl.prompts_per_step=8", "rl.k=4", "gbs=32", "mbs=1"]
    cfg = compose("rl", args)
    job = job_config(cfg)
    assert job.hf.num_processes == 4 and job.rl.vllm_server_url.startswith("http://127.0.0.1:")
    port = job.rl.vllm_server_url.rsplit(":", 1)[1]
    script = render_script(cfg)
    server, train = script.split("# one task per node")
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in server and "VLLM_SERVER_DEV_MODE=1" in server
    assert f"--port {port} --tensor-parallel-size 4" in server and f"curl -sf http://127.0.0.1:{port}/health" in server
    assert f"--model {tmp_path}/sft/final" in server and "--srun" not in server and "srun --overlap" in server
    assert "export CUDA_VISIBLE_DEVICES=4,5,6,7;" in train and "--num_processes 4" in train
    # the flags TRL's own server script imposes for its weight sync and logprobs (trl/scripts/vllm_serve.py)
    trl_flags = build_command(ScriptArguments(model="m"))
    tail = trl_flags[trl_flags.index("--weight-transfer-config"):]
    assert rl.vllm_server_command(cfg, 1)[-len(tail):] == tail
    assert rl.VLLM_SERVER_FLAGS == tail
    with pytest.raises(ConfigError, match="leaves none of the node's cluster.gpus_per_node=8 GPUs"):
        job_config(compose("rl", args + ["rl.vllm_gpus=8"]))
    with pytest.raises(ConfigError, match="on cluster.nodes=2: the job serves and trains on one node"):
        job_config(compose("rl", args + ["nodes=2", "gbs=64", "rl.prompts_per_step=16"]))
    # the batch is divided over the 4 training processes (hf.num_processes=4 checks it at composition too)
    twelve = job_config(compose("rl", args + ["gbs=12", "rl.prompts_per_step=3", "hf.num_processes=4"]))
    assert twelve.hf.num_processes == 4 and twelve.train.global_batch == 12
    # a server given by URL: the job starts none and trains on every GPU
    given = job_config(compose("rl", args + ["rl.vllm_server_url=http://rollouts:8000"]))
    assert given.hf.num_processes == 8 and given.rl.vllm_server_url == "http://rollouts:8000"


def test_dry_run_prints_where_rollouts_run_and_the_expected_generation_time(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("-m", "launcher", "rl", f"run_dir={tmp_path}", "rl.vllm=server", "rl.vllm_server_url=http://rollouts:8000",
                   "rl.max_new_tokens=400", "megatron.vllm_decode_tokens_per_s=20", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("rl rollouts: 2 prompts x rl.k=4 = 8 completions per step, up to 400 tokens each, on a vLLM server "
            "(http://rollouts:8000): ~20 s of generation per step") in proc.stdout
    assert not (tmp_path / "rl").exists()
