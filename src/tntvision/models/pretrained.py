"""Published weights by name, as in timm: ``tnt_s_patch16_224.in1k`` is an architecture and a tag.

A :class:`PretrainedTag` says where one set of weights is published (the Hugging Face hub, a release file,
or only a page a person must download from), what its publisher reports for it (ImageNet top-1), its
license, and the preprocessing it was evaluated with. The model modules (tnt.py, pyramid_tnt.py) register
their tags next to their variants; the first tag registered for an architecture is its default, which a
bare name (``tnt_s_patch16_224``) means. :mod:`tntvision.models.hub` downloads them.

Like the model registry, this one is strict: a tag is registered once, an unknown tag raises and lists the
tags there are.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError, UnknownModelError
from .registry import ModelMeta, get_model_entry, list_models

__all__ = [
    "PretrainedTag",
    "get_pretrained_tag",
    "imagenet_class_names",
    "list_pretrained",
    "register_pretrained",
    "split_name",
]

SOURCES = ("hf-hub", "url", "manual")  # how the weights are fetched: huggingface_hub, torch.hub, by hand


@dataclass(frozen=True)
class PretrainedTag:
    """One set of published weights for a registered architecture (``name`` = ``architecture.tag``).

    Attributes:
        source: ``"hf-hub"`` (a Hugging Face repository, fetched by ``huggingface_hub``), ``"url"`` (a
            release file, fetched by ``torch.hub``) or ``"manual"`` (only a person can fetch it: see
            ``notes``); ``location`` is the repository id, the file's address or the page.
        filename: the file in the hub repository; for a URL, its last part.
        hash_prefix: leading hex digits of the file's SHA-256 its publisher put in its name, or None.
        top1, top1_by: ImageNet-1k val top-1 (%) and who reported it (not measured here).
        license: the publisher's license for the weights (SPDX id, lower case as timm writes it).
        layout: the file's key layout (``"timm"``, ``"authors"``, ``"mmpretrain"``); any of them loads.
        meta: the preprocessing the weights were evaluated with.
        num_classes, labels: the classifier's classes and what they are (``"imagenet-1k"``).
        origin_url, notes: the project page, and what a user must know (how to fetch a manual file).
    """

    architecture: str
    tag: str
    source: str
    location: str
    top1: float
    top1_by: str
    license: str
    layout: str
    meta: ModelMeta
    filename: str = "model.safetensors"
    hash_prefix: str | None = None
    num_classes: int = 1000
    labels: str = "imagenet-1k"
    origin_url: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "url":
            object.__setattr__(self, "filename", urlsplit(self.location).path.rsplit("/", 1)[-1])
        elif self.source == "manual":
            object.__setattr__(self, "filename", "")  # whatever the person saves it as

    @property
    def name(self) -> str:
        """``architecture.tag``, the name ``create_model`` takes."""
        return f"{self.architecture}.{self.tag}"

    @property
    def downloadable(self) -> bool:
        """Whether ``pretrained=True`` can fetch the file (False: a person downloads it, see ``notes``)."""
        return self.source != "manual"

    def cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` keys for the source of these weights (input keys come from ``meta``)."""
        out: dict[str, Any] = {
            "tag": self.tag,
            "source": self.source,
            "hf_hub_id": self.location if self.source == "hf-hub" else None,
            "hf_hub_filename": self.filename if self.source == "hf-hub" else None,
            "url": self.location if self.source != "hf-hub" else None,
            "top1": self.top1,
            "top1_by": self.top1_by,
            "license": self.license,
            "layout": self.layout,
            "origin_url": self.origin_url or None,
        }
        if self.notes:
            out["notes"] = self.notes
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything about the tag, JSON-ready (``tnt models --pretrained --json``)."""
        meta = dataclasses.asdict(self.meta)
        return {
            "name": self.name,
            "architecture": self.architecture,
            **self.cfg(),
            **meta,
            "num_classes": self.num_classes,
            "labels": self.labels,
            "downloadable": self.downloadable,
        }


_TAGS: dict[str, list[PretrainedTag]] = {}  # architecture -> its tags, the default first


def register_pretrained(tag: PretrainedTag) -> None:
    """Register ``tag`` for its (already registered) architecture; the first one registered is the default.

    Raises:
        ValueError: the same ``architecture.tag`` registered twice, or a file name another tag uses (the
            release files share one cache folder and one mirror).
        UnknownModelError: the architecture is not registered.
    """
    get_model_entry(tag.architecture)
    if any(t.tag == tag.tag for t in _TAGS.get(tag.architecture, [])):
        raise ValueError(f"pretrained tag {tag.name!r} is already registered")
    if tag.source == "url" and any(t.filename == tag.filename for t in all_tags() if t.source == "url"):
        raise ValueError(f"{tag.name}: another release file is already named {tag.filename!r}")
    _TAGS.setdefault(tag.architecture, []).append(tag)


def all_tags() -> list[PretrainedTag]:
    """Every registered tag, by architecture name, each architecture's default first."""
    return [t for arch in sorted(_TAGS) for t in _TAGS[arch]]


def split_name(name: str) -> tuple[str, str | None]:
    """``"tnt_s_patch16_224.in1k"`` -> ``("tnt_s_patch16_224", "in1k")``; a bare name has tag None."""
    arch, dot, tag = name.partition(".")
    if dot and not tag:
        raise ConfigError(f"{name!r}: a tag after the dot is missing (e.g. {arch}.in1k)")
    return arch, (tag if dot else None)


def get_pretrained_tag(name: str) -> PretrainedTag | None:
    """The tag ``name`` means: its own (``NAME.TAG``) or the architecture's default (a bare ``NAME``;
    None when the architecture has no published weights).

    Raises:
        UnknownModelError: an unknown architecture, or a tag the architecture does not have (the message
            lists the tags it has).
    """
    arch, tag = split_name(name)
    get_model_entry(arch)
    tags = _TAGS.get(arch, [])
    if tag is None:
        return tags[0] if tags else None
    for t in tags:
        if t.tag == tag:
            return t
    have = ", ".join(t.name for t in tags) if tags else "none"
    raise UnknownModelError(
        f"unknown pretrained tag {name!r}; {arch} has: {have} (see `tnt models --pretrained`)"
    )


def list_pretrained(pattern: str | None = None) -> list[str]:
    """Names with tags of every published set of weights (``tnt_s_patch16_224.in1k``, ...), sorted;
    ``pattern`` is a shell-style wildcard matched against the full name."""
    names = sorted(t.name for t in all_tags())
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def tag_named_by(value: str | os.PathLike) -> PretrainedTag | None:
    """The tag an option that takes a path or a name (``tnt train --pretrained``) names, or None for a path.

    An existing file or folder is a path; otherwise a registered architecture with a tag (or a bare one
    with a default tag) names published weights, and anything else is a path (reported missing when read).

    Raises:
        UnknownModelError: a registered architecture with a tag it does not have.
    """
    if Path(value).exists():
        return None
    arch, _ = split_name(str(value)) if str(value).count(".") <= 1 else (str(value), None)
    return get_pretrained_tag(str(value)) if arch in list_models() else None


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k category names, in class-index order, as torchvision ships them with its
    weights' metadata (no download: the list is in the package)."""
    from torchvision.models import ResNet50_Weights

    names = tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])
    if len(names) != 1000:  # pragma: no cover - a torchvision that changed its metadata
        raise RuntimeError(f"torchvision's ImageNet categories have {len(names)} names, not 1000")
    return names


def class_names_for(tag: PretrainedTag) -> tuple[str, ...] | None:
    """The class names of ``tag``'s classifier, when its labels are a known list."""
    return imagenet_class_names() if tag.labels == "imagenet-1k" else None
