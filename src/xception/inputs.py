"""Which input pipeline a run gets (--loader, and a shard set as --data_path): the one place trainer.py
asks, so the pipelines themselves stay in decode.py, shards.py and dali.py."""

from __future__ import annotations

from .config import UserError


def folder_dataset(split, cfg, train: bool):
    """An image-folder split as a map-style dataset: the uint8 fast path (tv, auto) or the PIL one."""
    from .data import FolderDataset, eval_transform, train_transform
    if cfg.loader == "pil":
        return FolderDataset(split, train_transform(cfg) if train else eval_transform(cfg.image_size,
                                                                                     cfg.crop_pct))
    from .decode import EvalTransform, FastFolderDataset, TrainTransform
    transform = (TrainTransform(cfg.image_size, cfg.crop_scale, cfg.hflip) if train
                 else EvalTransform(cfg.image_size, cfg.crop_pct))
    return FastFolderDataset(split, transform)


def streamed_loaders(cfg, ctx, need_train: bool, log=print):
    """(classes, train loader or None, val loader) for a shard set or --loader dali; None for an image
    folder read by the map-style datasets."""
    from .shards import is_shard_source, make_shard_loaders
    shard_set = bool(cfg.data_path) and is_shard_source(cfg.data_path)
    if cfg.loader == "dali":
        if shard_set:
            raise UserError("--loader dali reads image folders; for a shard set use --loader tv (or auto)")
        from .dali import make_dali_loaders
        return make_dali_loaders(cfg, ctx, need_train, log)
    if shard_set:
        if cfg.loader == "pil":
            log("warning: --loader pil does not apply to a shard set; reading it with the uint8 pipeline")
        return make_shard_loaders(cfg, ctx, need_train, log)
    return None
