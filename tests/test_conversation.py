"""Prompt strings of the conversation templates, checked against strings written out by hand."""

import pytest

from llava import conversation as conversation_lib
from llava.conversation import Conversation, SeparatorStyle, conv_templates

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def build(name: str, *turns: str | None) -> Conversation:
    conv = conv_templates[name].copy()
    for i, message in enumerate(turns):
        conv.append_message(conv.roles[i % 2], message)
    return conv


def test_vicuna_v1_open_question():
    conv = build("vicuna_v1", "<image>\nWhat is shown?", None)
    assert conv.get_prompt() == VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT:"


def test_vicuna_v1_answered():
    conv = build("vicuna_v1", "<image>\nQ", "A")
    assert conv.get_prompt() == VICUNA_SYSTEM + " USER: <image>\nQ ASSISTANT: A</s>"


def test_vicuna_v1_two_turns():
    conv = build("vicuna_v1", "<image>\nQ1", "A1", "Q2", "A2")
    expected = VICUNA_SYSTEM + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>"
    assert conv.get_prompt() == expected
    conv = build("vicuna_v1", "<image>\nQ1", "A1", "Q2", None)
    assert conv.get_prompt() == VICUNA_SYSTEM + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"


def test_v1_alias_and_default():
    assert conv_templates["v1"] is conv_templates["vicuna_v1"]
    assert conversation_lib.default_conversation is conv_templates["vicuna_v1"]
    conv = conv_templates["v1"]
    assert conv.roles == ("USER", "ASSISTANT")
    assert (conv.sep_style, conv.sep, conv.sep2, conv.version) == (SeparatorStyle.TWO, " ", "</s>", "v1")


def test_llava_v1():
    conv = build("llava_v1", "<image>\nQ1", "A1", "Q2", None)
    assert conv.get_prompt() == LLAVA_V1_SYSTEM + " USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"


def test_plain():
    conv = build("plain", "<image>", "a red square")
    assert conv.get_prompt() == "<image>\na red square\n"
    conv = build("plain", "<image>", None)
    assert conv.get_prompt() == "<image>\n"


def test_llama_2_two_turns():
    system = conv_templates["llama_2"].system
    conv = build("llama_2", "Q1", "A1", "Q2", None)
    expected = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
    assert conv.get_prompt() == expected
    conv = build("llama_2", "Q1", "A1")
    assert conv.get_prompt() == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\nQ1 [/INST] A1 </s>"


def test_llava_llama_2_system():
    conv = build("llava_llama_2", "<image>\nQ", None)
    assert conv.get_prompt() == (
        "[INST] <<SYS>>\nYou are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language."
        "\n<</SYS>>\n\n<image>\nQ [/INST]"
    )


def test_llama_2_rejects_empty_first_message():
    conv = build("llama_2", None)
    with pytest.raises(ValueError):
        conv.get_prompt()


def test_mistral_instruct_has_no_system_block():
    conv = build("mistral_instruct", "Q1", "A1", "Q2", None)
    assert conv.get_prompt() == "[INST] Q1 [/INST] A1 </s>[INST] Q2 [/INST]"


def test_llava_v0_single_style():
    conv = build("llava_v0", "Q", "A", "Q2", None)
    expected = LLAVA_V1_SYSTEM + "###Human: Q###Assistant: A###Human: Q2###Assistant:"
    assert conv.get_prompt() == expected


def test_mpt():
    conv = build("mpt", "Q", None)
    assert conv.get_prompt() == (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.<|im_end|><|im_start|>user\nQ<|im_end|><|im_start|>assistant\n"
    )


def test_image_tuple_first_message_moves_tag_to_front():
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message("USER", ("What is this?\n<image>", object(), "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == VICUNA_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT:"
    assert conv.dict()["messages"] == [["USER", "What is this?\n<image>"], ["ASSISTANT", None]]


def test_image_tuple_mmtag():
    conv = conv_templates["v1_mmtag"].copy()
    conv.append_message("USER", ("<image>\nQ", object(), "Default"))
    conv.append_message("ASSISTANT", None)
    expected = conv.system + " USER: <Image><image></Image> ASSISTANT: Received.</s>USER: Q ASSISTANT:"
    assert conv.get_prompt() == expected


def test_copy_does_not_touch_template():
    conv = build("vicuna_v1", "Q", "A")
    assert len(conv.messages) == 2
    assert len(conv_templates["vicuna_v1"].messages) == 0
    clone = conv.copy()
    clone.messages[-1][-1] = "B"
    assert conv.messages[-1][-1] == "A"


def test_get_images_pad_mode():
    from PIL import Image

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message("USER", ("<image>\nQ", Image.new("RGB", (4, 2), (255, 0, 0)), "Pad"))
    conv.append_message("ASSISTANT", None)
    (image,) = conv.get_images(return_pil=True)
    assert image.size == (4, 4)
    assert image.getpixel((0, 0)) == (122, 116, 104)
    assert image.getpixel((0, 1)) == (255, 0, 0)
    assert isinstance(conv.get_images()[0], str)
