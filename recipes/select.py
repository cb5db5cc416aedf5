"""select: the Select model, a scaled Bradley-Terry reward model on the preference subset.

    python -m launcher select [key=value ...]        (./launch.sh select ...)

Reads  DATA/select/{train,validation}.jsonl   (python -m data_prep --subsets ...,preference): pairs
       {"id", "prompt": context, "chosen", "rejected", "weight": |overall_preference| in 1..3, ...}
       (data_prep/select_data.py; ties were rejected there).
Writes OUT/checkpoint-N/, OUT/final/ (sequence classification, one output, + tokenizer),
       final/hs3_training.json (trained_on: preference/train), OUT/summary.json (accuracy on
       select/validation, overall and per weight).

Loss (scaled BT, HelpSteer2-Preference, arXiv 2410.01257): each pair's Bradley-Terry loss multiplied
by its preference strength, averaged over the batch:
    L = mean_i( w_i * -log sigmoid(r(prompt_i + chosen_i) - r(prompt_i + rejected_i)) ).
TRL's RewardTrainer (trl 1.16, trl/trainer/reward_trainer.py:788-792) knows only an additive `margin`
inside the sigmoid, -log sigmoid(r_c - r_r - m) (Llama-2's margin loss), which is another loss; so
ScaledBTTrainer below carries a `weight` column through the collator and overrides compute_loss.

The rest is rm's (recipes/rm.py): the score is recipes.reward's (whole conversation rendered by the
chat template, read at its end-of-turn token), rm.selection_fraction of the train pairs (seeded) are
held out to pick the best checkpoint by their (weighted) loss (rm.keep_best), train pairs longer than
train.seq_len are skipped and counted. The Select model card says its input is the context and the
response (no edit request), one float out, and that it may not work well past 4,096 tokens.
"""
from __future__ import annotations

from recipes import rm, training

SPLIT_DIR = "select"
TRAINED_ON = training.STAGE_SPLITS["select"]


def scaled_bt_loss(rewards_chosen, rewards_rejected, weight):
    """mean(weight * -log sigmoid(r_chosen - r_rejected)), the scaled Bradley-Terry loss."""
    import torch.nn.functional as F

    return (weight * -F.logsigmoid(rewards_chosen - rewards_rejected)).mean()


def trainer_classes():
    """(ScaledBTTrainer, WeightedPreferenceCollator), defined on first use so importing this module
    stays light (no torch, no trl)."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class WeightedPreferenceCollator(DataCollatorForPreference):
        """TRL's preference collator (chosen rows, then rejected rows, right-padded) plus `weight`."""

        def torch_call(self, examples):
            batch = super().torch_call(examples)
            batch["weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float)
            return batch

    class ScaledBTTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:  # keep `weight` when unused columns are removed
                self._signature_columns = ["chosen_ids", "rejected_ids", "weight"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            weight = inputs.pop("weight")
            inputs["use_cache"] = False
            outputs = model(**inputs)
            rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = scaled_bt_loss(rewards_chosen, rewards_rejected, weight.to(rewards_chosen.dtype))
            if self.args.center_rewards_coefficient is not None:
                loss += self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
            with torch.no_grad():
                accuracy = (rewards_chosen > rewards_rejected).float().mean()
                self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
                margin = (rewards_chosen - rewards_rejected).mean()
                self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
            return (loss, outputs) if return_outputs else loss

    return ScaledBTTrainer, WeightedPreferenceCollator


def by_weight(pair: dict) -> str:
    return f"weight_{int(pair['weight'])}"


def build_trainer(cfg):
    """rm's trainer on select/, with ScaledBTTrainer and the weight column."""
    return rm.build_trainer(cfg, SPLIT_DIR, "preference/train", trainer_classes=trainer_classes, keep=("weight",))


def run(cfg) -> dict:
    """rm's run on select/: accuracy on select/validation overall and per weight ("weight_1".."weight_3")."""
    return rm.run(cfg, SPLIT_DIR, TRAINED_ON, group=by_weight, build=build_trainer)
