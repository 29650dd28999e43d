"""Zero-shot evaluation data a CLIP user already has: an ImageNet-style class-folder tree
(``root/<class>/<image>``, torchvision's ImageFolder layout), its class names and prompt templates.

Folders named by WordNet id (n01440764, ...) are ImageNet's classes: open_clip lists their names in
sorted-wnid order, which is the order of the sorted folders. Other folder names are the class names
(underscores read as spaces), or the config lists the names.
"""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compt.data.dataset import DEFAULT_TEMPLATES, Example, ImageTextDataset, as_rgb

WNID = re.compile(r"^n\d{8}$")
IMAGENET_CLASSES = 1000  # open_clip's IMAGENET_CLASSNAMES: one name per ImageNet-1k wnid, sorted-wnid order
LAYOUT = "a folder with one subfolder of images per class (root/<class>/<image>, torchvision's ImageFolder layout)"


class ImageFolderEval(BaseModel):
    """``data.imagefolder``: zero-shot top-1/top-5 on a class-folder tree after each stage.

    classnames: auto (ImageNet's names when every folder is a wnid, else the folder names), imagenet,
    folders, or a list (one per folder, in sorted folder order). templates: auto (open_clip's OpenAI
    ImageNet prompts for ImageNet names, compt's plain prompts otherwise), openai, simple, or a list of
    prompts with '{}'. max_images: evaluate this many images, taken from the classes in turn (every class
    is in while it is at least the number of classes)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: str
    classnames: Literal["auto", "imagenet", "folders"] | list[str] = "auto"
    templates: Literal["auto", "openai", "simple"] | list[str] = "auto"
    max_images: int | None = Field(None, gt=0)

    def problems(self, where: str = "data.imagefolder") -> list[str]:
        """Every problem found, each naming its field and fix; reads folder names only, no image."""
        found = self._template_problems(where)
        root = Path(self.path).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.exists() else "does not exist"
            return found + [f"{where}.path: '{self.path}' {what}; give {LAYOUT}"]
        folders = class_folders(root)
        if not folders:
            return found + [f"{where}.path: '{self.path}' has no class subfolders; give {LAYOUT}"]
        from torchvision.datasets.folder import IMG_EXTENSIONS  # torchvision is imported only when asked for

        empty = [f for f in folders if not _has_image(root / f, IMG_EXTENSIONS)]
        if empty:
            names = ", ".join(f"'{f}'" for f in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            found.append(f"{where}.path: class folder(s) {names} in '{self.path}' hold no image "
                         f"({', '.join(IMG_EXTENSIONS)}); add images or remove those folders")
        try:
            resolve_classnames(folders, self.classnames)
        except ValueError as e:
            found.append(f"{where}.classnames: {e}")
        return found

    def _template_problems(self, where: str) -> list[str]:
        if isinstance(self.templates, str):
            return []
        if not self.templates:
            return [f"{where}.templates: the list is empty; give prompts like 'a photo of a {{}}.', "
                    "or openai, simple or auto"]
        return [f"{where}.templates: {t!r} has no '{{}}' for the class name; write it like 'a photo of a {{}}.'"
                for t in self.templates if "{}" not in t]


def class_folders(root: Path) -> list[str]:
    """The class folders, sorted as torchvision's ImageFolder sorts them (its label order)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _has_image(folder: Path, extensions: tuple[str, ...]) -> bool:
    for _, _, files in os.walk(folder, followlinks=True):  # ImageFolder reads a class's subfolders too
        if any(f.lower().endswith(extensions) for f in files):
            return True
    return False


def imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def resolve_classnames(folders: list[str], spec: str | list[str]) -> list[str]:
    """One class name per folder (``folders`` sorted); ValueError saying what to give instead."""
    wnids = bool(folders) and all(WNID.match(f) for f in folders)
    if spec == "auto":
        spec = "imagenet" if wnids else "folders"
    if spec == "folders":
        return [f.replace("_", " ") for f in folders]
    if spec == "imagenet":
        if not wnids:
            odd = [f for f in folders if not WNID.match(f)][:3]
            raise ValueError(f"'imagenet' needs folders named by WordNet id (n01440764, ...), but {odd} are not; "
                             "use folders (the folder names) or list the class names")
        if len(folders) != IMAGENET_CLASSES:
            raise ValueError(f"{len(folders)} WordNet-id folders, but open_clip names ImageNet's classes only as "
                             f"all {IMAGENET_CLASSES} in sorted-wnid order, so a subset cannot be mapped; list the "
                             f"{len(folders)} class names in sorted folder order ({', '.join(folders[:3])}, ...)")
        return imagenet_classnames()
    if len(spec) != len(folders):
        raise ValueError(f"{len(spec)} name(s) for {len(folders)} class folder(s); give one name per folder, in "
                         f"sorted folder order ({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''})")
    if not all(isinstance(n, str) and n.strip() for n in spec):
        raise ValueError("every class name must be non-empty text")
    return list(spec)


def resolve_templates(spec: str | list[str], classnames: list[str]) -> list[str]:
    """Prompt format strings ('... {} ...'). open_clip's are functions of the class name; called with '{}'
    they give the same prompts as format strings, which (unlike lambdas) reach loader workers by pickle."""
    if isinstance(spec, list):
        return list(spec)
    if spec == "auto":
        spec = "openai" if classnames == imagenet_classnames() else "plain"
    if spec == "plain":
        return list(DEFAULT_TEMPLATES)
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    chosen = OPENAI_IMAGENET_TEMPLATES if spec == "openai" else SIMPLE_IMAGENET_TEMPLATES
    return [t("{}") for t in chosen]


class ImageFolderDataset(ImageTextDataset):
    """The images of a class-folder tree, labelled by sorted folder index; each caption is its class name."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], classnames: list[str], templates: list[str]):
        super().__init__(classnames, templates)
        self.root, self.samples = root, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Example:
        path, label = self.samples[index]
        with open(path, "rb") as f:
            image = as_rgb(f.read())
        return Example(image, self.classnames[label], label)

    def describe(self, index: int) -> str:
        return self.samples[index][0]


def build_imagefolder(cfg: ImageFolderEval) -> ImageFolderDataset:
    problems = cfg.problems()
    if problems:
        raise ValueError("invalid data.imagefolder:\n  " + "\n  ".join(problems))
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    root = Path(cfg.path).expanduser()
    folders = class_folders(root)
    samples = make_dataset(str(root), {f: i for i, f in enumerate(folders)}, extensions=IMG_EXTENSIONS)
    if cfg.max_images is not None and cfg.max_images < len(samples):
        # The classes in turn, each its next image in file order: every class is in while max_images is at
        # least the number of classes, and the subset is the same on every rank and every run.
        by_class: list[list[tuple[str, int]]] = [[] for _ in folders]
        for sample in samples:
            by_class[sample[1]].append(sample)
        samples = [s for turn in itertools.zip_longest(*by_class) for s in turn if s is not None][:cfg.max_images]
    classnames = resolve_classnames(folders, cfg.classnames)
    return ImageFolderDataset(root, samples, classnames, resolve_templates(cfg.templates, classnames))
