"""Verifiers: a reward of 1 for a verifiably right completion, else 0.

A prompt in thinking mode opens a reasoning block: a completion that never closes it (</think>) gave no
answer, whatever its reasoning says.
`math`: the final answer (the text after the reasoning's </think>, without the end-of-sentence token)
equals the expected answer exactly (numbers compared as numbers). `calculator`: the answer (after the
reasoning: a call the model only thinks about is not made) calls the calculator tool (Qwen3-Coder XML) with an
expression whose value is the expected answer, evaluated in exact rational arithmetic as a calculator would
(0.1 + 0.2 is 0.3).
"""

import ast
import operator
from fractions import Fraction

from megajoy.data.chat import final_answer, parse_tool_calls

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.USub: operator.neg, ast.UAdd: operator.pos}


def safe_eval(expression: str) -> Fraction | None:
    """The exact value of an arithmetic expression (+ - * /, parentheses, numbers), or None. Decimal
    literals are read as the decimals they spell, not as their binary floats."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return Fraction(str(node.value))  # ValueError for a literal beyond float's range (inf)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError("not arithmetic")

    try:
        return value(ast.parse(expression.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def same_answer(got: str, want: str) -> bool:
    if got == want:
        return True
    try:
        return float(got) == float(want)
    except ValueError:
        return False


def same_value(value: Fraction, answer: str) -> bool:
    """The exact value equals the answer, exactly or as the float the answer spells (1/3 is 0.3333333333333333)."""
    try:
        want = Fraction(answer.strip())
        return value == want or float(value) == float(want)
    except (ValueError, ZeroDivisionError, OverflowError):
        return False


def math_reward(completion: str, answer: str) -> float:
    return float(same_answer(final_answer(completion), answer))


def calculator_reward(completion: str, answer: str) -> float:
    for call in parse_tool_calls(final_answer(completion)):
        if call["name"] == "calculator":
            result = safe_eval(call["arguments"].get("expression", ""))
            if result is not None and same_value(result, answer):
                return 1.0
    return 0.0


VERIFIERS = {"math": math_reward, "calculator": calculator_reward}


def reward(completion: str, answer: str, verifier: str, thinking: bool = False) -> float:
    """`thinking`: the prompt opened a reasoning block for the completion."""
    if verifier not in VERIFIERS:
        raise ValueError(f"unknown verifier {verifier!r} (expected one of {sorted(VERIFIERS)})")
    if final_answer(completion, thinking) is None:
        return 0.0
    return VERIFIERS[verifier](completion, answer)
