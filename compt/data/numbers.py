"""digit-numbers: two-digit numbers (10..99) composed of real sklearn handwritten digits.

A harder built-in benchmark than `digits`: 90 classes, disjoint digit images per split,
and held-out combinations (one number per tens digit is shown only in validation).

How it is built (deterministic from data.split_seed, independent of the rank count):
- The 1,797 digit images are split, stratified by digit, into a train pool and a val
  pool (data.val_fraction); a validation image never reuses a training digit image.
- Nine numbers, one per tens digit with nine different units digits, are held out:
  they never appear in training, while both of their digits (and both words) do, in
  other numbers. Validation covers all 90 numbers, so zero-shot top-1 includes a
  compositional part (the held-out 10%) that memorising pairs cannot solve.
- A sample puts a tens digit and a units digit side by side on a 16x16 canvas, each
  with its own vertical jitter, rendered to data.render_size; its caption names the
  number in words and/or figures ("a photo of the number forty-two."). Training captions
  vary over several templates; validation uses one caption per number ("an image of the
  handwritten number forty-two (42)."), so image<->text retrieval is learnable.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from compt.data.config import DataConfig
from compt.data.dataset import Example, ImageTextDataset

NUMBERS = list(range(10, 100))  # label = number - 10
TRAIN_PER_CLASS = 100  # compositions per seen number in the training split (81 x 100 = 8,100)
VAL_PER_CLASS = 10  # compositions per number in the validation split (90 x 10 = 900)
CANVAS = 16  # two 8x8 digits side by side; square, so the CLIP resize+center-crop keeps both
MAX_JITTER = 2  # vertical offset of each digit, in canvas pixels

UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

CAPTIONS = [
    "a photo of the number {word}.",
    "the handwritten number {number}.",
    "the number {word}, written by hand.",
    "an image of the handwritten number {word} ({number}).",
    "the digits {tens} and {units} side by side: {word}.",
    "{word}, two handwritten digits.",
]

VAL_CAPTION = 3  # the one validation caption: names the number in words and figures

ZERO_SHOT_TEMPLATES = [
    "a photo of the number {}.",
    "the number {}, written by hand.",
    "an image of the handwritten number {}.",
    "{}, two handwritten digits.",
]


def number_word(n: int) -> str:
    """English words for 10..99: 'ten', 'nineteen', 'forty', 'forty-two'."""
    if not 10 <= n <= 99:
        raise ValueError(f"number_word covers 10..99, got {n}")
    if n < 20:
        return TEENS[n - 10]
    tens, units = divmod(n, 10)
    return TENS[tens] + ("" if units == 0 else "-" + UNITS[units])


CLASSNAMES = [number_word(n) for n in NUMBERS]


def held_out_numbers(split_seed: int) -> list[int]:
    """One number per tens digit, never seen in training; their units digits are all different."""
    units = np.random.RandomState(split_seed).permutation(10)[:9]
    return [10 * t + int(u) for t, u in zip(range(1, 10), units)]


class DigitNumbersDataset(ImageTextDataset):
    def __init__(self, pool: np.ndarray, items: np.ndarray, render_size: int, templates: list[str] | None):
        super().__init__(CLASSNAMES, templates or ZERO_SHOT_TEMPLATES)
        self.pool = pool  # [n, 8, 8] uint8 digit images of this split only
        self.items = items  # [m, 6] int64: number, left index, right index, left dy, right dy, caption id
        self.render_size = render_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Example:
        number, left, right, dy_left, dy_right, caption_id = (int(x) for x in self.items[index])
        canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        top = (CANVAS - 8) // 2
        canvas[top + dy_left:top + dy_left + 8, 0:8] = self.pool[left]
        canvas[top + dy_right:top + dy_right + 8, 8:16] = self.pool[right]
        image = Image.fromarray(canvas).resize((self.render_size,) * 2, Image.Resampling.BICUBIC).convert("RGB")
        tens, units = divmod(number, 10)
        caption = CAPTIONS[caption_id].format(word=number_word(number), number=number,
                                              tens=UNITS[tens], units=UNITS[units])
        return Example(image, caption, number - NUMBERS[0])


def build_digit_numbers(cfg: DataConfig, split: str) -> DigitNumbersDataset:
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=cfg.val_fraction,
                                          random_state=cfg.split_seed, stratify=labels)
    idx = np.sort(train_idx if split == "train" else val_idx)
    pool, pool_labels = pixels[idx], labels[idx]
    by_digit = [np.flatnonzero(pool_labels == d) for d in range(10)]

    held_out = set(held_out_numbers(cfg.split_seed))
    if split == "train":
        numbers = [n for n in NUMBERS if n not in held_out]
        per_class = TRAIN_PER_CLASS
    else:
        numbers, per_class = NUMBERS, VAL_PER_CLASS
    # Separate streams per split: the val items do not shift when train constants change.
    rng = np.random.RandomState([cfg.split_seed, 0 if split == "train" else 1])
    items = []
    for n in numbers:
        tens, units = divmod(n, 10)
        items.append(np.stack([
            np.full(per_class, n),
            rng.choice(by_digit[tens], per_class),
            rng.choice(by_digit[units], per_class),
            rng.randint(-MAX_JITTER, MAX_JITTER + 1, per_class),
            rng.randint(-MAX_JITTER, MAX_JITTER + 1, per_class),
            rng.randint(len(CAPTIONS), size=per_class) if split == "train" else np.full(per_class, VAL_CAPTION),
        ], axis=1))
    items = np.concatenate(items).astype(np.int64)
    items = items[rng.permutation(len(items))]
    return DigitNumbersDataset(pool, items, cfg.render_size, cfg.templates)
