"""Tool calling for Llama 4: the tool list in the system prompt, calls in the history, and a parser.

Llama 4 calls tools in *pythonic* form, ``[get_weather(city="Paris"), get_time(tz="CET")]``
(Meta's ``prompt_format.md`` for Llama 4; llama-stack's ``python_list`` tool prompt format, its
default for Llama 3.2/3.3/4). This module holds:

- ``tool_system_prompt``: OpenAI ``tools`` -> the system prompt Meta documents for Llama 4
  (llama-stack ``llama4/prompt_templates/system_prompts.py::PythonListCustomToolGenerator``);
- ``format_tool_call``: an earlier assistant call -> its text in the chat history, as
  ``llama_models.llama3.tool_utils.ToolUtils.encode_tool_call`` writes ``python_list`` calls;
- ``parse_tool_calls``: what the model emitted -> ``(content, tool_calls)`` in OpenAI form. It reads
  pythonic calls (with Python's ``ast``; nothing is ever evaluated), JSON calls and
  ``<function=name>{...}</function>`` calls, after optional leading text and inside optional
  ``<|python_start|>...<|python_end|>`` or Markdown code fences.
"""

from __future__ import annotations

import ast
import itertools
import json
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
END_MARKERS = ("<|eot|>", "<|eom|>", "<|end_of_text|>")

# Meta's default system prompt for pythonic tool calling (Llama 4 prompt_format.md, "Zero shot
# function calling - system message"); the function list follows it after two blank lines.
DEFAULT_TOOL_SYSTEM_PROMPT = """\
You are a helpful assistant and an expert in function composition. You can answer general questions \
using your internal knowledge OR invoke functions when necessary. Follow these strict guidelines:

1. FUNCTION CALLS:
- ONLY use functions that are EXPLICITLY listed in the function list below
- If NO functions are listed (empty function list []), respond ONLY with internal knowledge or \
"I don't have access to [Unavailable service] information"
- If a function is not in the list, respond ONLY with internal knowledge or "I don't have access to \
[Unavailable service] information"
- If ALL required parameters are present AND the query EXACTLY matches a listed function's purpose: \
output ONLY the function call(s)
- Use exact format: [func_name1(param1=value1, param2=value2), func_name2(...)]
Examples:
CORRECT: [get_weather(location="Vancouver"), calculate_route(start="Boston", end="New York")] <- Only \
if get_weather and calculate_route are in function list
INCORRECT: get_weather(location="New York")
INCORRECT: Let me check the weather: [get_weather(location="New York")]
INCORRECT: [get_events(location="Singapore")] <- If function not in list

2. RESPONSE RULES:
- For pure function requests matching a listed function: ONLY output the function call(s)
- For knowledge questions: ONLY output text
- For missing parameters: ONLY request the specific missing parameters
- For unavailable services (not in function list): output ONLY with internal knowledge or \
"I don't have access to [Unavailable service] information". Do NOT execute a function call.
- If the query asks for information beyond what a listed function provides: output ONLY with \
internal knowledge about your limitations
- NEVER combine text and function calls in the same response
- NEVER suggest alternative functions when the requested service is unavailable
- NEVER create or invent new functions not listed below

3. STRICT BOUNDARIES:
- ONLY use functions from the list below - no exceptions
- NEVER use a function as an alternative to unavailable information
- NEVER call functions not present in the function list
- NEVER add explanatory text to function calls
- NEVER respond with empty brackets
- Use proper Python/JSON syntax for function calls
- Check the function list carefully before responding

4. TOOL RESPONSE HANDLING:
- When receiving tool responses: provide concise, natural language responses
- Don't repeat tool response verbatim
- Don't add supplementary information"""

FUNCTION_LIST_HEADER = "Here is a list of functions in JSON format that you can invoke."
FUNCTION_LIST_FOOTER = (
    "You can answer general questions or invoke tools when necessary.\n"
    "In addition to tool calls, you should also augment your responses by using the tool outputs."
)
# A user system prompt containing this placeholder gets the function list substituted into it
# (llama-stack's "replace" behaviour); otherwise the tool prompt comes first and it follows.
FUNCTION_DESCRIPTION_PLACEHOLDER = "{{ function_description }}"


# ----- tool definitions -> system prompt ---------------------------------------------------------


def _function_spec(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``{"name", "description", "parameters"}`` part of an OpenAI tool (or a bare function)."""
    spec = tool.get("function", tool)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(f"a tool needs a function name: {tool!r}")
    return spec


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _render_function(spec: Mapping[str, Any]) -> str:
    """One function in Meta's layout: parameters as ``"type": "dict"``, ``required``, ``properties``
    with ``type``, ``description`` and (when given) ``default`` of each parameter.

    Differences from llama-stack's Jinja template, all of which leave Meta's documented example
    byte-identical: strings are JSON-escaped (the template pastes them raw, so a quote breaks the
    JSON), falsy defaults such as ``0`` are kept, non-string defaults are written as JSON values, and
    ``enum``/``items`` of a parameter, which the template drops, are listed after its description.
    """
    params = spec.get("parameters") or {}
    properties: Mapping[str, Any] = params.get("properties") or {}
    required = list(params.get("required") or [])
    blocks = []
    for name, prop in properties.items():
        prop = prop or {}
        ptype = prop.get("type", "any")
        if isinstance(ptype, list):  # e.g. ["string", "null"]
            ptype = " | ".join(str(t) for t in ptype)
        lines = [f'"type": {_json(str(ptype))}', f'"description": {_json(str(prop.get("description", "")))}']
        if "default" in prop:
            default = prop["default"]
            lines.append(f'"default": {_json(default if isinstance(default, str) else _json(default))}')
        for extra in ("enum", "items"):
            if extra in prop:
                lines.append(f'"{extra}": {_json(prop[extra])}')
        body = ",\n".join(" " * 20 + line for line in lines)
        blocks.append(f"\n{' ' * 16}{_json(name)}: {{\n{body}\n{' ' * 16}}}")
    return (
        "{\n"
        f'        "name": {_json(spec["name"])},\n'
        f'        "description": {_json(str(spec.get("description") or ""))},\n'
        '        "parameters": {\n'
        '            "type": "dict",\n'
        f'            "required": {_json(required)},\n'
        '            "properties": {' + ",".join(blocks) + "\n            }\n"
        "        }\n"
        "    }"
    )


def function_list(tools: Sequence[Mapping[str, Any]]) -> str:
    """The function list of the tool system prompt (Meta's ``function_description``)."""
    functions = ",\n    ".join(_render_function(_function_spec(t)) for t in tools)
    return f"{FUNCTION_LIST_HEADER}\n\n[\n    {functions}\n]\n\n{FUNCTION_LIST_FOOTER}"


def tool_choice_instruction(tool_choice: str | Mapping[str, Any] | None) -> str:
    """The sentence llama-stack appends for ``tool_choice`` ("" for auto/none)."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return ""
    if tool_choice == "required":
        return "You MUST use one of the provided functions/tools to answer the user query."
    if isinstance(tool_choice, Mapping):  # OpenAI {"type": "function", "function": {"name": ...}}
        tool_choice = _function_spec(tool_choice)["name"]
    return f"You MUST use the tool `{tool_choice}` to answer the user query."


def tool_system_prompt(
    tools: Sequence[Mapping[str, Any]],
    system_prompt: str | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
) -> str:
    """The system message text that offers ``tools`` (OpenAI format) to Llama 4.

    Without a user ``system_prompt`` this is exactly Meta's documented prompt. With one, the tool
    prompt comes first and the user's text follows on the next line (llama-stack's default
    "append" behaviour), unless the text contains ``{{ function_description }}``, which is then
    replaced by the function list (llama-stack's "replace" behaviour).
    """
    if not tools:
        raise ValueError("tool_system_prompt needs at least one tool")
    functions = function_list(tools)
    if system_prompt and FUNCTION_DESCRIPTION_PLACEHOLDER in system_prompt:
        text = system_prompt.replace(FUNCTION_DESCRIPTION_PLACEHOLDER, functions)
    else:
        text = f"{DEFAULT_TOOL_SYSTEM_PROMPT}\n\n\n{functions}"
        if system_prompt:
            text += "\n" + system_prompt
    if instruction := tool_choice_instruction(tool_choice):
        text += "\n" + instruction
    return text.strip("\n")


# ----- calls in the chat history -----------------------------------------------------------------


def _python_value(value: Any) -> str:
    """A JSON value as Python source. Strings are written like the reference (``"..."``), but with
    escapes where needed: the reference pastes them raw, which breaks on a quote or newline."""
    if isinstance(value, str):
        return _json(value)
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_value(v) for v in value) + "]"
    if isinstance(value, dict):
        # The reference writes {k=v}, which is not Python; a dict literal is.
        return "{" + ", ".join(f"{_json(str(k))}: {_python_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"tool argument of type {type(value).__name__} is not JSON data: {value!r}")


def tool_call_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, arguments)`` of an OpenAI tool call (``arguments`` a JSON string or a dict)."""
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"tool call without a function name: {call!r}")
    args = fn.get("arguments", fn.get("parameters")) or {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError) as e:  # absurd nesting is bad input too
            raise ValueError(f"tool call {name!r}: arguments are not valid JSON: {e!r}") from e
    if not isinstance(args, dict):
        raise ValueError(f"tool call {name!r}: arguments must be a JSON object, got {args!r}")
    return name, args


def format_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """``[name(key=value, ...)]``: one call as the reference writes it in the history (python_list)."""
    args = ", ".join(f"{key}={_python_value(value)}" for key, value in arguments.items())
    return f"[{name}({args})]"


# ----- parsing what the model emits --------------------------------------------------------------


def make_tool_call(name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI-style tool call with a fresh id."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": _json(dict(arguments))},
    }


class _NotACall(Exception):
    """The text looked like it might hold calls, but does not."""


_JSON_NAMES = {"true": True, "false": False, "null": None, "none": None}


def _literal(node: ast.AST) -> Any:
    """A JSON value from an argument's syntax tree. Only literals are accepted (no names, calls,
    operators): the model's output is data, never code. ``true/false/null`` are accepted too."""
    if isinstance(node, ast.Constant) and (
        node.value is None or isinstance(node.value, (str, bool, int, float))
    ):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):  # {**x}
            raise _NotACall("dict unpacking in arguments")
        return {str(_literal(k)): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _NotACall("sign on a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Name) and node.id.lower() in _JSON_NAMES:
        return _JSON_NAMES[node.id.lower()]
    raise _NotACall(f"not a literal: {ast.dump(node)[:60]}")


def _call_name(func: ast.AST) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        if func.attr == "call" and isinstance(func.value, ast.Name):  # builtin style: brave_search.call(...)
            return func.value.id
        return f"{_call_name(func.value)}.{func.attr}"
    raise _NotACall("call of something that is not a name")


def _python_call(node: ast.AST) -> tuple[str, dict[str, Any]]:
    if not isinstance(node, ast.Call):
        raise _NotACall("list element is not a call")
    if node.args:
        raise _NotACall("positional arguments (tool calls take keyword arguments)")
    args = {}
    for kw in node.keywords:
        if kw.arg is None:  # **kwargs
            raise _NotACall("keyword unpacking")
        args[kw.arg] = _literal(kw.value)
    return _call_name(node.func), args


def _call_lists(node: ast.AST) -> list[ast.List]:
    """``[a()]``, ``[a()], [b()]`` and ``[a()][b()]`` (parsed by Python as a subscript) -> lists."""
    if isinstance(node, ast.List):
        return [node]
    if isinstance(node, ast.Tuple):
        return [lst for e in node.elts for lst in _call_lists(e)]
    if isinstance(node, ast.Subscript):  # in [a()][b(), c()] the subscript holds b(), c()
        inner = node.slice
        elts = inner.elts if isinstance(inner, ast.Tuple) else [inner]
        return _call_lists(node.value) + [ast.List(elts=elts, ctx=ast.Load())]
    raise _NotACall("not a list of calls")


def _parse_python(text: str) -> ast.Module:
    try:
        return ast.parse(text, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        # Models sometimes drop the closing "]" after a complete call (vLLM issue 30722).
        if text.startswith("[") and text.endswith(")"):
            try:
                return ast.parse(text + "]", mode="exec")
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                pass
        raise _NotACall(f"not Python: {e}") from None


def _parse_pythonic(text: str, allow_bare: bool) -> list[tuple[str, dict[str, Any]]]:
    tree = _parse_python(text)
    calls = []
    for stmt in tree.body:
        if not isinstance(stmt, ast.Expr):
            raise _NotACall("not an expression")
        if allow_bare and isinstance(stmt.value, ast.Call):
            calls.append(_python_call(stmt.value))
            continue
        for lst in _call_lists(stmt.value):
            if not lst.elts:
                raise _NotACall("empty list")
            calls.extend(_python_call(e) for e in lst.elts)
    if not calls:
        raise _NotACall("no calls")
    return calls


def _json_call(obj: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(obj, dict):
        raise _NotACall("JSON call is not an object")
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    # A bare {"name": ...} is ordinary JSON data (a person, a product); a call says what it is.
    if not ({"parameters", "arguments"} & obj.keys() or obj.get("type") == "function"):
        raise _NotACall("JSON object without parameters/arguments")
    try:
        return tool_call_arguments(obj)
    except ValueError as e:
        raise _NotACall(str(e)) from None


def _parse_json(text: str) -> list[tuple[str, dict[str, Any]]]:
    decoder = json.JSONDecoder()
    calls: list[tuple[str, dict[str, Any]]] = []
    pos = 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in ";,"):
            pos += 1
        if pos == len(text):
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            raise _NotACall(f"not JSON: {e!r}") from None
        calls.extend(_json_call(o) for o in (obj if isinstance(obj, list) else [obj]))
    if not calls:
        raise _NotACall("no calls")
    return calls


_FUNCTION_TAG = re.compile(r"<function=([^>\s]+)>(.*?)</function>", re.DOTALL)


def _parse_function_tags(text: str) -> list[tuple[str, dict[str, Any]]]:
    calls, pos = [], 0
    for m in _FUNCTION_TAG.finditer(text):
        if text[pos : m.start()].strip():
            raise _NotACall("text between function tags")
        try:
            args = json.loads(m.group(2)) if m.group(2).strip() else {}
        except (json.JSONDecodeError, RecursionError) as e:
            raise _NotACall(f"function tag arguments are not JSON: {e!r}") from None
        if not isinstance(args, dict):
            raise _NotACall("function tag arguments are not an object")
        calls.append((m.group(1), args))
        pos = m.end()
    if not calls or text[pos:].strip():
        raise _NotACall("not function tags")
    return calls


_FENCE = re.compile(r"^```[\w+-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)


def _parse_segment(segment: str, allow_bare: bool) -> list[tuple[str, dict[str, Any]]]:
    """All the calls in ``segment``, which must hold calls and nothing else."""
    segment = segment.strip()
    if fence := _FENCE.match(segment):
        segment = fence.group(1).strip()
    if segment.startswith("<function="):
        return _parse_function_tags(segment)
    if segment.startswith("{") or re.match(r"\[\s*\{", segment):
        return _parse_json(segment)
    return _parse_pythonic(segment, allow_bare)


# Where a trailing run of calls may begin: a pythonic list, a JSON object or list, a function tag,
# or a code fence.
_CANDIDATE = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(|\[\s*\{|\{\s*\"|<function=|```")
_BARE_CALL = re.compile(r"[A-Za-z_][\w.]*\s*\(")
MAX_CANDIDATES = 256


def _strip_end_markers(text: str) -> str:
    """``text`` without trailing end tokens (and the whitespace after them); all else is kept."""
    while True:
        stripped = text.rstrip()
        marker = next((m for m in END_MARKERS if stripped.endswith(m)), None)
        if marker is None:
            return text
        text = stripped[: -len(marker)]


def parse_tool_calls(
    text: str, tool_names: Collection[str] | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a model's reply into ``(content, tool_calls)`` (OpenAI style).

    Calls are recognised only at the end of the reply (after optional text, which becomes the
    content, or ``None`` when there is none): pythonic ``[f(a=1), g()]`` (also ``[f()][g()]``), JSON
    ``{"name": ..., "parameters"/"arguments": ...}`` (or a list of them, or several separated by
    ``;``), and ``<function=f>{...}</function>``. Inside ``<|python_start|>...<|python_end|>`` a
    bare ``f(a=1)`` is a call too. If ``tool_names`` is given, a candidate that calls anything else
    is not a call (it stays text); a bare call is then also accepted when it is the whole reply.
    Text that is not a call comes back unchanged as the content, minus the python markers and end
    tokens, with an empty list of calls.
    """
    body = _strip_end_markers(text)
    if PYTHON_START in body:
        before, _, rest = body.partition(PYTHON_START)
        inside, _, after = rest.partition(PYTHON_END)
        found = _try_parse(inside, allow_bare=True, tool_names=tool_names)
        if found is not None and not after.strip():
            return before.rstrip() or None, found
        return body.replace(PYTHON_START, "").replace(PYTHON_END, ""), []
    body = body.replace(PYTHON_END, "")
    stripped = body.rstrip()
    if not stripped.endswith(("]", "}", ")", ">", "`")):  # fast path for ordinary prose
        return body, []
    if tool_names is not None and _BARE_CALL.match(stripped.lstrip()):
        found = _try_parse(stripped, allow_bare=True, tool_names=tool_names)
        if found is not None:
            return None, found
    # Each try parses to the end of the reply; the cap bounds the work on long bracket-heavy prose.
    for candidate in itertools.islice(_CANDIDATE.finditer(body), MAX_CANDIDATES):
        found = _try_parse(body[candidate.start() :], allow_bare=False, tool_names=tool_names)
        if found is not None:
            return body[: candidate.start()].rstrip() or None, found
    return body, []


def _try_parse(
    segment: str, *, allow_bare: bool, tool_names: Collection[str] | None
) -> list[dict[str, Any]] | None:
    try:
        calls = _parse_segment(segment, allow_bare)
    except _NotACall:
        return None
    if tool_names is not None and any(name not in tool_names for name, _ in calls):
        return None
    return [make_tool_call(name, args) for name, args in calls]
