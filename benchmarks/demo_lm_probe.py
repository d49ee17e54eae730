"""Ask the demo's pretrained language model alone the benchmarks' questions, the scene in words.

    .venv/bin/python benchmarks/demo_lm_probe.py checkpoints/demo checkpoints/demo-seed1 checkpoints/demo-seed2

For each study folder, the language model of its base (``base/vicuna-tiny``) answers greedily, in the
conversation template, held-out chats of every benchmark where the image is replaced by its
description ("The image shows two red circles at the top left and bottom right."), and a row of
right answers out of ``--questions`` per benchmark is printed. This is what the model can do from
text before instruction tuning teaches it to look; ScienceQA, MMBench and POPE in the study follow
these scores. The questions come from a random stream of their own, so they are the same for every
folder and unseen in pretraining.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from llava.conversation import conv_templates
from llava.demo import synthetic

PROBE_SEED = 999


def probe_questions(benchmark: str, n: int) -> list[tuple[str, str]]:
    """(human turn with the scene in words, expected answer) for n held-out questions."""
    drawn = synthetic.draw_questions(synthetic.stream(PROBE_SEED, "probe", benchmark), benchmark, n)
    return [(synthetic.training_prompt(benchmark, question).replace(
                synthetic.IMAGE_TAG, synthetic.describe(scene) if question.image else "", 1),
             synthetic.training_answer(question)) for _, scene, question in drawn]  # fmt: skip


@torch.no_grad()
def right_answers(tokenizer, model: LlamaForCausalLM, questions: list[tuple[str, str]],
                  conv_mode: str = "vicuna_v1") -> int:
    right = 0
    for prompt, answer in questions:
        conv = conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], prompt)
        conv.append_message(conv.roles[1], None)
        ids = tokenizer(conv.get_prompt(), return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        said = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        right += said.lower().startswith(answer.lower())
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", type=Path, nargs="+", help="demo output folders (each holds base/vicuna-tiny)")
    parser.add_argument("--questions", type=int, default=40, help="questions per benchmark (default 40)")
    args = parser.parse_args()
    questions = {b: probe_questions(b, args.questions) for b in synthetic.BENCHMARKS}
    print("| study | " + " | ".join(synthetic.BENCHMARKS) + " |")
    print("|---" * (len(synthetic.BENCHMARKS) + 1) + "|")
    for study in args.studies:
        model_dir = study / "base" / "vicuna-tiny"
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
        cells = [f"{right_answers(tokenizer, model, questions[b])}/{args.questions}" for b in synthetic.BENCHMARKS]
        print(f"| {study} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
