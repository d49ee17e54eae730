"""Training entry used by ``Dora_7b.sh``: flash-attention 2 when it is installed on a GPU, SDPA otherwise."""

import importlib.util

import torch

from llava.train.train import train


def attention_implementation() -> str:
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


if __name__ == "__main__":
    train(attn_implementation=attention_implementation())
