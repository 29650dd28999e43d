"""Image-text pairs from an open_clip-style CSV: one row per image path and caption.

Images open lazily; relative paths resolve against the CSV file's own folder.
"""
from __future__ import annotations

import csv
from array import array
from pathlib import Path

from PIL import Image

from compt.data.config import DataConfig
from compt.data.dataset import Example, ImageTextDataset, as_rgb


# A caption longer than this is a bad sample (CLIP reads at most a few hundred characters of it; a
# field this long is most often an unbalanced quote that swallowed the rows after it). The csv
# module's own limit is raised above it, so one long field is one bad row, not a dead dataset.
MAX_CAPTION_CHARS = 131072
FIELD_LIMIT = 16 * MAX_CAPTION_CHARS


class CsvDataset(ImageTextDataset):
    """Rows that cannot be used (bad UTF-8, an over-long caption, a short or unparsable row) stay in
    the dataset as bad samples: reading one raises with its row, so the loader counts it like an
    unreadable image and ``data.max_bad_fraction`` decides."""

    def __init__(self, paths: list[Path], captions: list[str], labels: list[int],
                 classnames: list[str] | None, templates: list[str] | None, source: Path | None = None,
                 lines: array | None = None, faults: dict[int, str] | None = None):
        super().__init__(classnames, templates)
        self.paths, self.captions, self.labels, self.source = paths, captions, labels, source
        self.lines = lines  # the CSV line each row starts on (None: row i is on line i + 2)
        self.faults = faults or {}  # row index -> why it cannot be used

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Example:
        if index in self.faults:
            raise ValueError(self.faults[index])
        with Image.open(self.paths[index]) as image:
            rgb = as_rgb(image)
            rgb.load()  # read pixels before the file closes
        return Example(rgb, self.captions[index], self.labels[index])

    def describe(self, index: int) -> str:
        line = self.lines[index] if self.lines is not None else index + 2
        if index in self.faults:
            return f"{self.source} row {line}"
        return f"{self.paths[index]} ({self.source} row {line})"


def _row_fault(row: list[str], columns: list[str], used: list[int], caption: int) -> str | None:
    need = max(used[:2]) + 1  # the label may be left out
    if len(row) < need:
        return (f"{len(row)} field(s), but column '{columns[need - 1]}' is field {need} (a missing separator or "
                "a truncated line)")
    bad = [columns[i] for i in used if i < len(row) and any("\udc80" <= c <= "\udcff" for c in row[i])]
    if bad:
        return f"column(s) {', '.join(bad)} not valid UTF-8 (save the CSV as UTF-8)"
    if len(row[caption]) > MAX_CAPTION_CHARS:
        return (f"caption of {len(row[caption])} characters, over the {MAX_CAPTION_CHARS} allowed (an unbalanced "
                "quote swallows the rows after it)")
    if not row[used[0]].strip():
        return "no image path"
    return None


class _Lines:
    """The file's lines for csv.reader, numbered, remembering those the current row took; lines pushed
    back are read again first. (csv.reader asks for one line at a time and never reads ahead.)"""

    def __init__(self, f):
        self.f, self.number, self.taken, self.pending = f, 0, [], []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pending:
            number, text = self.pending.pop(0)
        else:
            text = next(self.f)
            self.number += 1
            number = self.number
        self.taken.append((number, text))
        return text

    def push_back(self, lines: list[tuple[int, str]]) -> None:
        self.pending[:0] = lines


def _swallowed(row: list[str], rest: list[tuple[int, str]], separator: str, width: int) -> bool:
    """A row spanning several lines is an unbalanced quote (not a caption with line breaks) when a line it
    took is a whole row on its own: as many fields as the header. (The tail of a quoted caption has fewer:
    the fields before the caption are on the row's first line.)"""
    if not rest or not any("\n" in field or "\r" in field for field in row):
        return False
    for _, text in rest:
        try:
            alone = next(csv.reader([text], delimiter=separator), [])
        except csv.Error:
            continue
        if len(alone) >= width:
            return True
    return False


def _column(columns: list[str], key: str) -> int:
    return len(columns) - 1 - columns[::-1].index(key)  # the last of equal names, as csv.DictReader


def build_csv(cfg: DataConfig, split: str) -> CsvDataset:
    path = Path(getattr(cfg, split)).expanduser()
    keys = cfg.resolved_keys()
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, FIELD_LIMIT))
    try:
        # Undecodable bytes become lone surrogates, so one bad byte marks its row, not the whole file.
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            lines_in = _Lines(f)
            reader = csv.reader(lines_in, delimiter=cfg.csv_separator)
            columns = next(reader, None) or []
            for name, key in (("image_key", keys.image), ("caption_key", keys.caption)):
                if key not in columns:
                    raise ValueError(
                        f"data.{name}: column '{key}' is not in {path} (columns: {columns}); "
                        f"set data.{name} to the right column, or check data.csv_separator "
                        f"({cfg.csv_separator!r})"
                    )
            image, caption = _column(columns, keys.image), _column(columns, keys.caption)
            label = _column(columns, keys.label) if keys.label in columns else None
            used = [image, caption] + ([label] if label is not None else [])
            root = path.parent
            paths, captions, labels, lines, faults = [], [], [], array("q"), {}
            while True:
                lines_in.taken.clear()
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:  # an over-long field, a NUL byte: this row only
                    row, problem = None, f"unparsable ({e})"
                else:
                    if not row:
                        continue  # a blank line, as DictReader skips it
                    problem = _row_fault(row, columns, used, caption)
                taken = list(lines_in.taken)
                line = taken[0][0] if taken else lines_in.number
                if row is not None and _swallowed(row, taken[1:], cfg.csv_separator, len(columns)):
                    # An unbalanced quote made one field of the rows after it: this row is bad, the lines it
                    # swallowed are read again as rows of their own (each pass moves on by at least one line).
                    lines_in.push_back(taken[1:])
                    problem = (f"unbalanced quote: a field runs over lines {line}-{taken[-1][0]}, which hold rows "
                               "of their own (those are read as rows; fix or escape the quote in this row)")
                lines.append(line)
                if problem is not None:
                    faults[len(paths)] = problem
                    paths.append(root)
                    captions.append("")
                    labels.append(-1)
                    continue
                paths.append(root / row[image])  # an absolute path replaces root
                captions.append(row[caption])
                labels.append(_label(row[label] if label is not None and label < len(row) else None, path, line))
    finally:
        csv.field_size_limit(limit)
    if not paths:
        raise ValueError(f"data.{split}: {path} has a header but no rows; give a CSV with data")
    contiguous = lines[-1] == len(lines) + 1  # increasing from line 2: every row is on line index + 2
    return CsvDataset(paths, captions, labels, cfg.classnames, cfg.templates, path,
                      lines=None if contiguous else lines, faults=faults)


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
