"""The chat template: DeepSeek-V3-style special tokens, `<think>` for the thinking mode, tool calls in
Qwen3-Coder's XML style. A conversation renders to pieces of text, each marked trained or not; the
tokens of the trained pieces are the only ones with a loss.

    <｜begin▁of▁sentence｜>{system}{tools}
    <｜User｜>{user}<｜Assistant｜><think>{reasoning}</think>{content}{tool calls}<｜end▁of▁sentence｜>
    <｜tool▁output▁begin｜>{tool result}<｜tool▁output▁end｜>

Thinking mode opens the answer with `<think>` (part of the prompt) and trains the reasoning, `</think>`
and the answer. The non-thinking form puts an empty `</think>` in the prompt instead, so the model
learns to answer directly after it; earlier turns of a thinking conversation (before its last user
message) are rendered that way too, their reasoning dropped, as DeepSeek-V3.1 does. A tool call:

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>
"""

import json
from dataclasses import dataclass

from megajoy.data.tokenizer import BOS_TOKEN, EOS_TOKEN

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_OUTPUT, END_TOOL_OUTPUT = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TEMPLATE_TOKENS = [USER, ASSISTANT, THINK, END_THINK, TOOL_CALL, END_TOOL_CALL, TOOL_OUTPUT, END_TOOL_OUTPUT]
# Marks a reply's reasoning and tool calls are read back by: plain added tokens ("special": false), as in Qwen3's
# and DeepSeek-R1's tokenizers, so that decoding with skip_special_tokens (transformers' pipelines, vLLM) keeps them.
TEXT_TOKENS = [THINK, END_THINK, TOOL_CALL, END_TOOL_CALL]
ROLES = ("system", "user", "assistant", "tool")


class ConversationError(ValueError):
    """A conversation that cannot be trained on; `kind` is how it is counted."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class Piece:
    text: str
    trained: bool


def thinking_mode(conversation: dict, mode: str = "auto") -> bool:
    """`on` / `off`, or `auto`: the conversation's own "thinking" field (true / false; null or absent:
    undecided), else whether any assistant turn carries reasoning_content."""
    if mode != "auto":
        return mode == "on"
    flag = conversation.get("thinking")
    if flag is not None:
        if not isinstance(flag, bool):
            raise ConversationError("malformed", f"\"thinking\" must be true, false or null, got {flag!r}")
        return flag
    messages = conversation.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and m.get("role") == "assistant" and m.get("reasoning_content") for m in messages)


def render(conversation: dict, mode: str = "auto", generation_prompt: bool = False,
           train_from: int = 0) -> list[Piece]:
    """The pieces the model sees. With `generation_prompt`, a final assistant turn is left open (for
    generation) instead of being required. Assistant turns before message `train_from` are context only
    (a DPO response is trained, the prompt's earlier answers are not)."""
    messages = conversation.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConversationError("malformed", "\"messages\" must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict):
            raise ConversationError("malformed", f"a message must be an object, got {m!r}")
        if m.get("role") not in ROLES:
            raise ConversationError("unknown_role", f"unknown role {m.get('role')!r} (expected one of {ROLES})")
    if not generation_prompt and not any(m["role"] == "assistant" for m in messages[train_from:]):
        raise ConversationError("no_assistant", "no assistant turn to train on")
    thinking = thinking_mode(conversation, mode)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user") if any(
        m["role"] == "user" for m in messages) else -1
    pieces = [Piece(BOS_TOKEN + system_prompt(messages, conversation.get("tools")), False)]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            pieces.append(Piece(USER + _text(m), False))
        elif m["role"] == "tool":
            pieces.append(Piece(TOOL_OUTPUT + _text(m) + END_TOOL_OUTPUT, False))
        elif m["role"] == "assistant":
            pieces.extend(_assistant(m, thinking and i > last_user, trained=i >= train_from))
    if generation_prompt:
        pieces.append(Piece(ASSISTANT + (THINK if thinking else END_THINK), False))
    return pieces


def system_prompt(messages: list[dict], tools) -> str:
    text = "".join(_text(m) for m in messages if m["role"] == "system")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ConversationError("malformed", f"\"tools\" must be a list of objects, got {tools!r}")
    if tools:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        text += "\n\n# Tools\n<tools>\n" + listing + "\n</tools>"
    return text


def _assistant(m: dict, thinking: bool, trained: bool = True) -> list[Piece]:
    calls, reasoning = m.get("tool_calls") or [], m.get("reasoning_content") or ""
    if not isinstance(calls, list):
        raise ConversationError("malformed", f"\"tool_calls\" must be a list, got {type(calls).__name__}")
    if not isinstance(reasoning, str):
        raise ConversationError("malformed", f"\"reasoning_content\" must be a string, got {type(reasoning).__name__}")
    answer = _text(m) + "".join(tool_call_text(call) for call in calls)
    if thinking:
        return [Piece(ASSISTANT + THINK, False), Piece(reasoning + END_THINK + answer + EOS_TOKEN, trained)]
    return [Piece(ASSISTANT + END_THINK, False), Piece(answer + EOS_TOKEN, trained)]


def tool_call_text(call: dict) -> str:
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or "name" not in function:
        raise ConversationError("malformed", f"tool call {call!r} has no function name")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise ConversationError("malformed", f"tool call arguments {arguments!r} are not JSON") from None
    if not isinstance(arguments, dict):
        raise ConversationError("malformed", f"tool call arguments {arguments!r} are not a JSON object")
    params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                     for k, v in arguments.items())
    return f"{TOOL_CALL}\n<function={function['name']}>\n{params}</function>\n{END_TOOL_CALL}"


# The template above for Hugging Face's apply_chat_template (and engines that read tokenizer_config.json's
# chat_template): the same text as render(), for messages / tools / add_generation_prompt and `thinking`
# (true / false; unset: auto, as thinking_mode), each assistant turn's trained text in a {% generation %} block
# (return_assistant_tokens_mask, TRL's assistant_only_loss, masks what render() trains; llama.cpp ignores the
# block). Tool-call arguments must be objects (Jinja cannot parse a JSON string); anything render() refuses raises.
# '<parameter=' is assembled from two pieces because llama.cpp hands any template whose source holds <tool_call>,
# <function= and <parameter= to its Qwen3-Coder parser, which expects Qwen's <|im_start|>assistant before every
# reply and so refuses all of this template's; without the match it derives the parser from the template itself,
# and reads replies, reasoning and tool calls right.
JINJA_TEMPLATE = (
    "{%- set ns = namespace(system='', last_user=-1, thinking=false) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is defined and m['content'] is not none and m['content'] is not string -%}"
    "{{- raise_exception(m['role'] + ' content must be a string') -}}{%- endif -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + (m['content'] or '') -%}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- if m['role'] == 'assistant' and m['reasoning_content'] -%}{%- set ns.thinking = true -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if thinking is defined -%}{%- set ns.thinking = thinking -%}{%- endif -%}"
    "{{- '" + BOS_TOKEN + "' + ns.system -}}"
    "{%- if tools -%}{{- '\n\n# Tools\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\n' + tool | tojson -}}{%- endfor -%}"
    "{{- '\n</tools>' -}}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '" + USER + "' + (m['content'] or '') -}}"
    "{%- elif m['role'] == 'tool' -%}{{- '" + TOOL_OUTPUT + "' + (m['content'] or '') + '" + END_TOOL_OUTPUT + "' -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set reasons = ns.thinking and loop.index0 > ns.last_user -%}"
    "{{- '" + ASSISTANT + "' + ('" + THINK + "' if reasons else '" + END_THINK + "') -}}"
    "{%- generation -%}"
    "{%- if reasons -%}{{- (m['reasoning_content'] or '') + '" + END_THINK + "' -}}{%- endif -%}"
    "{{- m['content'] or '' -}}"
    "{%- for call in m['tool_calls'] or [] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "{%- set arguments = f['arguments'] or {} -%}"
    "{%- if arguments is string -%}{{- raise_exception('tool call arguments must be a JSON object') -}}{%- endif -%}"
    "{{- '" + TOOL_CALL + "\n<function=' + f['name'] + '>\n' -}}"
    "{%- for k, v in arguments.items() -%}"
    "{{- '<param' + 'eter=' + k + '>\n' -}}"
    "{{- (v if v is string else v | tojson(ensure_ascii=true)) + '\n</parameter>\n' -}}"
    "{%- endfor -%}"
    "{{- '</function>\n" + END_TOOL_CALL + "' -}}"
    "{%- endfor -%}"
    "{{- '" + EOS_TOKEN + "' -}}"
    "{%- endgeneration -%}"
    "{%- elif m['role'] != 'system' -%}{{- raise_exception('unknown role ' + m['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "' + ('" + THINK + "' if ns.thinking else '" + END_THINK
    + "') -}}{%- endif -%}"
)


def chat_template_for(tokenizer_file: str):
    """The chat template a model with this tokenizer is served with: that of the tokenizer_config.json
    beside it (a Hugging Face model's own; a Jinja string or a list of named ones), else megajoy's when the
    tokenizer has its template tokens (an SFT, DPO or RL checkpoint's), else None."""
    from megajoy.data.tokenizer import load_tokenizer, tokenizer_config_beside

    path = tokenizer_config_beside(tokenizer_file)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return config.get("chat_template") if isinstance(config, dict) else None
    return megajoy_chat_template(load_tokenizer(tokenizer_file))


def megajoy_chat_template(tokenizer) -> str | None:
    """JINJA_TEMPLATE if the (loaded) tokenizer has the template's tokens, else None."""
    return JINJA_TEMPLATE if all(tokenizer.token_to_id(t) is not None for t in TEMPLATE_TOKENS) else None


def _text(m: dict) -> str:
    content = m.get("content")
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ConversationError("malformed", f"{m['role']} content must be a string, got {type(content).__name__}")
    return content


def opens_reasoning(prompt: list[Piece]) -> bool:
    """Whether a generation prompt leaves the model inside a reasoning block (thinking mode)."""
    return prompt[-1].text.endswith(THINK)


def final_answer(completion: str, thinking: bool = False) -> str | None:
    """The answer of a generated assistant turn: the text after the reasoning, without end of sentence; None
    for a completion of a `thinking` prompt that never closes its reasoning (all of it is reasoning)."""
    if thinking and END_THINK not in completion:
        return None
    return completion.split(END_THINK)[-1].replace(EOS_TOKEN, "").strip()


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> list[dict]:
    """The tool calls in generated text: [{"name": ..., "arguments": {...}}]. The template writes non-string
    arguments as JSON; with the conversation's `tools`, an argument whose schema type is not "string" is read
    back from JSON (kept as text if it is not JSON), as vLLM's parser for this format does. Without them, every
    argument is text."""
    import re

    calls = []
    for block in re.findall(re.escape(TOOL_CALL) + r"(.*?)" + re.escape(END_TOOL_CALL), text, flags=re.S):
        function = re.search(r"<function=([^>\n]+)>", block)
        if function is None:
            continue
        name = function.group(1)
        types = _parameter_types(tools, name)
        args = {key: _typed_argument(value, types.get(key, "string"))
                for key, value in re.findall(r"<parameter=([^>\n]+)>\n(.*?)\n</parameter>", block, flags=re.S)}
        calls.append({"name": name, "arguments": args})
    return calls


def _parameter_types(tools: list[dict] | None, name: str) -> dict[str, str]:
    for tool in tools or ():
        function = tool.get("function", tool)
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return {key: schema.get("type", "string") for key, schema in properties.items()}
    return {}


def _typed_argument(value: str, schema_type) -> object:
    if schema_type == "string" or (isinstance(schema_type, list) and "string" in schema_type):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
