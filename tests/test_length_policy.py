"""One length and scoring policy on Llama-3's token layout (its special tokens and chat template, a small
BPE): no trained row loses its <|eot_id|>, the reward model reads its score at <|eot_id|>, and rm
training, the RL reward and the eval's scorer give the same score for the same conversation."""
from __future__ import annotations

import pytest
import torch

from recipes import reward, rl, rm, sft, training
from recipes.config import compose
from hs3.io import read_jsonl


@pytest.fixture(scope="module")
def llama3_policy_dir(tmp_path_factory):
    """A tiny random Llama whose tokenizer has Llama-3.3's special tokens, chat template and settings
    (eos <|eot_id|>, no pad token), as a checkpoint dir the stages can start from."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from recipes.tiny_model import build_llama3_tokenizer

    tokenizer = build_llama3_tokenizer()
    assert tokenizer.pad_token is None and tokenizer.eos_token == "<|eot_id|>"  # as Llama-3.3-70B-Instruct's
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|eot_id|>"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    out = tmp_path_factory.mktemp("llama3") / "policy"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_llama3_pad_is_not_the_end_of_turn_token(llama3_policy_dir, tmp_path):
    """recipes.models.load_tokenizer alone would set pad = eos = <|eot_id|> (the sequence classifier would
    then read its score at the last content token); the stages use <|finetune_right_pad_id|>."""
    tokenizer = training.load_tokenizer(compose("rm", [f"run_dir={tmp_path}", f"init={llama3_policy_dir}"]))
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert tokenizer.pad_token_id != tokenizer.convert_tokens_to_ids("<|eot_id|>")


def test_no_trained_sft_row_loses_its_end_of_turn(edit_data_dir, llama3_policy_dir, tmp_path):
    """With train.seq_len below the longest rows, those rows are skipped and counted, and every row that
    is trained on has labels ending in <|eot_id|>. Before, SFTTrainer kept the start of a longer row
    (trl/trainer/sft_trainer.py:1436-1446, truncation_mode keep_start) and trained on a cut edit."""
    rows = read_jsonl(edit_data_dir / "sft" / "train.jsonl")
    probe = training.load_tokenizer(compose("sft", [f"run_dir={tmp_path}", f"init={llama3_policy_dir}"]))
    lengths = [len(probe.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in rows]
    seq_len = sorted(lengths)[len(lengths) // 2]
    over = sum(n > seq_len for n in lengths)
    assert 0 < over < len(rows)

    cfg = compose("sft", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={llama3_policy_dir}",
                          f"train.seq_len={seq_len}"])
    trainer = sft.build_trainer(cfg)
    assert trainer.skipped_too_long["train"] == over and len(trainer.train_dataset) == len(rows) - over
    eot = trainer.processing_class.convert_tokens_to_ids("<|eot_id|>")
    for i in range(len(trainer.train_dataset)):
        batch = trainer.data_collator([trainer.train_dataset[i]])
        labels = [t for t in batch["labels"][0].tolist() if t != -100]
        assert labels and labels[-1] == eot, i
        assert batch["input_ids"].shape[1] <= seq_len


def test_rm_rl_and_eval_score_a_conversation_identically(edit_data_dir, llama3_policy_dir, tmp_path):
    """The same conversation (a pair's prompt + chosen edit) scored three ways by the same reward model:
    as rm training feeds it (RewardTrainer's dataset and collator, the model's forward), as the RL reward
    (the rl stage's reward function on a finished completion) and by recipes.reward.score_conversations,
    the eval's scorer. All three read the score at <|eot_id|>."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_cfg = compose("rm", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={llama3_policy_dir}",
                            "rm.selection_fraction=0.25"])
    trainer = rm.build_trainer(rm_cfg)
    tokenizer = trainer.processing_class
    rm_dir = tmp_path / "rm_final"
    trainer.model.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)

    # 1. rm training: the trainer's own dataset row, collated and forwarded as RewardTrainer.compute_loss does.
    row = trainer.train_dataset[0]
    pairs = read_jsonl(edit_data_dir / "pairs" / "train.jsonl")
    pair = next(p for p in pairs if reward.reward_input_ids(tokenizer, p["prompt"] + p["chosen"]) == row["chosen_ids"])
    conversation = pair["prompt"] + pair["chosen"]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert row["chosen_ids"][-1] == eot and row["chosen_ids"][0] == tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    batch = trainer.data_collator([row, trainer.train_dataset[1]])  # padded with a longer/shorter neighbour
    trainer.model.eval()
    with torch.no_grad():
        training_score = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, 0].item()

    # 2. The RL reward: the rl stage's reward function, with the rm's final/ as reward model.
    rl_cfg = compose("rl", [f"run_dir={tmp_path}", f"data={edit_data_dir}", f"init={llama3_policy_dir}",
                            f"rm={rm_dir}", "rl.max_new_tokens=16"])
    rl_trainer = rl.build_trainer(rl_cfg)
    edit_reward = rl_trainer.reward_funcs[0]
    assert isinstance(edit_reward, rl.EditReward)
    completion_ids = tokenizer(pair["chosen"][0]["content"], add_special_tokens=False)["input_ids"] + [eot]
    [rl_score] = edit_reward(prompts=[pair["prompt"]], completions=[pair["chosen"]], completion_ids=[completion_ids],
                             original_response=["x"])

    # 3. The eval: its proxy scorer (eval/run.py, the training RM) on the saved model, loaded as the eval
    # loads it; and recipes.reward.score_conversations, the function it calls.
    from eval.run import proxy_scorer

    [eval_score] = proxy_scorer(str(rm_dir), compose("eval", [f"run_dir={tmp_path}"])).score([conversation])
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    [function_score] = reward.score_conversations(model, AutoTokenizer.from_pretrained(rm_dir), [conversation], 4096)

    assert training_score == pytest.approx(rl_score, abs=1e-5) and rl_score == pytest.approx(eval_score, abs=1e-5)
    assert eval_score == pytest.approx(function_score, abs=1e-5)

    # The score is the head's output at <|eot_id|> (the last real token), not at the last content token.
    with torch.no_grad():
        ids = torch.tensor([row["chosen_ids"]])
        per_position = model.score(model.model(input_ids=ids).last_hidden_state)[0, :, 0]
    assert eval_score == pytest.approx(per_position[-1].item(), abs=1e-5)
    assert abs(per_position[-2].item() - eval_score) > 1e-6


def test_truncation_keeps_bos_system_header_and_the_final_turns(llama3_policy_dir):
    """A conversation over max_len keeps BOS + the system header (+ the first turn's role header) and the
    last tokens (response, edit request); the start of the earliest context goes. Before, the eval kept
    the last max_len tokens, dropping BOS and the system header."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama3_policy_dir)
    context = " ".join(f"word{i}" for i in range(300))
    conversation = [{"role": "user", "content": context}, {"role": "assistant", "content": "Original answer."},
                    {"role": "user", "content": "Edit the response to the previous prompt based on the following "
                                                "feedback:\n\nIt lacks detail."},
                    {"role": "assistant", "content": "The edited answer."}]
    full = reward.reward_input_ids(tokenizer, conversation)
    head = reward.head_length(tokenizer, conversation)
    assert tokenizer.decode(full[:head]).startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert tokenizer.decode(full[:head]).endswith("<|start_header_id|>user<|end_header_id|>\n\n")
    max_len = len(full) - 100
    cut = reward.reward_input_ids(tokenizer, conversation, max_len)
    assert len(cut) == max_len and cut[:head] == full[:head] and cut[head:] == full[-(max_len - head):]
    assert tokenizer.decode(cut).endswith("It lacks detail.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                                          "The edited answer.<|eot_id|>")
    assert reward.reward_input_ids(tokenizer, conversation, len(full)) == full  # nothing cut when it fits
    with pytest.raises(ValueError, match="no room"):
        reward.reward_input_ids(tokenizer, conversation, head)


def test_70b_data_is_built_at_the_training_sequence_length(tmp_path):
    """The 70B model files build their data with the model's tokenizer and max_seq_len = the stages'
    train.seq_len, so sft/rm/dpo never skip a row the data step did not reject (and report)."""
    for model in ("llama33_70b", "llama33_70b_lora"):
        data = compose("data", [f"model={model}", f"run_dir={tmp_path}"])
        assert data.prep.tokenizer is None  # the model's own tokenizer
        for stage in ("sft", "rm", "dpo", "rl"):
            assert data.prep.max_seq_len == compose(stage, [f"model={model}", f"run_dir={tmp_path}"]).train.seq_len == 4096
    assert compose("rl", [f"run_dir={tmp_path}"]).rl.mask_truncated_completions is True
