"""The demo's contrastive pretraining of the tiny vision tower: the loss by hand, learning on a few
steps, and a saved tower that the rest of the pipeline loads as before."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from llava.demo import synthetic
from llava.demo.pretrain_clip import contrastive_loss, pretrain_vision_tower


def test_contrastive_loss_by_hand_and_equal_captions_count_as_matches():
    unit = torch.eye(2)
    # Logits [[1, 0], [0, 1]]: each row's own pair has probability e / (e + 1).
    own = -math.log(math.e / (math.e + 1))
    assert contrastive_loss(unit, unit, torch.tensor(1.0), torch.tensor([0, 1])).item() == pytest.approx(own)
    # Two copies of one caption: both columns are right, each with target 1/2.
    other = -math.log(1 / (math.e + 1))
    shared = contrastive_loss(unit, unit, torch.tensor(1.0), torch.tensor([5, 5])).item()
    assert shared == pytest.approx(0.5 * own + 0.5 * other)


@pytest.fixture
def caption_pairs(tmp_path):
    """120 images of four centred shapes, captioned as the demo captions them."""
    rng = random.Random(0)
    kinds = [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("cross", "black")]
    pairs = []
    for index in range(120):
        shape, colour = kinds[index % 4]
        size = rng.randint(40, 46)
        x, y = synthetic._near_centre(rng, size, size)
        scene = synthetic.Scene("centred", (synthetic.Blob(shape, colour, "middle", (x, y, x + size, y + size)),))
        name = f"images/{index:04d}.jpg"
        synthetic.save_image(scene, tmp_path / name)
        pairs.append({"image": name, "caption": synthetic.caption(scene)})
    (tmp_path / "captions.json").write_text(json.dumps(pairs))
    return tmp_path


def test_pretraining_matches_images_to_captions_and_saves_a_loadable_tower(tiny_base, caption_pairs, tmp_path):
    from types import SimpleNamespace

    from transformers import CLIPVisionModel

    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    tower = tmp_path / "clip"
    shutil.copytree(tiny_base.vision_tower, tower)
    before = CLIPVisionModel.from_pretrained(str(tower)).state_dict()
    losses, held_out = pretrain_vision_tower(tower, tiny_base.language_model, caption_pairs / "captions.json",
                                             caption_pairs, steps=40, batch_size=32, lr=3e-3, log_every=10)
    assert len(losses) == 40
    # From about log(32) (every caption alike) towards log(8), where 8 copies of each caption share a batch.
    assert sum(losses[:5]) / 5 == pytest.approx(math.log(32), abs=0.2)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    # 12 held-out images, 4 captions: chance is 1 in 4.
    assert held_out >= 0.75

    after = CLIPVisionModel.from_pretrained(str(tower))
    assert any(not torch.equal(before[k], v) for k, v in after.state_dict().items())
    loaded = CLIPVisionTower(str(tower), SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch"))
    pixels = loaded.image_processor(images=[synthetic.render(synthetic.no_scene(random.Random(0)))],
                                    return_tensors="pt")["pixel_values"]
    assert loaded(pixels).shape == (1, (after.config.image_size // after.config.patch_size) ** 2, after.config.hidden_size)
