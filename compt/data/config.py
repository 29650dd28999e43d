"""DataConfig: which image-text data a stage trains and evaluates on.

Typed and checked once at the edge; problems() lists every issue with its fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict

from compt.data.imagefolder import ImageFolderEval
from compt.data.shards import READABLE_SCHEMES, UNREADABLE_SCHEMES, expand_shards, is_remote, scheme

Kind = Literal["digits", "digit-numbers", "csv", "webdataset", "hf"]
BUILT_IN: tuple[str, ...] = ("digits", "digit-numbers")  # shipped with compt: no train/val paths


class Keys(NamedTuple):
    image: str
    caption: str
    label: str


# csv follows open_clip's CsvDataset; webdataset follows its extension naming,
# where ";" lists alternatives and the first one a sample has wins.
DEFAULT_KEYS: dict[str, Keys] = {
    "digits": Keys("image", "caption", "label"),
    "digit-numbers": Keys("image", "caption", "label"),
    "csv": Keys("filepath", "title", "label"),
    "webdataset": Keys("jpg;png;jpeg;webp", "txt", "cls"),
    "hf": Keys("image", "caption", "label"),
}

WHAT_TO_GIVE = {
    "csv": "the path of an open_clip CSV (columns {image}, {caption})",
    "webdataset": "a local .tar shard, a brace pattern like data/shard-{{000..003}}.tar, "
    "a directory of .tar files, or (streamed) 'pipe:COMMAND' or http(s):// URLs with brace patterns",
    "hf": "a directory written by datasets' save_to_disk, or a path datasets.load_dataset accepts",
}


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN or inf is never a valid setting

    kind: Kind = "digits"
    train: str | None = None
    val: str | None = None
    image_key: str | None = None
    caption_key: str | None = None
    label_key: str | None = None
    csv_separator: str = "\t"
    hf_split_train: str = "train"
    hf_split_val: str = "validation"
    classnames: list[str] | None = None
    templates: list[str] | None = None
    # built-in kinds (digits, digit-numbers) only
    val_fraction: float = 0.2
    split_seed: int = 0
    render_size: int = 32
    # Unreadable/corrupt/missing images and empty captions are skipped and counted; a stage
    # stops when more than this fraction of the samples it has drawn were bad.
    max_bad_fraction: float = 0.01
    # Processes per rank that read and decode samples (0: the training process itself); None: the CPUs
    # per local rank, at most 8 (compt.loading). The weights do not depend on it.
    workers: int | None = None
    # webdataset only. Streamed shards are read in order (compt.data.stream) instead of indexed at start-up:
    # true, false, or auto (stream when data.train is remote: 'pipe:', http(s), ...).
    streaming: bool | Literal["auto"] = "auto"
    train_samples: int | None = None  # samples in data.train: a streamed set's size, needed for epoch budgets
    shuffle_buffer: int = 5000  # streamed samples shuffled in a buffer of this many per loader worker (0: none)
    resampled: bool = False  # streamed shards drawn with replacement (very large sets), no passes
    shard_retries: int = 2  # a remote shard that fails is opened again this many times before it counts as bad
    # Zero-shot on a class-folder tree (e.g. ImageNet's val) after each stage, besides the val split.
    imagefolder: ImageFolderEval | None = None

    def resolved_keys(self) -> Keys:
        default = DEFAULT_KEYS[self.kind]
        return Keys(
            self.image_key or default.image,
            self.caption_key or default.caption,
            self.label_key or default.label,
        )

    def streams(self) -> bool:
        """Whether data.train is streamed (compt.streaming); then len(train set) is data.train_samples."""
        if self.kind != "webdataset":
            return False
        return self.streaming is True or (self.streaming == "auto" and bool(self.train) and is_remote(self.train))

    def problems(self) -> list[str]:
        """Every problem found, each naming its field and fix; cheap (no data read)."""
        found: list[str] = self._streaming_problems()
        if self.kind not in BUILT_IN:
            for field in ("train", "val"):
                found.extend(self._path_problems(field, getattr(self, field)))
        if not 0.0 < self.val_fraction < 1.0:
            found.append(
                f"data.val_fraction: {self.val_fraction} is not between 0 and 1; "
                "give a fraction such as 0.2"
            )
        if not 0.0 <= self.max_bad_fraction < 1.0:
            found.append(
                f"data.max_bad_fraction: {self.max_bad_fraction} is not in [0, 1); "
                "give a fraction such as 0.01 (0 = stop at the first bad sample)"
            )
        if self.workers is not None and self.workers < 0:
            found.append(
                f"data.workers: {self.workers} is negative; give 0 (load in the training process), "
                "a number of loader processes per rank, or leave it out for the CPUs per rank (at most 8)"
            )
        if self.render_size < 8:
            found.append(
                f"data.render_size: {self.render_size} is below the digits' own 8 pixels; "
                "give 8 or more, e.g. 32"
            )
        if self.classnames is not None and not self.classnames:
            found.append(
                "data.classnames: the list is empty; list the class names labels index into, "
                "or leave it out to skip zero-shot evaluation"
            )
        if self.templates is not None:
            if not self.templates:
                found.append(
                    "data.templates: the list is empty; give prompts like 'a photo of a {}.' "
                    "or leave it out for the defaults"
                )
            for t in self.templates:
                if "{}" not in t:
                    found.append(
                        f"data.templates: {t!r} has no '{{}}' for the class name; "
                        "write it like 'a photo of a {}.'"
                    )
        if self.imagefolder is not None:
            found.extend(self.imagefolder.problems())
        return found

    def _streaming_problems(self) -> list[str]:
        found = []
        if self.kind != "webdataset" and self.streaming is True:
            found.append(f"data.streaming: only webdataset shards stream (kind is '{self.kind}'); "
                         "leave it out or set it to false")
        if self.resampled and not self.streams():
            found.append("data.resampled: draws streamed shards with replacement; set data.streaming: true "
                         "(or give remote shards) or leave resampled out")
        for name, value, low in (("train_samples", self.train_samples, 1), ("shuffle_buffer", self.shuffle_buffer, 0),
                                 ("shard_retries", self.shard_retries, 0)):
            if value is not None and value < low:
                found.append(f"data.{name}: {value} is below {low}; give {low} or more")
        return found

    def _path_problems(self, field: str, path: str | None) -> list[str]:
        keys = self.resolved_keys()
        give = WHAT_TO_GIVE[self.kind].format(image=keys.image, caption=keys.caption)
        if not path:
            return [f"data.{field}: missing for kind '{self.kind}'; give {give}"]
        if self.kind == "webdataset":
            if is_remote(path):
                s = scheme(path)
                if s in UNREADABLE_SCHEMES:
                    return [f"data.{field}: '{path}': no reader for {s}:// URLs; {UNREADABLE_SCHEMES[s]}"]
                if s not in READABLE_SCHEMES:
                    return [f"data.{field}: '{path}': unknown scheme '{s}:'; give {give} "
                            f"(schemes: {', '.join(READABLE_SCHEMES)})"]
                if field == "train" and self.streaming is False:
                    return [f"data.train: '{path}' is remote and is read by streaming; set data.streaming to true "
                            "or auto, or download the shards and give their local path"]
                return []  # opened when read: a stream, not checked offline
            shards, missing = expand_shards(path)
            if missing:
                names = ", ".join(f"'{m}'" for m in missing[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                return [f"data.{field}: '{path}' names files that do not exist ({names}{more}); "
                        f"give {give}"]
            if not shards:
                return [f"data.{field}: '{path}' matches no .tar file; give {give}"]
            return []
        if self.kind == "hf" and not _looks_local(path):
            return []  # a hub id: resolved by datasets at build time, not checked offline
        if not Path(path).expanduser().exists():
            what = "file" if self.kind == "csv" else "path"
            return [f"data.{field}: {what} '{path}' does not exist; give {give}"]
        return []


def _looks_local(path: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a local path."""
    return (
        path.startswith(("/", ".", "~"))
        or path.count("/") > 1
        or "\\" in path
        or Path(path).expanduser().exists()
    )
