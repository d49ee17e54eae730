"""The demo's language-model pretraining: what is learned from each document, and whole-document batches."""

from __future__ import annotations

import json

import torch

from llava.constants import IGNORE_INDEX
from llava.demo.pretrain_lm import document_batches, documents, pretrain_language_model

CHATS = [
    {"id": "a", "conversations": [{"from": "human", "value": "The image shows a red circle.\nWhat color is it?"},
                                  {"from": "gpt", "value": "red"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Is there a dog?"}, {"from": "gpt", "value": "No"},
                                  {"from": "human", "value": "How many cats?"}, {"from": "gpt", "value": "2"}]},
]


def test_plain_texts_learn_every_token_and_chats_only_their_answers(tiny_llama_tokenizer, tmp_path):
    tok = tiny_llama_tokenizer
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(CHATS))
    docs = documents(tok, ["The cat is on the table."], path, "vicuna_v1")
    assert len(docs) == 3
    ids, labels = docs[0]
    assert ids == labels and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    for (ids, labels), answers in zip(docs[1:], (["red"], ["No", "2"])):
        assert len(ids) == len(labels)
        learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        assert learned == [label for label in labels if label != IGNORE_INDEX]
        # The learned tokens are exactly each answer and its closing EOS, as instruction tuning masks them.
        pieces = tok.decode(learned).split(tok.eos_token)
        assert [p.strip() for p in pieces if p.strip()] == answers
        assert learned.count(tok.eos_token_id) == len(answers)
        prompt = tok.decode(ids)
        assert prompt.startswith(tok.bos_token) and "A chat between" in prompt and "ASSISTANT:" in prompt


def test_batches_hold_whole_documents_padded_and_never_learned():
    docs = [([1, 5, 6, 2], [1, 5, 6, 2]), ([1, 7, 2], [IGNORE_INDEX, IGNORE_INDEX, 2]), ([1, 8, 9, 10, 11, 2], [1, 8, 9, 10, 11, 2])]
    batches = document_batches(docs, batch_size=4, pad_id=0, generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        ids, labels = next(batches)
        assert ids.shape == labels.shape and ids.shape[0] == 4
        for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
            doc = next(d for d in docs if row_ids[: len(d[0])] == d[0])  # each row starts with one whole document
            assert row_ids[len(doc[0]):] == [0] * (len(row_ids) - len(doc[0]))
            assert row_labels == doc[1] + [IGNORE_INDEX] * (len(row_ids) - len(doc[0]))


def test_length_grouped_batches_hold_the_same_whole_documents_with_less_padding():
    docs = [([1] + [5] * n + [2], [1] + [5] * n + [2]) for n in range(1, 200, 3)]
    lengths = sorted(len(ids) for ids, _ in docs)

    def padding(group: int) -> tuple[float, int]:
        batches = document_batches(docs, batch_size=8, pad_id=0, generator=torch.Generator().manual_seed(1), group=group)
        real = total = 0
        for _ in range(64):
            ids, labels = next(batches)
            for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
                n = len(row_ids) - row_ids[::-1].index(2)  # whole document up to its EOS, then padding
                assert n in lengths and row_ids[n:] == [0] * (len(row_ids) - n)
                assert row_labels[:n] == row_ids[:n] and set(row_labels[n:]) <= {IGNORE_INDEX}
                real += n
            total += ids.numel()
        return real / total, ids.shape[0]

    plain, grouped = padding(1), padding(8)
    assert plain[1] == grouped[1] == 8
    # Lengths spread evenly from 3 to 201: a random batch of 8 is mostly padding, a sorted one hardly.
    assert grouped[0] > 0.85 and plain[0] < 0.7


def _sentence_loss(model_dir, text: str) -> float:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(str(model_dir))(input_ids=ids, labels=ids).loss.item()


def test_pretraining_learns_the_text_and_saves_the_model(tiny_base, tmp_path):
    import shutil

    model_dir = tmp_path / "lm"
    shutil.copytree(tiny_base.language_model, model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the red circle is on the left.\nthe blue square is on the right.\n" * 20)
    chats = tmp_path / "chats.json"
    chats.write_text(json.dumps(CHATS * 10))
    before = _sentence_loss(model_dir, "the red circle is on the left.")
    probed = []
    losses = pretrain_language_model(model_dir, corpus, chats, steps=60, batch_size=8, lr=3e-3,
                                     probe=lambda model, step: probed.append((step, model.training)), probe_every=25)
    assert len(losses) == 60
    assert probed == [(25, False), (50, False)]  # called in eval mode at every 25th step
    assert _sentence_loss(model_dir, "the red circle is on the left.") < 0.5 * before


def test_the_demo_language_model_starts_with_weights_spread_for_its_width(tmp_path):
    """LLaMA's initializer_range 0.02 is meant for widths in the thousands; the demo's 128-wide model
    starts wider, as set in its sizes, and every matrix of the saved model shows that spread."""
    from transformers import LlamaForCausalLM

    from llava.demo.run import DemoConfig
    from llava.tiny_base import TinySizes, build_tiny_base, tiny_sentences

    sizes = TinySizes(**DemoConfig().sizes)
    assert sizes.lm_init_std > 0.02
    base = build_tiny_base(tmp_path, tiny_sentences(200), sizes)
    model = LlamaForCausalLM.from_pretrained(str(base.language_model))
    assert model.config.initializer_range == sizes.lm_init_std
    matrices = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    assert len(matrices) == 2 + 7 * sizes.num_layers  # embeddings, lm_head, q k v o gate up down per layer
    for name, weight in matrices.items():
        assert abs(weight.std().item() / sizes.lm_init_std - 1) < 0.05, name
