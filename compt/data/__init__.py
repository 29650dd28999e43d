"""Image-text data for compt: a typed DataConfig and map-style datasets of Examples.

Kinds: built-in sklearn digits and digit-numbers, open_clip CSV, local webdataset shards,
Hugging Face datasets.
"""
from compt.data.build import build_dataset
from compt.data.config import DataConfig
from compt.data.dataset import Example, ImageTextDataset

__all__ = ["DataConfig", "Example", "ImageTextDataset", "build_dataset"]
