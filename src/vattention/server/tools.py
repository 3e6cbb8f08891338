"""Tool calling on /v1/chat/completions, as OpenAI defines it.

  tools           rendered by the model's chat template (its `tools` variable, as transformers
                  passes it), unless tool_choice is "none"
  tool_choice     auto: the model decides; calls are parsed from its output, Hermes/Qwen style:
                        <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks
                  required / {"type": "function", "function": {"name": ...}}: the output is held
                        by structured outputs to a JSON array of calls (one call for a named
                        function, or without parallel_tool_calls), so it always parses
                  none: no tools rendered, nothing parsed
  the response    message.tool_calls [{id, type: function, function: {name, arguments: JSON text}}],
                  content = the text around the calls (None when there is none), finish_reason
                  "tool_calls"; a stream sends a choice's calls in one delta at its end
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments
    strict: bool | None = None  # accepted: required/named calls always follow the schema here


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class _Name(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: _Name


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


def for_template(tools: list[ToolDef]) -> list[dict]:
    """The tools as chat templates read them (OpenAI's shape)."""
    return [t.model_dump(exclude_none=True) for t in tools]


def call_schema(tools: list[ToolDef], choice, parallel: bool) -> dict | None:
    """The JSON schema a required or named tool_choice holds the output to; None for auto/none."""
    if choice in (None, "auto", "none"):
        return None
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
    one = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": t.function.name},
                           "arguments": t.function.parameters or {"type": "object"}}} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": one[0] if len(one) == 1 else {"anyOf": one}}
    if isinstance(choice, NamedToolChoice) or not parallel:
        schema["maxItems"] = 1
    return schema


def parse(text: str, constrained: bool, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an output: a constrained one is the JSON array itself; otherwise the
    <tool_call> blocks that hold a known function's call (others stay in the content)."""
    if constrained:
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            return text or None, []  # cut short (max_tokens): not a call
        return None, [_call(item["name"], item.get("arguments", {})) for item in items]
    calls, kept, last = [], [], 0
    for m in TOOL_CALL.finditer(text):
        try:
            item = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(item, dict) or item.get("name") not in names:
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append(_call(item["name"], item.get("arguments", item.get("parameters", {}))))
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else (text or None), calls


def _call(name: str, arguments) -> ToolCall:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=args))
