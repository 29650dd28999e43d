"""The shape every dataset kind returns: Example rows behind ImageTextDataset.

Map-style (random access by index) so the trainer can shard global batches
across ranks deterministically, whatever the number of processes.
"""
from __future__ import annotations

import io
from typing import NamedTuple

from PIL import Image
from torch.utils.data import Dataset

# Plain prompts for user data; open_clip's SIMPLE_IMAGENET_TEMPLATES are tuned to
# ImageNet ("a origami {}."), which reads oddly for arbitrary classes.
DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
]


class Example(NamedTuple):
    image: Image.Image  # RGB
    caption: str
    label: int = -1  # -1 when the data carries no label


class ImageTextDataset(Dataset):
    """Base class: a kind implements __len__ and __getitem__ -> Example."""

    def __init__(self, classnames: list[str] | None, templates: list[str] | None):
        self.classnames = list(classnames) if classnames is not None else None  # None: no zero-shot
        self.templates = list(templates) if templates else list(DEFAULT_TEMPLATES)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Example:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages about bad samples."""
        return f"sample {index}"


def as_rgb(image: Image.Image | bytes) -> Image.Image:
    """Decode bytes if needed and force RGB (grey, palette and RGBA all occur in the wild)."""
    if isinstance(image, (bytes, bytearray)):
        image = Image.open(io.BytesIO(image))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image
