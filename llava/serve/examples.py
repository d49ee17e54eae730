"""Example images and questions for the web demo, taken from benchmark question files.

Any folder laid out as ``playground/data/eval`` (README.md, "Evaluation data") will do; the demo writes
one under ``playground/data/demo/eval``. The questions keep their benchmark instruction ("Answer the
question using a single word or phrase."), so an example asks what the benchmark asked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from llava.demo.run import DemoConfig

logger = logging.getLogger(__name__)

# Where the demo writes its evaluation data (seed 0).
DEMO_EVAL = DemoConfig.data_dir / "eval"

# (benchmark, question file, image folder) relative to the evaluation folder: the JSONL benchmarks.
BENCHMARKS = (
    ("VQAv2", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015"),
    ("GQA", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images"),
    ("VizWiz", "vizwiz/llava_test.jsonl", "vizwiz/test"),
    ("TextVQA", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images"),
    ("POPE", "pope/llava_pope_test.jsonl", "pope/val2014"),
)


@dataclass(frozen=True)
class Example:
    benchmark: str
    image: Path
    question: str


def benchmark_examples(eval_dir: Path, per_benchmark: int = 1) -> list[Example]:
    """The first ``per_benchmark`` questions of each benchmark present under ``eval_dir`` whose image exists."""
    examples = []
    for benchmark, question_file, image_folder in BENCHMARKS:
        path = Path(eval_dir) / question_file
        if not path.is_file():
            continue
        found = 0
        with path.open() as lines:
            for line in lines:
                if found == per_benchmark:
                    break
                if not line.strip():
                    continue
                question = json.loads(line)
                image = Path(eval_dir) / image_folder / question["image"]
                if image.is_file():
                    examples.append(Example(benchmark, image, question["text"]))
                    found += 1
    if not examples:
        logger.warning("No benchmark questions with images under %s: the page shows no examples", eval_dir)
    return examples
