"""The pretraining data source: megatron-core GPT datasets (or the built-in corpus) served as packed
micro-batches, addressed by the number of samples consumed so far (the data position a checkpoint
stores)."""

import os

from megajoy.data.gpt import build_gpt_datasets, parse_blend
from megajoy.data.indexed import check_indexed_dataset, token_id_range
from megajoy.data.packing import Batch, pack_samples
from megajoy.data.tokenizer import TokenizerInfo


def resolve_data(job) -> tuple[list[str], TokenizerInfo]:
    """(blend, tokenizer) for a job: its --data-path and --tokenizer, or the built-in corpus."""
    data = job.data
    if data.data_path is None:
        if data.tokenizer is not None or data.eod_token is not None:
            raise ValueError("--tokenizer and --eod-token need --data-path: the built-in corpus is tokenized with its "
                             "own tokenizer")
        from megajoy.data.corpus import builtin_corpus

        manifest = builtin_corpus(job.model.vocab_size, data.builtin_corpus_mb, workers=data.num_workers)
        return [manifest["prefix"]], TokenizerInfo.from_file(manifest["tokenizer"])
    if data.tokenizer is None:
        raise ValueError("--data-path needs --tokenizer (the tokenizer.json the data was preprocessed with)")
    return list(data.data_path), TokenizerInfo.from_file(data.tokenizer, data.eod_token)


def check_vocab(tokenizer: TokenizerInfo, blend: list[str], vocab_size: int) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{tokenizer.path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                         f"vocab_size={vocab_size}")
    for prefix in parse_blend(blend)[0]:
        check_indexed_dataset(prefix)
        smallest, largest, whole = token_id_range(prefix)
        if smallest < 0 or largest >= vocab_size:
            where = "" if whole else " (in the scanned head and tail)"
            bad = smallest if smallest < 0 else largest
            raise ValueError(f"{prefix}.bin: token id {bad}{where} is outside the model's vocab_size={vocab_size} "
                             f"(ids 0 to {vocab_size - 1})")


class PretrainData:
    def __init__(self, job, blend: list[str], tokenizer: TokenizerInfo, train_samples: int, valid_samples: int):
        cache = job.data.data_cache_path or os.path.join(job.checkpoint.out, "data_cache")
        self.train, self.valid = build_gpt_datasets(blend, job.data.split, job.data.seq_length, train_samples,
                                                    valid_samples, job.train.seed, tokenizer, cache)
        self.eod = tokenizer.eod
        self.eod_mask_loss = job.data.eod_mask_loss
        self.valid_samples = valid_samples

    def _batch(self, dataset, indices) -> Batch:
        return pack_samples([dataset[int(i)] for i in indices], self.eod, self.eod_mask_loss)

    def train_micro_batches(self, consumed: int, global_batch: int, micro: int, rank: int = 0,
                            world: int = 1) -> list[Batch]:
        """This data-parallel rank's micro-batches of the step starting at sample `consumed`: the
        global batch is cut into micro-batches of micro * world samples, and rank r takes its slice of each."""
        step = micro * world
        return [self._batch(self.train, range(start + rank * micro, start + (rank + 1) * micro))
                for start in range(consumed, consumed + global_batch, step)]

    def valid_micro_batches(self, micro: int, rank: int = 0, world: int = 1) -> list[Batch]:
        """The same fixed validation samples at every evaluation."""
        if self.valid is None or self.valid_samples == 0:
            return []
        step = micro * world
        return [self._batch(self.valid, range(start + rank * micro, start + (rank + 1) * micro))
                for start in range(0, self.valid_samples, step)]
