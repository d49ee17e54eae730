"""Image padding, image preprocessing, image-token tokenization and stopping, checked by hand."""

import base64
from io import BytesIO
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    expand2square,
    get_model_name_from_path,
    load_image_from_base64,
    process_images,
    to_rgb,
    tokenizer_image_token,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND = (10, 20, 30)


def gradient_image(width: int, height: int) -> Image.Image:
    """Every pixel a different colour, so a misplaced paste cannot go unnoticed."""
    image = Image.new("RGB", (width, height))
    for x in range(width):
        for y in range(height):
            image.putpixel((x, y), (100 + x, 150 + y, 200))
    return image


def test_expand2square_tall_image():
    out = expand2square(gradient_image(3, 5), BACKGROUND)
    assert out.size == (5, 5)
    for y in range(5):
        assert out.getpixel((0, y)) == BACKGROUND
        assert out.getpixel((4, y)) == BACKGROUND
        for x in range(1, 4):
            assert out.getpixel((x, y)) == (100 + x - 1, 150 + y, 200)


def test_expand2square_wide_image():
    out = expand2square(gradient_image(5, 3), BACKGROUND)
    assert out.size == (5, 5)
    for x in range(5):
        assert out.getpixel((x, 0)) == BACKGROUND
        assert out.getpixel((x, 4)) == BACKGROUND
        for y in range(1, 4):
            assert out.getpixel((x, y)) == (100 + x, 150 + y - 1, 200)


def test_expand2square_square_is_unchanged():
    image = gradient_image(4, 4)
    assert expand2square(image, BACKGROUND) is image


def test_expand2square_odd_padding_goes_after():
    out = expand2square(gradient_image(4, 1), BACKGROUND)
    assert out.getpixel((0, 0)) == BACKGROUND
    assert out.getpixel((0, 1)) == (100, 150, 200)
    assert out.getpixel((0, 2)) == BACKGROUND


def test_load_image_from_base64_round_trip():
    buffer = BytesIO()
    gradient_image(3, 2).save(buffer, format="PNG")
    image = load_image_from_base64(base64.b64encode(buffer.getvalue()).decode())
    assert image.size == (3, 2)
    assert image.convert("RGB").getpixel((2, 1)) == (102, 151, 200)




def test_process_images_pad_fills_with_truncated_mean(clip_processor):
    wide = Image.new("RGB", (32, 8), (255, 0, 0))
    tall = Image.new("RGB", (4, 16), (0, 0, 255))
    pixels = process_images([wide, tall], clip_processor, SimpleNamespace(image_aspect_ratio="pad"))
    assert isinstance(pixels, torch.Tensor)
    assert pixels.shape == (2, 3, 32, 32)
    background = (122, 116, 104)
    for c in range(3):
        pad = (background[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        red = ((255 if c == 0 else 0) / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        blue = ((255 if c == 2 else 0) / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert pixels[0, c, 0, 0].item() == pytest.approx(pad, abs=1e-5)
        assert pixels[0, c, 16, 16].item() == pytest.approx(red, abs=1e-5)
        assert pixels[1, c, 16, 0].item() == pytest.approx(pad, abs=1e-5)
        assert pixels[1, c, 16, 16].item() == pytest.approx(blue, abs=1e-5)


def test_process_images_without_pad_crops_the_centre(clip_processor):
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    pixels = process_images([wide], clip_processor, SimpleNamespace(image_aspect_ratio="square"))
    assert pixels.shape == (1, 3, 32, 32)
    red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert pixels[0, 0, 0, 0].item() == pytest.approx(red, abs=1e-5)


def test_tokenizer_image_token_matches_chunkwise_ids(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer
    assert tok("a cat").input_ids[0] == tok.bos_token_id == 1
    prompt = "A chat between a user and an assistant. USER: <image>\nWhat color is the cat? ASSISTANT:"
    first, second = prompt.split("<image>")
    expected = [1] + tok(first).input_ids[1:] + [IMAGE_TOKEN_INDEX] + tok(second).input_ids[1:]
    assert tokenizer_image_token(prompt, tok) == expected
    tensor = tokenizer_image_token(prompt, tok, return_tensors="pt")
    assert tensor.dtype == torch.long
    assert tensor.tolist() == expected


def test_tokenizer_image_token_edges(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer
    assert tokenizer_image_token("<image>", tok) == [1, IMAGE_TOKEN_INDEX]
    assert tokenizer_image_token("<image>\ncat", tok) == [1, IMAGE_TOKEN_INDEX] + tok("\ncat").input_ids[1:]
    two = tokenizer_image_token("a<image>b<image>c", tok, image_token_index=-7)
    assert two == [1] + tok("a").input_ids[1:] + [-7] + tok("b").input_ids[1:] + [-7] + tok("c").input_ids[1:]
    assert tokenizer_image_token("no image here", tok) == tok("no image here").input_ids
    with pytest.raises(ValueError):
        tokenizer_image_token("<image>", tok, return_tensors="np")


def test_tokenizer_image_token_without_bos():
    class NoBos:
        bos_token_id = 1

        def __call__(self, text):
            return SimpleNamespace(input_ids=[ord(ch) for ch in text])

    assert tokenizer_image_token("ab<image>c", NoBos()) == [97, 98, IMAGE_TOKEN_INDEX, 99]


@pytest.mark.parametrize(
    "path, name",
    [
        ("checkpoints/llava-v1.5-7b-dora-release", "llava-v1.5-7b-dora-release"),
        ("/abs/path/llava-v1.5-7b/", "llava-v1.5-7b"),
        ("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"),
        ("./checkpoints/llava-dora/checkpoint-500", "llava-dora_checkpoint-500"),
        ("/runs/llava-dora/checkpoint-500/", "llava-dora_checkpoint-500"),
        ("model", "model"),
    ],
)
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name


def test_keywords_stopping_on_eos_keyword(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer
    prompt = torch.tensor([tok("USER: what ASSISTANT:").input_ids] * 2)
    criteria = KeywordsStoppingCriteria(["</s>"], tok, prompt)
    eos = tok.eos_token_id
    answer = tok("a cat").input_ids[1:]
    both = torch.cat([prompt, torch.tensor([answer + [eos], answer + [eos]])], dim=1)
    assert criteria(both, None).tolist() == [True, True]
    one = torch.cat([prompt, torch.tensor([answer + [eos], answer + answer[:1]])], dim=1)
    flags = criteria(one, None)
    assert flags.dtype == torch.bool and flags.tolist() == [True, False]
    assert not bool(flags.all())


def generated_batch(prompt: list[int], *answers: list[int], filler: int) -> torch.Tensor:
    """Prompt + answers, the shorter answers left-filled so the keyword check sees each answer's real end."""
    width = max(len(a) for a in answers)
    return torch.tensor([prompt + [filler] * (width - len(a)) + a for a in answers])


def test_keywords_stopping_on_string_keyword(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer
    prompt = tok("USER: what ASSISTANT:").input_ids
    criteria = KeywordsStoppingCriteria(["###"], tok, torch.tensor([prompt, prompt]))
    filler = tok("red").input_ids[1]
    with_keyword = tok("a cat###").input_ids[1:]
    without = tok("a dog is on the mat").input_ids[1:]
    ids = generated_batch(prompt, with_keyword, without, filler=filler)
    assert criteria(ids, None).tolist() == [True, False]
    ids = generated_batch(prompt, with_keyword, tok("a dog###").input_ids[1:], filler=filler)
    assert criteria(ids, None).tolist() == [True, True]


def test_keywords_stopping_ignores_the_prompt(tiny_llama_tokenizer):
    tok = tiny_llama_tokenizer
    prompt = torch.tensor([tok("USER: stop ### here ASSISTANT:").input_ids])
    criteria = KeywordsStoppingCriteria(["###"], tok, prompt)
    assert criteria(prompt, None).tolist() == [False]
    ids = torch.cat([prompt, torch.tensor([tok("cat").input_ids[1:]])], dim=1)
    assert criteria(ids, None).tolist() == [False]


def test_keywords_stopping_inside_generate(tiny_llama_tokenizer):
    """The criteria plugs into the installed `generate`: it stops right after the keyword is produced."""
    from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteriaList

    tok = tiny_llama_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.unk_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    prompt = torch.tensor([tok("USER: a cat ASSISTANT:").input_ids] * 2)
    start = prompt.shape[1]
    free = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, start:].tolist()
    stop_at = next(
        i
        for i in range(1, len(free))
        if tok.decode(free[i : i + 1]).strip() and tok.decode(free[i : i + 1]).strip() not in tok.decode(free[:i])
    )
    keyword = tok.decode(free[stop_at : stop_at + 1]).strip()
    criteria = KeywordsStoppingCriteria([keyword], tok, prompt)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, stopping_criteria=StoppingCriteriaList([criteria]))
    assert out[:, start:].tolist() == [free[: stop_at + 1]] * 2


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_to_rgb_keeps_transparent_pixels_black_through_the_padded_processor(mode, tmp_path):
    """A square PNG whose transparent background is stored as black: PIL's conversion (the seed's) gives
    black, and transformers 5's processor must not composite it onto white from the palette's
    transparency entry, which PIL's conversion carries over into the RGB image's info."""
    from transformers import CLIPImageProcessor

    square = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    square.paste((255, 0, 0, 255), (8, 8, 24, 24))
    if mode == "P":
        square = square.convert("RGB").convert("P")
        square.save(tmp_path / "square.png", transparency=0)
    else:
        square.save(tmp_path / "square.png")
    with Image.open(tmp_path / "square.png") as opened:
        assert opened.mode == mode
        rgb = to_rgb(opened)
    assert rgb.mode == "RGB" and "transparency" not in rgb.info
    mean, std = list(CLIP_MEAN), list(CLIP_STD)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=mean, image_std=std)
    pixels = process_images([rgb], processor, SimpleNamespace(image_aspect_ratio="pad"))[0]
    black = torch.tensor([(0 - m) / s for m, s in zip(mean, std)])
    torch.testing.assert_close(pixels[:, 0, 0], black, rtol=0, atol=1e-4)
    red = torch.tensor([(1 - mean[0]) / std[0], -mean[1] / std[1], -mean[2] / std[2]])
    torch.testing.assert_close(pixels[:, 16, 16], red, rtol=0, atol=1e-4)
