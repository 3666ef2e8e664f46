"""RL prompts: JSONL `{"messages": [...] | "prompt": "...", "answer": "...", "verifier": "math" |
"calculator", "domain": "...", "tools": [...], "thinking": bool}` rendered through the chat template with
the assistant's turn left open. Lines that cannot be used are counted by reason and reported."""

from dataclasses import dataclass

from megajoy.data.chat import ConversationError, opens_reasoning, render
from megajoy.data.jsonl import read_jsonl
from megajoy.data.sft import ChatTokenizer, LoadReport

VERIFIER_NAMES = ("math", "calculator")


@dataclass
class Prompt:
    ids: list[int]
    answer: str
    verifier: str
    domain: str
    source: dict
    thinking: bool = False  # the prompt opens a reasoning block (<think>) for the completion to close


def load_prompts(path: str, tokenizer: ChatTokenizer, max_tokens: int, mode: str = "auto") -> tuple[list[Prompt], LoadReport]:
    report, prompts = LoadReport("prompts"), []
    for number, obj in read_jsonl(path):
        if isinstance(obj.get("prompt"), str) and obj.get("messages") is None:  # null: absent, as for pairs
            obj = dict(obj, messages=[{"role": "user", "content": obj["prompt"]}])
        if obj.get("answer") is None:  # absent, or null (which would be checked against the text "None")
            report.count("no_answer", number)
            continue
        verifier = "math" if obj.get("verifier") is None else obj["verifier"]  # null: absent, as "thinking"
        if verifier not in VERIFIER_NAMES:
            report.count("unknown_verifier", number)
            continue
        try:
            pieces = render(obj, mode, generation_prompt=True)
            ids = tokenizer.encode(pieces).ids
        except ConversationError as e:
            report.count(e.kind, number)
            continue
        if len(ids) > max_tokens:
            report.count("too_long", number)
            continue
        domain = verifier if obj.get("domain") is None else str(obj["domain"])
        prompts.append(Prompt(ids, str(obj["answer"]), verifier, domain, obj, opens_reasoning(pieces)))
        report.kept += 1
    return prompts, report
