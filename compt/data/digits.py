"""The built-in dataset: scikit-learn's bundled handwritten digits as image-text pairs.

Real data with no download, so a chain can be trained and zero-shot evaluated anywhere.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from compt.data.config import DataConfig
from compt.data.dataset import Example, ImageTextDataset

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Every caption names the class word, so text and zero-shot prompts share vocabulary.
CAPTIONS = [
    "a photo of the number {word}.",
    "a handwritten {word}.",
    "the digit {word} ({digit}) written by hand.",
    "an image of a handwritten number {word}.",
    "a small blurry {word}.",
    "the number {word}, drawn by hand.",
]

ZERO_SHOT_TEMPLATES = [
    "a photo of the number {}.",
    "a handwritten {}.",
    "an image of a handwritten number {}.",
    "the digit {}.",
]


class DigitsDataset(ImageTextDataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray, caption_ids: np.ndarray,
                 render_size: int, templates: list[str] | None):
        super().__init__(WORDS, templates or ZERO_SHOT_TEMPLATES)
        self.pixels, self.labels, self.caption_ids = pixels, labels, caption_ids
        self.render_size = render_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Example:
        # Rendered on access: the 8x8 arrays stay tiny when copied to loader workers.
        small = Image.fromarray(self.pixels[index])  # uint8 2-D -> mode "L"
        image = small.resize((self.render_size,) * 2, Image.Resampling.BICUBIC).convert("RGB")
        label = int(self.labels[index])
        caption = CAPTIONS[self.caption_ids[index]].format(word=WORDS[label], digit=label)
        return Example(image, caption, label)


def build_digits(cfg: DataConfig, split: str) -> DigitsDataset:
    digits = load_digits()
    # 0..16 ink density -> 0..255: a white digit on a black background.
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    # One caption per sample, fixed by the seed, so no result depends on process count.
    caption_ids = np.random.RandomState(cfg.split_seed).randint(len(CAPTIONS), size=len(labels))
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.val_fraction,
        random_state=cfg.split_seed, stratify=labels,
    )
    idx = np.sort(train_idx if split == "train" else val_idx)
    if split != "train":
        # One caption per class on validation: each distinct caption then names exactly one
        # class, so image<->text retrieval measures something a model can learn.
        caption_ids = np.zeros_like(caption_ids)
    return DigitsDataset(pixels[idx], labels[idx], caption_ids[idx], cfg.render_size, cfg.templates)
