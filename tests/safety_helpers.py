"""A tiny random ViT image classifier with the classes `normal` and `nsfw`, saved with
save_pretrained in the real folder layout (config.json, preprocessor_config.json,
model.safetensors), whose answer is fixed: its classifier ignores the image (zero weights) and
its bias sets the NSFW probability."""

from __future__ import annotations

import math
from pathlib import Path

CERTAIN = 0.99999  # "answers with certainty": a bias difference of ~11.5


def write_tiny_classifier(folder: Path, *, nsfw_probability: float) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    torch.manual_seed(0)
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        logit = math.log(nsfw_probability / (1 - nsfw_probability))
        model.classifier.bias.copy_(torch.tensor([0.0, logit]))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def nsfw_classifier(folder: Path) -> Path:
    return write_tiny_classifier(folder, nsfw_probability=CERTAIN)


def normal_classifier(folder: Path) -> Path:
    return write_tiny_classifier(folder, nsfw_probability=1 - CERTAIN)
