"""Attention paths for packed SFT rows (recipes.training.attention_implementation, train.packed_attention):
the same loss and gradients on every path, and no attention across the documents of a packed row.

A packed row from SFTTrainer's own packing (best-fit decreasing, position_ids restarting per document, no
attention mask) goes through the tiny model on each attention implementation transformers offers here: eager
and sdpa (a dense block-diagonal mask built from the position_ids) train on CPU; flex_attention (a document
block mask: the path train.packed_attention=auto takes on CUDA) runs forward on CPU, and backward only on a
GPU (torch 2.13 has no FlexAttention backward on CPU), so its gradients are compared where one is present
(benchmarks/gpu_checks.sh runs the rest). The reference is each document run alone, unpacked."""
from __future__ import annotations

import pytest
import torch

from recipes import sft, training
from recipes.config import ConfigError, compose

PATHS = ["eager", "sdpa", "flex_attention"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # (every path and the reference on one device)


@pytest.fixture(scope="module")
def packed(edit_data_dir, tmp_path_factory):
    """(a packed batch of the sft trainer, its documents' [start, end) spans, the model's weights)."""
    cfg = compose("sft", [f"run_dir={tmp_path_factory.mktemp('attn')}", f"data={edit_data_dir}", "train.packing=true",
                          "train.micro_batch=4", "train.packed_attention=sdpa"])
    trainer = sft.build_trainer(cfg)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    spans = list(zip(starts[:-1], starts[1:]))
    assert len(spans) >= 3, "expected several documents in one packed row"
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    batch = {k: batch[k].to(DEVICE) for k in ("input_ids", "position_ids", "labels")}  # (the collator also counts tokens)
    return batch, spans, state, trainer.model.config


def model_on(path: str, config, state):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    model.set_attn_implementation(path)
    assert model.config._attn_implementation == path
    return model.to(DEVICE).train()


def backward_runs_here(path: str) -> bool:
    return path != "flex_attention" or torch.cuda.is_available()


def reference(config, state, batch, spans):
    """Each document alone (sdpa, causal, no mask needed): summed token losses / label count, the gradients
    of that loss, and each document's logits."""
    model = model_on("sdpa", config, state)
    labels = batch["labels"][0]
    count = int((labels[1:] != -100).sum())  # shifted: the label of each next token
    total, logits = 0.0, []
    for begin, end in spans:
        out = model(input_ids=batch["input_ids"][:, begin:end])
        logits.append(out.logits.detach())
        doc_labels = labels[begin:end]
        token_losses = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), doc_labels[1:], ignore_index=-100,
                                                         reduction="sum")
        total = total + token_losses
    loss = total / count
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, logits


@pytest.mark.parametrize("path", PATHS)
def test_packed_row_equals_its_documents_alone_on_every_attention_path(path, packed):
    batch, spans, state, config = packed
    ref_loss, ref_grads, ref_logits = reference(config, state, batch, spans)
    model = model_on(path, config, state)
    trains = backward_runs_here(path)
    with torch.set_grad_enabled(trains):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
    # no attention across documents: each document's logits in the packed row are its logits alone
    for (begin, end), alone in zip(spans, ref_logits):
        torch.testing.assert_close(out.logits[:, begin:end].detach(), alone, atol=2e-5, rtol=1e-4)
    # the same loss (the first token of each document has no label: no loss across a boundary)
    torch.testing.assert_close(out.loss.detach(), ref_loss, atol=1e-5, rtol=1e-5)
    if not trains:
        return
    out.loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_the_attention_the_trainer_gets_and_what_is_refused(edit_data_dir, tmp_path):
    """train.packed_attention reaches the model the trainer trains; auto takes flex_attention only on CUDA;
    a path or kernel that cannot train here is a one-line ConfigError before anything is loaded."""
    args = [f"run_dir={tmp_path}", f"data={edit_data_dir}"]
    cuda = torch.cuda.is_available()
    auto = compose("sft", args + ["train.packing=true"])
    assert training.attention_implementation(auto) == ("flex_attention" if cuda else "sdpa")
    assert training.attention_implementation(compose("sft", args + ["train.packed_attention=eager"])) == "sdpa"  # unpacked
    eager = compose("sft", args + ["train.packing=true", "train.packed_attention=eager"])
    trainer = sft.build_trainer(eager)
    assert trainer.model.config._attn_implementation == "eager"
    assert trainer.args.use_liger_kernel is training.liger_enabled(eager) and trainer.args.torch_compile is False
    assert compose("sft", args + ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match="train.packed_attention=paged: not auto or one of"):
        training.check_kernels(compose("sft", args + ["train.packed_attention=paged"]))
    if not cuda:
        with pytest.raises(ConfigError, match="FlexAttention has no backward on CPU"):
            training.check_kernels(compose("sft", args + ["train.packing=true", "train.packed_attention=flex_attention"]))
        with pytest.raises(ConfigError, match="train.liger=true: Liger's kernels are Triton kernels and need a CUDA GPU"):
            training.check_kernels(compose("sft", args + ["train.liger=true"]))
        assert training.liger_enabled(compose("sft", args)) is False  # null: off without CUDA
