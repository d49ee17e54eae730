"""The training loss and gradient as the seed weighted them, against values computed by hand.

A tiny LLaVA decoder takes one SGD step (learning rate 1, no clipping) over two micro-batches
(gradient accumulation 2) whose numbers of supervised tokens differ (1 and 9, or 1 and 0). The
expected loss is computed here in float64 from the model's logits, with the two weightings written
out: the seed's mean of per-micro-batch token means, and transformers 5's mean over all supervised
tokens of the step. The logged loss must equal it, and the parameter update must equal minus its
gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llava.constants import IGNORE_INDEX
from llava.model import LlavaConfig, LlavaLlamaForCausalLM

SEQ_LEN = 12
VOCAB = 32


def tiny_model() -> LlavaLlamaForCausalLM:
    torch.manual_seed(0)
    config = LlavaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
        initializer_range=0.5,  # logits far apart, so that easy and hard tokens differ by several nats
    )  # fmt: skip
    config._attn_implementation = "eager"
    return LlavaLlamaForCausalLM(config)


def samples(model: LlavaLlamaForCausalLM, supervised: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Two sequences; the first supervises its last ``supervised[0]`` tokens with labels the model finds
    hardest, the second its last ``supervised[1]`` with the easiest: the weightings then differ widely."""
    g = torch.Generator().manual_seed(1)
    out = []
    for count, pick in zip(supervised, (torch.argmin, torch.argmax)):
        ids = torch.randint(0, VOCAB, (SEQ_LEN,), generator=g)
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0]
        labels = torch.full((SEQ_LEN,), IGNORE_INDEX)
        for t in range(SEQ_LEN - count, SEQ_LEN):
            labels[t] = pick(logits[t - 1])  # position t is predicted from the logits at t - 1
        out.append({"input_ids": ids, "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": labels})
    return out


def token_losses(model: torch.nn.Module, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each supervised token, from float64 logits."""
    logits = model(input_ids=sample["input_ids"][None]).logits[0].double()
    positions = [t for t in range(1, SEQ_LEN) if sample["labels"][t] != IGNORE_INDEX]
    rows = logits[[t - 1 for t in positions]]
    targets = sample["labels"][positions]
    return torch.logsumexp(rows, dim=-1) - rows.gather(1, targets[:, None]).squeeze(1)


def hand_loss(model: torch.nn.Module, batch: list[dict[str, torch.Tensor]], weighting: str) -> torch.Tensor:
    per_sample = [token_losses(model, s) for s in batch]
    if weighting == "token":
        return torch.cat(per_sample).sum() / sum(len(x) for x in per_sample)
    # The seed's: each micro-batch's mean (zero without supervised tokens), then their mean.
    means = [x.mean() if len(x) else torch.zeros((), dtype=torch.float64) for x in per_sample]
    return sum(means) / len(means)


def expected(model: LlavaLlamaForCausalLM, batch, weighting: str) -> tuple[float, dict[str, torch.Tensor]]:
    reference = copy.deepcopy(model).double()
    loss = hand_loss(reference, batch, weighting)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in reference.named_parameters()}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def one_sgd_step(model, batch, weighting: str, out_dir) -> tuple[float, dict[str, torch.Tensor]]:
    """Train one step (two micro-batches of one sample); returns the logged loss and the update."""
    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.train import TrainingArguments

    args = TrainingArguments(
        output_dir=str(out_dir), use_cpu=True, loss_weighting=weighting, optim="sgd", learning_rate=1.0,
        lr_scheduler_type="constant", max_steps=1, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = LLaVATrainer(model=model, args=args, train_dataset=ListDataset(batch))
    trainer.train()
    logged = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return logged, {n: before[n] - p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("supervised", [(1, 9), (1, 0)], ids=["1_and_9_tokens", "1_and_0_tokens"])
@pytest.mark.parametrize("weighting", ["micro_batch", "token"])
def test_logged_loss_and_update_follow_the_weighting(tmp_path, weighting: str, supervised: tuple[int, int]) -> None:
    model = tiny_model()
    batch = samples(model, supervised)
    loss, grads = expected(model, batch, weighting)
    other_loss, _ = expected(model, batch, "token" if weighting == "micro_batch" else "micro_batch")
    # The two weightings must be told apart far beyond the tolerance below.
    assert abs(loss - other_loss) > 0.2, (loss, other_loss)

    logged, update = one_sgd_step(model, batch, weighting, tmp_path)
    assert logged == pytest.approx(loss, rel=1e-5)
    scale = max(g.abs().max().item() for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(update[name].double(), grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_a_batch_without_supervised_tokens_gives_zero_loss_not_nan() -> None:
    model = tiny_model()
    sample = samples(model, (0, 0))[0]
    out = model(input_ids=sample["input_ids"][None], labels=sample["labels"][None])
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_unknown_loss_weighting_is_refused(tmp_path) -> None:
    from llava.train.train import TrainingArguments

    with pytest.raises(ValueError, match="--loss_weighting must be one of"):
        TrainingArguments(output_dir=str(tmp_path), use_cpu=True, loss_weighting="sequence", report_to=[])
