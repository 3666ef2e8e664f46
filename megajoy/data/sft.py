"""Chat data for SFT (and the prompts of DPO): JSONL conversations -> token ids with a trained flag per
token -> rows packed best-fit-decreasing, each conversation its own document (block-diagonal mask).

Conversations that cannot be trained on are counted by reason and reported once loading ends (no
assistant turn, unknown role, malformed structure, longer than a row: truncated or dropped); a line
that is not JSON stops loading with its file and line number.
"""

import bisect
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from tokenizers import AddedToken, Tokenizer

from megajoy.data.chat import TEMPLATE_TOKENS, TEXT_TOKENS, ConversationError, render
from megajoy.data.jsonl import read_jsonl
from megajoy.data.packing import Batch, stack
from megajoy.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, load_tokenizer


@dataclass
class Sample:
    ids: list[int]
    trained: list[bool]  # per token: is it predicted with a loss
    source: dict | None = None  # the conversation it came from


@dataclass
class LoadReport:
    noun: str = "conversations"
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_lines: dict = field(default_factory=dict)  # reason -> first line number

    def count(self, reason: str, line: int) -> None:
        self.dropped[reason] += 1
        self.first_lines.setdefault(reason, line)

    def summary(self, path: str) -> str:
        parts = [f"{self.kept} {self.noun} kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the sequence length")
        for reason, n in sorted(self.dropped.items()):
            parts.append(f"{n} dropped: {reason.replace('_', ' ')} (first at line {self.first_lines[reason]})")
        return f"{path}: " + "; ".join(parts)


def split_held_out(items: list, count: int, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random choice of `count` items held out, both lists in file order."""
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:count])
    return ([x for i, x in enumerate(items) if i not in held_out], [x for i, x in enumerate(items) if i in held_out])


class ChatTokenizer:
    """A tokenizer.json with the template's tokens, DeepSeek-V3's BOS and EOS among them (added when missing):
    special tokens, but for TEXT_TOKENS, which are plain added tokens (made so where the tokenizer has them as
    special ones)."""

    def __init__(self, path: str, vocab_size: int):
        self.tok = load_tokenizer(path)
        missing = [t for t in [BOS_TOKEN, EOS_TOKEN, *TEMPLATE_TOKENS] if self.tok.token_to_id(t) is None]
        self.tok.add_tokens([AddedToken(t, special=t not in TEXT_TOKENS, normalized=False) for t in missing])
        self._make_text_tokens_plain()
        if self.tok.get_vocab_size() > vocab_size:
            raise ValueError(f"{path}: with the chat template's tokens {missing} the tokenizer has "
                             f"{self.tok.get_vocab_size()} tokens, more than the model's vocab_size={vocab_size}; "
                             f"use a tokenizer that has them or a model with room for them")
        self.added = missing
        self.pad_id = self.tok.token_to_id(PAD_TOKEN) or 0

    def _make_text_tokens_plain(self) -> None:
        added = {t.content: t for t in self.tok.get_added_tokens_decoder().values()}
        special = [t for t in TEXT_TOKENS if t in added and added[t].special]
        if special:
            self.tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in special])
            self.tok = Tokenizer.from_str(self.tok.to_str())  # add_tokens leaves decode's set of specials stale

    def save(self, path: str) -> None:
        self.tok.save(path)

    def encode(self, pieces) -> Sample:
        """The pieces' text tokenized whole, as a chat template's text is (piece by piece, a SentencePiece-style
        tokenizer would start each with a space); a token is trained when the piece it starts in is."""
        text = "".join(piece.text for piece in pieces)
        encoding = self.tok.encode(text, add_special_tokens=False)
        ends = list(itertools.accumulate(len(piece.text) for piece in pieces))
        last = len(pieces) - 1
        trained = [pieces[min(bisect.bisect_right(ends, start), last)].trained for start, _ in encoding.offsets]
        return Sample(encoding.ids, trained)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def load_conversations(path: str, tokenizer: ChatTokenizer, max_tokens: int, overlong: str = "truncate",
                       mode: str = "auto") -> tuple[list[Sample], LoadReport]:
    """Tokenized conversations of at most `max_tokens` tokens, and what was dropped or cut."""
    report, samples = LoadReport(), []
    for number, obj in read_jsonl(path):
        try:
            sample = tokenizer.encode(render(obj, mode))
            sample.source = obj
        except ConversationError as e:
            report.count(e.kind, number)
            continue
        if len(sample.ids) > max_tokens:
            if overlong == "drop" or not any(sample.trained[1:max_tokens]):
                report.count("too_long", number)
                continue
            sample = Sample(sample.ids[:max_tokens], sample.trained[:max_tokens], obj)
            report.truncated += 1
        samples.append(sample)
        report.kept += 1
    return samples, report


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest first, each into the fullest bin it still fits (a new bin if none)."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (capacity - lengths[i], len(bins) - 1))
        else:
            space, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (space - lengths[i], b))
    return bins


def pack_rows(samples: list[Sample], seq_length: int, pad_id: int, pack: bool = True) -> list[Batch]:
    """One-row Batches of seq_length inputs. Each row holds seq_length + 1 tokens (inputs and the label
    of the last one); packed rows hold several whole conversations, unpacked ones one each."""
    capacity = seq_length + 1
    groups = best_fit_decreasing([len(s.ids) for s in samples], capacity) if pack else [[i] for i in
                                                                                        range(len(samples))]
    return [packed_row([samples[i] for i in group], capacity, pad_id) for group in groups]


def packed_row(samples: list[Sample], capacity: int, pad_id: int) -> Batch:
    """One row: the samples one after another, each its own document, then a padding document."""
    ids, trained, docs, positions = [], [], [], []
    for d, s in enumerate(samples):
        ids += s.ids
        trained += s.trained
        docs += [d] * len(s.ids)
        positions += range(len(s.ids))
    pad = capacity - len(ids)
    ids += [pad_id] * pad
    trained += [False] * pad
    docs += [len(samples)] * pad
    positions += range(pad)
    t = torch.tensor
    return Batch(input_ids=t([ids[:-1]]), labels=t([ids[1:]]), loss_mask=t([trained[1:]], dtype=torch.float32),
                 position_ids=t([positions[:-1]]), document_ids=t([docs[:-1]]),
                 padding_mask=t([([False] * (capacity - pad) + [True] * pad)[:-1]]))


def padding_fraction(rows: list[Batch], pad_id: int) -> float:
    """Share of input positions that hold padding (the pad document at the end of each row)."""
    total = sum(r.tokens for r in rows)
    pad = sum(int((r.document_ids == r.document_ids[:, -1:]).sum()) for r in rows
              if bool(r.input_ids[0, -1] == pad_id))
    return pad / max(total, 1)


class RowSchedule:
    """Rows served by sample position: a fresh seeded shuffle every epoch, so a checkpoint's consumed
    count is all that resuming needs."""

    def __init__(self, rows: list[Batch], seed: int):
        if not rows:
            raise ValueError("RowSchedule: no rows to serve (the stages refuse empty data first, naming the file)")
        self.rows, self.seed = rows, seed
        self._epoch, self._order = None, None

    def row(self, position: int) -> Batch:
        epoch, offset = divmod(position, len(self.rows))
        if epoch != self._epoch:
            self._order = list(range(len(self.rows)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self.rows[self._order[offset]]

    def micro_batches(self, consumed: int, global_batch: int, micro: int, rank: int = 0, world: int = 1) -> list[Batch]:
        step = micro * world
        return [stack([self.row(i) for i in range(start + rank * micro, start + (rank + 1) * micro)])
                for start in range(consumed, consumed + global_batch, step)]
