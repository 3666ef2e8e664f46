"""Verifiers: a reward of 1 for a verifiably right completion, else 0.

`math`: the final answer (the text after the reasoning's </think>, without the end-of-sentence token)
equals the expected answer exactly (numbers compared as numbers). `calculator`: the completion calls the
calculator tool (Qwen3-Coder XML) with an expression whose value is the expected answer.
"""

import ast
import operator

from megajoy.data.chat import final_answer, parse_tool_calls

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def safe_eval(expression: str) -> float | None:
    """The value of an arithmetic expression (+ - * /, parentheses, numbers), or None."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError("not arithmetic")

    try:
        return float(value(ast.parse(expression.strip(), mode="eval").body))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def same_answer(got: str, want: str) -> bool:
    if got == want:
        return True
    try:
        return float(got) == float(want)
    except ValueError:
        return False


def math_reward(completion: str, answer: str) -> float:
    return float(same_answer(final_answer(completion), answer))


def calculator_reward(completion: str, answer: str) -> float:
    for call in parse_tool_calls(completion):
        if call["name"] == "calculator":
            result = safe_eval(call["arguments"].get("expression", ""))
            if result is not None and same_answer(str(result), answer):
                return 1.0
    return 0.0


VERIFIERS = {"math": math_reward, "calculator": calculator_reward}


def reward(completion: str, answer: str, verifier: str) -> float:
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r} (expected one of {sorted(VERIFIERS)})")
    return VERIFIERS[verifier](completion, answer)
