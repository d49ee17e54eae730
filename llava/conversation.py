"""Conversation templates of LLaVA-1.5.

The prompt strings built here are what the released checkpoints were trained on, so every separator,
space and role name must stay exactly as LLaVA-1.5 wrote them.
"""

from __future__ import annotations

import base64
import dataclasses
from enum import Enum, auto
from io import BytesIO
from typing import Any, Sequence

from llava.constants import DEFAULT_IMAGE_TOKEN


class SeparatorStyle(Enum):
    """How turns are joined into one prompt string."""

    SINGLE = auto()
    TWO = auto()
    MPT = auto()
    PLAIN = auto()
    LLAMA_2 = auto()


def _message_text(message: Any) -> Any:
    """A user turn may be a (text, image, mode) tuple from the web demo; the prompt only uses its text."""
    if isinstance(message, tuple):
        return message[0]
    return message


@dataclasses.dataclass
class Conversation:
    """A conversation history plus the template that renders it as a prompt."""

    system: str
    roles: Sequence[str]
    messages: Sequence[Any]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    skip_next: bool = False

    def _prompt_messages(self) -> list[tuple[str, Any]]:
        """Turns as rendered: when the first turn carries an image tuple, its `<image>` tag leads the text."""
        messages = [(role, message) for role, message in self.messages]
        if messages and isinstance(messages[0][1], tuple):
            role, first = messages[0]
            text = first[0].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if "mmtag" in self.version:
                messages[0] = (role, text)
                messages[0:0] = [(self.roles[0], "<Image><image></Image>"), (self.roles[1], "Received.")]
            else:
                messages[0] = (role, DEFAULT_IMAGE_TOKEN + "\n" + text)
        return [(role, _message_text(message)) for role, message in messages]

    def _llama2_system(self) -> str:
        # An empty system prompt (mistral_instruct) gets no <<SYS>> block, as in later LLaVA releases.
        if not self.system:
            return ""
        return f"<<SYS>>\n{self.system}\n<</SYS>>\n\n"

    def get_prompt(self) -> str:
        """Render the conversation; a turn whose message is None is left open for the model to complete."""
        messages = self._prompt_messages()
        style = self.sep_style
        if style == SeparatorStyle.SINGLE:
            ret = self.system + self.sep
            for role, message in messages:
                ret += f"{role}: {message}{self.sep}" if message else f"{role}:"
        elif style == SeparatorStyle.TWO:
            seps = (self.sep, self.sep2)
            ret = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
        elif style == SeparatorStyle.MPT:
            ret = self.system + self.sep
            for role, message in messages:
                ret += f"{role}{message}{self.sep}" if message else role
        elif style == SeparatorStyle.LLAMA_2:
            ret = ""
            for i, (role, message) in enumerate(messages):
                if i == 0:
                    if not message:
                        raise ValueError("the first message of a LLAMA_2 conversation must not be empty")
                    if role != self.roles[0]:
                        raise ValueError("the first message of a LLAMA_2 conversation must come from the user")
                if not message:
                    continue
                if i == 0:
                    message = self._llama2_system() + message
                if i % 2 == 0:
                    ret += f"{self.sep}[INST] {message} [/INST]"
                else:
                    ret += f" {message} {self.sep2}"
            ret = ret.removeprefix(self.sep)
        elif style == SeparatorStyle.PLAIN:
            # The plain template has no sep2; the original would fail on a filled answer, we reuse sep.
            seps = (self.sep, self.sep if self.sep2 is None else self.sep2)
            ret = self.system
            for i, (_, message) in enumerate(messages):
                if message:
                    ret += message + seps[i % 2]
        else:
            raise ValueError(f"Invalid style: {self.sep_style}")
        return ret

    def append_message(self, role: str, message: Any) -> None:
        """Add a turn; message None marks the turn the model should generate."""
        self.messages.append([role, message])

    def get_images(self, return_pil: bool = False) -> list[Any]:
        """Images attached to user turns as (text, image, mode) tuples, as PIL images or base64 PNG strings."""
        from llava.mm_utils import expand2square

        images = []
        for i, (_, message) in enumerate(self.messages[self.offset:]):
            if i % 2 != 0 or not isinstance(message, tuple):
                continue
            _, image, mode = message
            if mode == "Pad":
                image = expand2square(image, (122, 116, 104))
            elif mode == "Resize":
                image = image.resize((336, 336))
            elif mode not in ("Default", "Crop"):
                raise ValueError(f"Invalid image_process_mode: {mode}")
            if return_pil:
                images.append(image)
            else:
                buffered = BytesIO()
                image.save(buffered, format="PNG")
                images.append(base64.b64encode(buffered.getvalue()).decode())
        return images

    def copy(self) -> Conversation:
        """A fresh conversation with the same template; templates are shared module globals, never mutate them."""
        return Conversation(
            system=self.system,
            roles=self.roles,
            messages=[[role, message] for role, message in self.messages],
            offset=self.offset,
            sep_style=self.sep_style,
            sep=self.sep,
            sep2=self.sep2,
            version=self.version,
        )

    def dict(self) -> dict[str, Any]:
        """A JSON-friendly view: image tuples are reduced to their text."""
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, _message_text(message)] for role, message in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

conv_vicuna_v0 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("Human", "Assistant"),
    messages=(
        ("Human", "Which planet in the solar system is the largest?"),
        ("Assistant", "Jupiter is the largest planet in the solar system, more than eleven times as wide as Earth."),
    ),
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_vicuna_v1 = Conversation(
    system=_USER_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llama_2 = Conversation(
    system=_LLAMA_2_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)

conv_mpt = Conversation(
    system="<|im_start|>system\n"
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

conv_llava_v0 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_llava_v0_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)

conv_llava_v1 = Conversation(
    system=_HUMAN_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_v1_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("USER", "ASSISTANT"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)

default_conversation = conv_vicuna_v1
conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}
