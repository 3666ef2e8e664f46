"""Built-in post-training demo data, generated locally: single-digit arithmetic with and without thinking
traces, short instruction tasks, calculator tool calls (Qwen3-Coder XML), and preference pairs whose
rejected answer is wrong. Every item has one exact answer, so held-out exact match is the metric."""

import json
import os
import random

CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
WORDS = "cat dog bird fish tree lamp book cup star moon".split()


def arithmetic(rng: random.Random, thinking: bool) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice("+-")
    answer = a + b if op == "+" else a - b
    message = {"role": "assistant", "content": str(answer)}
    if thinking:
        message["reasoning_content"] = f"{a} {op} {b} = {answer}."
    return {"messages": [{"role": "user", "content": f"What is {a} {op} {b}?"}, message], "answer": str(answer)}


def instruction(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    task, answer = rng.choice([("Repeat the word", word), ("Write in capitals", word.upper()),
                               ("Write twice", f"{word} {word}")])
    return {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": f"{task}: {word}"},
                         {"role": "assistant", "content": answer}], "answer": answer}


def tool_use(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    expression, answer = f"{a} * {b}", str(a * b)
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return {"tools": [CALCULATOR], "messages": [
        {"role": "user", "content": f"Use the calculator: {expression}"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": answer},
        {"role": "assistant", "content": answer}], "answer": answer}


def sft_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    makers = [lambda: arithmetic(rng, True), lambda: arithmetic(rng, False), lambda: instruction(rng),
              lambda: tool_use(rng)]
    return [rng.choice(makers)() for _ in range(n)]


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """{"messages": prompt, "chosen": right answer turn, "rejected": a wrong one}."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        item = arithmetic(rng, False) if rng.random() < 0.7 else instruction(rng)
        prompt, right = item["messages"][:-1], item["messages"][-1]["content"]
        wrong = str(int(right) + rng.choice([-3, -2, -1, 1, 2, 3])) if right.lstrip("-").isdigit() else right[::-1] + "s"
        pairs.append({"messages": prompt, "chosen": {"role": "assistant", "content": right},
                      "rejected": {"role": "assistant", "content": wrong}, "answer": right})
    return pairs


def write_jsonl(path: str, items: list[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def rl_prompts(n: int, seed: int = 0) -> list[dict]:
    """Prompts with verifiable answers: arithmetic (half of it in thinking mode; checked exactly) and
    calculator tool calls (checked by evaluating the call's expression)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        if rng.random() < 0.75:
            item = arithmetic(rng, thinking=False)
            prompts.append({"messages": item["messages"][:1], "answer": item["answer"], "verifier": "math",
                            "domain": "arithmetic", "thinking": rng.random() < 0.5})
        else:
            item = tool_use(rng)
            prompts.append({"tools": item["tools"], "messages": item["messages"][:1], "answer": item["answer"],
                            "verifier": "calculator", "domain": "tool", "thinking": False})
    return prompts
