"""Preference pairs for DPO. A JSONL line holds a prompt and two responses:

    {"prompt": "..." | [messages], "chosen": ..., "rejected": ...}      (or "messages" for the prompt)

where a response is a string (the assistant's answer), one assistant message, or a list of messages; or
TRL's implicit-prompt form, {"chosen": [messages], "rejected": [messages]}, whose shared first messages
are the prompt.
Each side renders as prompt + response through the chat template, trained (scored) on the response's
assistant tokens only. Packed rows keep a pair's two sequences side by side: document 2k of a row is
pair k's chosen sequence, document 2k + 1 its rejected one, so the loss finds the pairs from the
document ids alone.
"""

from dataclasses import dataclass

from megajoy.data.chat import ConversationError, render, thinking_mode
from megajoy.data.jsonl import read_jsonl
from megajoy.data.packing import Batch
from megajoy.data.sft import ChatTokenizer, LoadReport, Sample, best_fit_decreasing, packed_row


@dataclass
class Pair:
    chosen: Sample
    rejected: Sample
    source: dict

    @property
    def length(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)


def given_prompt(obj: dict):
    """The pair's "messages", else its "prompt", else None. A null field is an absent one (Hugging Face
    `datasets` writes a column a row lacks as null)."""
    return obj["messages"] if obj.get("messages") is not None else obj.get("prompt")


def explicit_prompt(obj: dict) -> dict:
    """A pair in TRL's implicit-prompt form split as TRL's extract_prompt splits it: the messages both sides
    begin with are the prompt, the rest the responses. Other pairs as they are."""
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    if given_prompt(obj) is not None or not (isinstance(chosen, list) and isinstance(rejected, list)):
        return obj
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return dict(obj, prompt=chosen[:shared], chosen=chosen[shared:], rejected=rejected[shared:])


def prompt_messages(obj: dict) -> list[dict]:
    prompt = given_prompt(obj)
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ConversationError("malformed", "a pair needs a \"prompt\" (string or messages) or \"messages\"")
    return prompt


def response_messages(obj: dict, key: str) -> list[dict]:
    response = obj.get(key)
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if isinstance(response, dict):
        return [response]
    if isinstance(response, list) and response:
        return response
    raise ConversationError("malformed", f"\"{key}\" must be a string, a message or a list of messages")


def tokenize_pair(obj: dict, tokenizer: ChatTokenizer, mode: str = "auto") -> Pair:
    """Both sides in one template mode (thinking when either side's conversation would think)."""
    obj = explicit_prompt(obj)
    prompt = prompt_messages(obj)
    sides = [dict(obj, messages=prompt + response_messages(obj, key)) for key in ("chosen", "rejected")]
    if mode == "auto":
        mode = "on" if any(thinking_mode(side) for side in sides) else "off"
    chosen, rejected = (tokenizer.encode(render(side, mode, train_from=len(prompt))) for side in sides)
    return Pair(chosen, rejected, obj)


def load_pairs(path: str, tokenizer: ChatTokenizer, max_tokens: int, overlong: str = "truncate",
               mode: str = "auto") -> tuple[list[Pair], LoadReport]:
    """Pairs whose two sequences fit in `max_tokens` together. Overlong pairs are dropped or have each
    side cut to half the row, as long as both keep some response tokens. Pairs whose two sequences are the
    same tokens (as given, or once cut) are dropped: their DPO loss is ln 2 whatever the policy, with no
    gradient, and they would hold the reward accuracy down."""
    report, pairs = LoadReport("pairs"), []
    for number, obj in read_jsonl(path):
        try:
            pair = tokenize_pair(obj, tokenizer, mode)
        except ConversationError as e:
            report.count(e.kind, number)
            continue
        truncated = pair.length > max_tokens
        if truncated:
            half = max_tokens // 2
            cut = [Sample(s.ids[:half], s.trained[:half]) for s in (pair.chosen, pair.rejected)]
            if overlong == "drop" or not all(any(s.trained[1:]) for s in cut):
                report.count("too_long", number)
                continue
            pair = Pair(cut[0], cut[1], pair.source)  # the split pair, as an uncut one keeps
        if pair.chosen.ids == pair.rejected.ids:
            report.count("identical_responses", number)
            continue
        pairs.append(pair)
        report.kept += 1
        report.truncated += truncated
    return pairs, report


def pack_pairs(pairs: list[Pair], seq_length: int, pad_id: int) -> list[Batch]:
    """One-row Batches of seq_length inputs holding whole pairs, packed best-fit-decreasing."""
    capacity = seq_length + 1
    groups = best_fit_decreasing([p.length for p in pairs], capacity)
    return [packed_row([s for i in group for s in (pairs[i].chosen, pairs[i].rejected)], capacity, pad_id)
            for group in groups]
