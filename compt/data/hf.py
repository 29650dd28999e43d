"""Image-text pairs from a Hugging Face `datasets` dataset (saved to disk or loadable).

Image columns may hold decoded PIL images, file paths, or {"bytes", "path"} dicts.
"""
from __future__ import annotations

from pathlib import Path

import datasets
from PIL import Image

from compt.data.config import DataConfig
from compt.data.dataset import Example, ImageTextDataset, as_rgb


class HFDataset(ImageTextDataset):
    def __init__(self, table: datasets.Dataset, image_key: str, caption_key: str,
                 label_key: str | None, classnames: list[str] | None, templates: list[str] | None,
                 source: str | None = None):
        super().__init__(classnames, templates)
        self.table, self.source = table, source
        self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> Example:
        row = self.table[int(index)]
        caption = row[self.caption_key]
        if isinstance(caption, (list, tuple)):  # several captions per image: keep it deterministic
            caption = caption[0]
        label = row[self.label_key] if self.label_key else None
        return Example(_image(row[self.image_key]), str(caption), -1 if label is None else int(label))

    def describe(self, index: int) -> str:
        return f"{self.source or 'the datasets table'} row {index}"


def _image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return as_rgb(value)
    if isinstance(value, dict):  # an Image feature stored undecoded
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return as_rgb(value)
    with Image.open(value) as image:
        rgb = as_rgb(image)
        rgb.load()
    return rgb


def is_saved_to_disk(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def build_hf(cfg: DataConfig, split: str) -> HFDataset:
    spec = getattr(cfg, split)
    split_field = "hf_split_train" if split == "train" else "hf_split_val"
    split_name = getattr(cfg, split_field)
    path = Path(spec).expanduser()
    source = f"{spec} split {split_name}"
    if path.is_dir() and is_saved_to_disk(path):
        loaded = datasets.load_from_disk(str(path))
        if not isinstance(loaded, datasets.DatasetDict):
            source = str(spec)
        else:
            if split_name not in loaded:
                raise ValueError(
                    f"data.{split_field}: split '{split_name}' is not in {path} "
                    f"(splits: {list(loaded)}); set data.{split_field} to one of them"
                )
            loaded = loaded[split_name]
    else:
        loaded = datasets.load_dataset(spec, split=split_name)
    keys = cfg.resolved_keys()
    columns = loaded.column_names
    for name, key in (("image_key", keys.image), ("caption_key", keys.caption)):
        if key not in columns:
            raise ValueError(f"data.{name}: column '{key}' is not in {spec} (columns: {columns}); "
                             f"set data.{name} to the right column")
    label_key = keys.label if keys.label in columns else None
    classnames = cfg.classnames
    if classnames is None and label_key is not None:
        feature = loaded.features[label_key]
        if isinstance(feature, datasets.ClassLabel):
            classnames = list(feature.names)
    return HFDataset(loaded, keys.image, keys.caption, label_key, classnames, cfg.templates,
                     source=source)
