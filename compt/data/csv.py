"""Image-text pairs from an open_clip-style CSV: one row per image path and caption.

Images open lazily; relative paths resolve against the CSV file's own folder.
"""
from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from compt.data.config import DataConfig
from compt.data.dataset import Example, ImageTextDataset, as_rgb


class CsvDataset(ImageTextDataset):
    def __init__(self, paths: list[Path], captions: list[str], labels: list[int],
                 classnames: list[str] | None, templates: list[str] | None, source: Path | None = None):
        super().__init__(classnames, templates)
        self.paths, self.captions, self.labels, self.source = paths, captions, labels, source

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example:
        with Image.open(self.paths[index]) as image:
            rgb = as_rgb(image)
            rgb.load()  # read pixels before the file closes
        return Example(rgb, self.captions[index], self.labels[index])

    def describe(self, index: int) -> str:
        return f"{self.paths[index]} ({self.source} row {index + 2})"


def build_csv(cfg: DataConfig, split: str) -> CsvDataset:
    path = Path(getattr(cfg, split)).expanduser()
    keys = cfg.resolved_keys()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=cfg.csv_separator)
        columns = reader.fieldnames or []
        for name, key in (("image_key", keys.image), ("caption_key", keys.caption)):
            if key not in columns:
                raise ValueError(
                    f"data.{name}: column '{key}' is not in {path} (columns: {columns}); "
                    f"set data.{name} to the right column, or check data.csv_separator "
                    f"({cfg.csv_separator!r})"
                )
        has_label = keys.label in columns
        root = path.parent
        paths, captions, labels = [], [], []
        for line, row in enumerate(reader, start=2):
            paths.append(root / row[keys.image])  # an absolute path replaces root
            captions.append(row[keys.caption])
            labels.append(_label(row.get(keys.label), path, line) if has_label else -1)
    if not paths:
        raise ValueError(f"data.{split}: {path} has a header but no rows; give a CSV with data")
    return CsvDataset(paths, captions, labels, cfg.classnames, cfg.templates, path)


def _label(value: str | None, path: Path, line: int) -> int:
    if value is None or value.strip() == "":
        return -1
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"data.label_key: {path} line {line} has label {value!r}, not an integer; "
            "labels must index data.classnames (or name another column in data.label_key)"
        ) from None
