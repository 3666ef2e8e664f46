"""Pretraining data through megatron-core: GPTDataset samples from one or more Megatron prefixes,
blended with weights in Megatron's syntax (`0.7 pathA 0.3 pathB`), split into train / valid."""

import contextlib
import logging
import math
import os
import re

import torch.distributed as dist

from megajoy.data.indexed import check_indexed_dataset, sequence_lengths
from megajoy.data.tokenizer import MegatronTokenizerShim, TokenizerInfo


def parse_blend(items: list[str]) -> tuple[list[str], list[float] | None]:
    """['0.7', 'a', '0.3', 'b'] -> (['a', 'b'], [0.7, 0.3]); ['a', 'b'] -> (['a', 'b'], None)."""
    items = [part for item in items for part in item.split()]
    if not items:
        raise ValueError("--data-path is empty")
    try:
        float(items[0])
    except ValueError:
        return items, None
    given = " ".join(items)
    if len(items) % 2:
        raise ValueError(f"--data-path {given}: weights and prefixes must alternate (WEIGHT PREFIX ...)")
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        raise ValueError(f"--data-path {given}: {items[0::2]} are not all numbers") from None
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"--data-path {given}: the weights must be positive numbers (leave a prefix out rather than "
                         f"give it weight 0)")
    return items[1::2], weights


def parse_split(split: str) -> list[float]:
    """Megatron's --split '98,2,0' -> train, valid, test fractions. Read as megatron-core reads it (every
    run of digits and dots is a share, missing shares are 0), refusing what it would misread silently:
    signs, exponents, letters."""
    unread = re.sub(r"[.0-9]+|[\s,/\[\]()]", "", split)
    try:
        values = [float(share) for share in re.findall(r"[.0-9]+", split)]
    except ValueError:  # "1.2.3"
        values = []
    if unread or not 1 <= len(values) <= 3:
        raise ValueError(f"--split {split!r}: expected up to three shares, train,valid,test (e.g. 98,2,0)")
    if sum(values) <= 0:
        raise ValueError(f"--split {split!r}: the shares are all zero")
    values += [0.0] * (3 - len(values))
    return [value / sum(values) for value in values]


def build_gpt_datasets(blend: list[str], split: str, seq_length: int, train_samples: int, valid_samples: int,
                       seed: int, tokenizer: TokenizerInfo, cache_dir: str):
    """(train, valid) datasets of megatron-core; each item holds `tokens`, `labels`, `loss_mask` (padding
    masked) as seq_length-long tensors."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(blend)
    for prefix in prefixes:
        check_indexed_dataset(prefix)
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    os.makedirs(cache_dir, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, weights), split=split,
        path_to_cache=cache_dir, tokenizer=MegatronTokenizerShim(tokenizer), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
    )
    # megajoy derives positions, document ids and the EOD loss mask itself (packing.py), vectorised.
    _check_every_split_holds_tokens(prefixes, split, config.split_matrix)
    with _process_group():
        train, valid, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build()
    if train is None or len(train) == 0:
        raise ValueError(f"--split {split} leaves no training data in {prefixes}")
    _check_enough_samples(prefixes, {"training": (train, train_samples), "validation": (valid, valid_samples)})
    return train, valid


_SPLIT_NAMES = ("training", "validation", "test")


def _check_every_split_holds_tokens(prefixes: list[str], split: str, split_matrix: list) -> None:
    """megatron-core cuts each prefix's documents by the split shares and builds every split with a share; one
    that gets no tokens of a prefix makes it loop forever looking for samples (weighted or single prefix) or
    fail an assert (unweighted blend). Name the prefix and split instead."""
    for prefix in prefixes:
        lengths = sequence_lengths(prefix)
        for name, bounds in zip(_SPLIT_NAMES, split_matrix):
            if bounds is None:
                continue
            begin, end = (int(round(bound * len(lengths))) for bound in bounds)  # as megatron-core rounds
            if int(lengths[begin:end].sum()) == 0:
                raise ValueError(f"--split {split} gives {prefix} no {name} documents (of its {len(lengths)}, "
                                 f"documents {begin} to {end}); give the {name} split a larger share, or 0")


def _check_enough_samples(prefixes: list[str], splits: dict) -> None:
    """A blend of several prefixes without weights is one epoch of each (megatron-core caps it there): refuse a
    run that needs more than that now, not with an IndexError once training reaches the end of the epoch."""
    for name, (dataset, needed) in splits.items():
        if dataset is not None and len(dataset) < needed:
            raise ValueError(f"--data-path {' '.join(prefixes)}: {len(dataset)} {name} samples, fewer than the "
                             f"{needed} the run needs; a blend without weights is one epoch of each prefix, give "
                             f"weights (WEIGHT PREFIX ...) to sample more")


@contextlib.contextmanager
def _process_group():
    """megatron-core's BlendedDataset asks torch.distributed for the rank even in a single process;
    give it a one-rank group for the duration when none exists."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
