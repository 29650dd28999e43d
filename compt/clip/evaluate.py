"""Evaluation of one CLIP model on the validation split: zero-shot classification
with class prompts, and image<->text retrieval (R@1/5/10); and zero-shot on a class-folder
tree (``data.imagefolder``) with open_clip's classifier builder.

Models are always called through ``model(image, text)`` (never encode_*), so the
same code works for a plain module and a ZeRO-3 engine, whose parameters are only
gathered inside forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier

from compt.clip.model import Preprocess
from compt.clip.loader import eval_loader
from compt.faults import StageFailed
from compt.data.imagefolder import ImageFolderDataset
from compt.devices import placement, to_device


@torch.no_grad()
def _features(model, loader, source: str = "data.val") -> tuple[torch.Tensor, list[str], torch.Tensor, list[str]]:
    """Image embeddings, captions and labels of every readable sample; descriptions of the unreadable ones.
    ``source``: the config field naming the data, for the error when nothing can be read."""
    images, captions, labels, bad = [], [], [], []
    device, dtype = placement(model)
    for batch in loader:
        bad += batch.bad
        if not batch.captions:
            continue
        images.append(model(to_device(batch.images, device, dtype), None)[0].float().cpu())
        captions += batch.captions
        labels.append(batch.labels)
    if not images:
        raise StageFailed(f"no sample of {source} could be read (e.g. {bad[0] if bad else 'empty split'}); "
                          f"check {source} and the files it names")
    return torch.cat(images), captions, torch.cat(labels), bad


@torch.no_grad()
def _encode_texts(model, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    device = placement(model)[0]
    out = [model(None, tokenizer(texts[i:i + batch_size]).to(device))[1].float().cpu()
           for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(out), dim=-1)


def _recall(sim: torch.Tensor, correct: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """sim [queries x candidates]; correct[q, c] marks every right answer. R@k = any right one in the top k."""
    out = {}
    for k in ks:
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        out[f"R@{k}"] = correct.gather(1, top).any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def evaluate(model, val_ds, pre: Preprocess, batch_size: int = 256, zeroshot: bool = True,
             retrieval: bool = True, **options) -> dict:
    """Metrics dict: zeroshot_top1/top5 (None without class names) and retrieval R@k both ways.
    ``options``: DataLoader kwargs for the validation images (compt.loading.loader_options).

    Retrieval candidates are the *distinct* captions: in datasets where several images share
    a caption (class templates) any image with that caption is a correct answer, which is
    the standard protocol whenever captions are unique.
    """
    was_training = model.training
    model.eval()
    try:
        img, captions, labels, bad = _features(model, eval_loader(val_ds, pre, batch_size, **options))
        metrics: dict = {"zeroshot_top1": None, "zeroshot_top5": None, "retrieval": None,
                         "val_samples": len(captions), "val_bad_samples": {"count": len(bad), "examples": bad[:5]}}
        if zeroshot and val_ds.classnames and (labels >= 0).all():
            classifier = _classifier(model, pre, val_ds.classnames, val_ds.templates, batch_size)
            metrics["zeroshot_top1"], metrics["zeroshot_top5"] = _topk_accuracy(img @ classifier, labels)
        if retrieval:
            distinct = sorted(set(captions))
            index = {c: j for j, c in enumerate(distinct)}
            txt = _encode_texts(model, pre.tokenizer, distinct, batch_size)
            truth = torch.zeros(len(captions), len(distinct), dtype=torch.bool)
            truth[torch.arange(len(captions)), torch.tensor([index[c] for c in captions])] = True
            sim = img @ txt.T
            metrics["retrieval"] = {"image_to_text": _recall(sim, truth), "text_to_image": _recall(sim.T, truth.T)}
        return metrics
    finally:
        model.train(was_training)


class _TextTower:
    """What open_clip's build_zero_shot_classifier calls (``encode_text``), answered through ``model(None,
    text)``: a ZeRO-3 engine gathers its partitioned parameters only inside forward."""

    def __init__(self, model):
        self.model = model

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.model(None, text)[1].float(), dim=-1)  # in float32, whatever the model's dtype


def _classifier(model, pre: Preprocess, classnames: list[str], templates: list[str], batch_size: int) -> torch.Tensor:
    """[embed x classes] zero-shot weights from open_clip's builder, about ``batch_size`` prompts per forward."""
    weights = build_zero_shot_classifier(_TextTower(model), pre.tokenizer, classnames, templates,
                                         num_classes_per_batch=max(1, batch_size // len(templates)),
                                         device=placement(model)[0])
    return weights.float().cpu()


def _topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return (top[:, 0] == labels).float().mean().item(), (top == labels[:, None]).any(1).float().mean().item()


@torch.no_grad()
def evaluate_imagefolder(model, folder: ImageFolderDataset, pre: Preprocess, batch_size: int = 256,
                         **options) -> dict:
    """Zero-shot top-1/top-5 on a class-folder tree: open_clip's classifier (the mean of each class's
    normalized prompt embeddings) over the folder's class names and templates. Unreadable images are
    dropped and counted (``imagefolder_bad_samples``, with examples), as the validation split's are."""
    was_training = model.training
    model.eval()
    try:
        img, _, labels, bad = _features(model, eval_loader(folder, pre, batch_size, **options), "data.imagefolder")
        classifier = _classifier(model, pre, folder.classnames, folder.templates, batch_size)
        top1, top5 = _topk_accuracy(img @ classifier, labels)
        return {"imagefolder_top1": top1, "imagefolder_top5": top5, "imagefolder_samples": len(labels),
                "imagefolder_classes": len(folder.classnames),
                "imagefolder_bad_samples": {"count": len(bad), "examples": bad[:5]}}
    finally:
        model.train(was_training)


@torch.no_grad()
def embedding_cosine(student, teacher, batch) -> dict[str, float]:
    """Mean cosine similarity between student and teacher embeddings on one batch."""
    device, dtype = placement(student)
    batch = batch.to(device, dtype)
    s, t = student(batch.images, batch.texts), teacher(*batch.teacher_inputs())
    s_img, s_txt = (s[3], s[4]) if len(s) >= 5 else (s[0], s[1])
    return {
        "image": F.cosine_similarity(s_img.float(), t[0].float(), dim=-1).mean().item(),
        "text": F.cosine_similarity(s_txt.float(), t[1].float(), dim=-1).mean().item(),
    }
