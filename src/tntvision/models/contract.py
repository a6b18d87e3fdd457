"""What code written for timm reads off a model besides its methods: ``pretrained_cfg`` and ``feature_info``.

timm's data pipeline (``timm.data.resolve_model_data_config``), its train / validate scripts and the
segmentation and detection wrappers built on timm backbones read two attributes: ``model.pretrained_cfg``
(alias ``default_cfg``), a dict of what the model expects of its input and where its stem and head are,
and ``model.feature_info``, the feature levels with their channels and strides. This module gives both,
derived from what the model already holds (its frozen config and its :class:`ModelMeta`), so they cannot
disagree with the model. timm itself is never imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .registry import ModelMeta

__all__ = ["FeatureInfo", "TimmContract", "resolved_meta"]

LICENSE = "apache-2.0"  # the released TNT / PyramidTNT weights (huawei-noah/Efficient-AI-Backbones) and ours


class FeatureInfo(list):
    """The feature levels a model returns: a list of dicts, one per returned level, with timm's accessors.

    Each dict has ``module`` (where the map comes from, e.g. ``"blocks.11"``), ``num_chs`` and
    ``reduction`` (stride in pixels). As a list it holds the levels that are returned, in order, so
    ``zip(maps, feature_info)`` pairs every map with its entry. Like timm's ``FeatureInfo`` it also keeps
    every level of the model in ``info`` and the chosen ones in ``out_indices``; ``channels()``,
    ``reduction()`` and ``module_name()`` give the returned levels' values, and with ``idx`` (an int or a
    list) the values of those levels of the model, whether returned or not.
    """

    def __init__(self, levels: Iterable[dict[str, Any]], out_indices: Sequence[int] | None = None) -> None:
        self.info: list[dict[str, Any]] = [dict(level) for level in levels]
        n = len(self.info)
        self.out_indices: tuple[int, ...] = tuple(range(n) if out_indices is None else out_indices)
        super().__init__(self.info[i] for i in self.out_indices)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        """The same levels with other ones returned."""
        return FeatureInfo(self.info, out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """``key`` of every returned level (``idx=None``), of level ``idx`` (an int) or of levels ``idx``."""
        if idx is None:
            return [level[key] for level in self]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def get_dicts(
        self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The dicts (restricted to ``keys`` if given) of the levels ``idx`` selects, as :meth:`get` does."""

        def pick(level: dict[str, Any]) -> dict[str, Any]:
            return dict(level) if keys is None else {k: level[k] for k in keys}

        if isinstance(idx, int):
            return pick(self.info[idx])
        levels = list(self) if idx is None else [self.info[i] for i in idx]
        return [pick(level) for level in levels]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)


def resolved_meta(model: Any, meta: ModelMeta | None = None) -> ModelMeta:
    """``meta`` (default: the model's own) made true to the model config's channel count and image size.

    A model built by :func:`~tntvision.create_model` or loaded from a folder carries its variant's
    :class:`ModelMeta`; a bare ``TNT(cfg)`` falls back to the ImageNet defaults.
    """
    meta = meta or getattr(model, "meta", None) or ModelMeta()
    return meta.resolved(in_chans=model.cfg.in_chans, img_size=model.cfg.img_size)


class TimmContract:
    """Mixin giving a model timm's ``pretrained_cfg`` / ``default_cfg``, derived on every access.

    The class sets ``first_conv`` (the stem's first conv, whose weights change with ``in_chans``) and
    ``paper_ids``, and implements :meth:`min_input_size_of` and :meth:`pool_size_of` from a config; the
    model instance has ``cfg``, ``meta``, ``model_name``, ``class_names`` and ``pretrained_tag`` (the
    source, reported top-1 and license of the tag's weights join the dict). The dict is rebuilt from
    those on every access, so it follows ``reset_classifier``, config overrides and loaded metadata;
    writing to it changes nothing (change ``model.meta`` instead).
    """

    first_conv: str = ""
    paper_ids: str = ""

    @classmethod
    def min_input_size_of(cls, cfg: Any) -> tuple[int, int, int]:
        """The smallest (C, H, W) a model of config ``cfg`` runs on."""
        raise NotImplementedError

    @classmethod
    def pool_size_of(cls, cfg: Any) -> tuple[int, int] | None:
        """The grid of the last feature map at the config's input size, for models whose output has one."""
        return None

    @classmethod
    def pretrained_cfg_of(
        cls, cfg: Any, meta: ModelMeta, *, architecture: str | None, class_names: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """timm's keys with timm's meanings, for a model of config ``cfg`` and input metadata ``meta``."""
        meta = meta.resolved(in_chans=cfg.in_chans, img_size=cfg.img_size)
        out: dict[str, Any] = {
            "architecture": architecture,
            "input_size": meta.input_size,
            "min_input_size": cls.min_input_size_of(cfg),
            "fixed_input_size": False,  # any size the model's patching divides (position tables resample)
            "pool_size": cls.pool_size_of(cfg),
            "interpolation": meta.interpolation,
            "crop_pct": meta.crop_pct,
            "crop_mode": "center",
            "mean": meta.mean,
            "std": meta.std,
            "num_classes": cfg.num_classes,
            "first_conv": cls.first_conv,
            "classifier": "head",
            "license": LICENSE,
            "paper_ids": cls.paper_ids,
        }
        if class_names is not None:
            out["label_names"] = tuple(class_names)
        return out

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Input size, normalisation, eval crop, stem, head and license, as timm's ``pretrained_cfg``."""
        meta = resolved_meta(self)
        out = self.pretrained_cfg_of(
            self.cfg, meta, architecture=self.model_name, class_names=self.class_names
        )
        tag = getattr(self, "pretrained_tag", None)
        if tag is not None:  # where the tag's weights come from and what their publisher reports
            out.update(tag.cfg())
        return out

    @property
    def default_cfg(self) -> dict[str, Any]:
        """The same dict as :attr:`pretrained_cfg` (timm's older name for it)."""
        return self.pretrained_cfg
