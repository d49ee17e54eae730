"""Ask a LLaVA model one question about one or more images and print the answer.

    python -m llava.eval.run_llava --model-path MODEL --image-file photo.jpg --query "What is shown?"

Several images: ``--image-file a.jpg,b.jpg`` and one ``<image-placeholder>`` in the query where each
image goes. Without placeholders the image tag goes in front of the query (one image).
"""

from __future__ import annotations

import argparse
import logging
import os
import re

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER
from llava.eval import cli
from llava.eval import generation as gen

logger = logging.getLogger(__name__)


def infer_conv_mode(model_name: str) -> str:
    """The template the seed picked from the model's name."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


def choose_conv_mode(requested: str | None, model_name: str) -> str:
    inferred = infer_conv_mode(model_name)
    if requested is not None and requested != inferred:
        logger.warning("The model name suggests the %s template; using --conv-mode %s", inferred, requested)
        return requested
    return inferred


def user_message(query: str, use_im_start_end: bool) -> str:
    """The query with image tags: at each placeholder, else one in front (the seed's rules)."""
    tag = DEFAULT_IMAGE_TOKEN
    if use_im_start_end:
        tag = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    if IMAGE_PLACEHOLDER in query:
        return re.sub(re.escape(IMAGE_PLACEHOLDER), tag, query)
    return tag + "\n" + query


def image_files(image_file: str, sep: str) -> list[str]:
    """Local image paths; URLs are refused (this runs offline) and missing files are named."""
    paths = [p for p in image_file.split(sep) if p]
    urls = [p for p in paths if p.startswith(("http://", "https://"))]
    if urls:
        raise ValueError(f"Cannot fetch {urls[0]}: images are read from local files only; download it, pass its path.")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"Image file(s) not found: {', '.join(missing)}")
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_arguments(parser, conv_mode=None)
    parser.add_argument("--image-file", type=str, required=True)
    parser.add_argument("--query", type=str, required=True)
    parser.add_argument("--sep", type=str, default=",")
    cli.add_generation_arguments(parser, max_new_tokens=512, batch_size=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    cli.configure_logging()
    args = parse_args(argv)
    paths = image_files(args.image_file, args.sep)
    loaded = cli.load_model(args)
    conv_mode = choose_conv_mode(args.conv_mode, loaded.name)
    message = user_message(args.query, getattr(loaded.model.config, "mm_use_im_start_end", False))
    if message.count(DEFAULT_IMAGE_TOKEN) != len(paths):
        raise ValueError(
            f"{len(paths)} image(s) given but the query takes {message.count(DEFAULT_IMAGE_TOKEN)}: "
            f"put one {IMAGE_PLACEHOLDER} in --query where each image goes."
        )
    request = gen.Request(
        question_id=0,
        prompt=gen.templated_prompt(conv_mode, message),
        recorded_prompt=args.query,
        images=[gen.open_rgb(p) for p in paths],
    )
    settings = cli.settings_from_args(args, gen.stop_str_for(conv_mode))
    generator = gen.Generator(loaded.model, loaded.tokenizer, loaded.image_processor, settings, batch_size=1)
    answer = next(generator.answer([request]))[1]
    print(answer)
    return answer


if __name__ == "__main__":
    main()
