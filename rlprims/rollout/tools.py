"""Tools for multi-turn rollouts: schemas, call parsing, and time-limited worker processes.

A tool is a plain Python function with type hints and a Google-style docstring (an `Args:` section),
the way transformers and TRL write them; its JSON schema comes from `transformers.utils.get_json_schema`
and is what a chat template renders with `apply_chat_template(..., tools=[schema, ...])`.

Calls are parsed from the model's text in the Hermes / Qwen2.5 format:
    <tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>
(`parse_hermes_tool_calls`). For chat templates with no tool section (SmolLM2, the embedded default),
`minimal_tool_system_prompt` writes the tool list and this call syntax into a system message: the
"minimal format" (docs/agentic.md).

Tools run in worker processes of a pebble `ProcessPool` (`tool_pool`), forked from multiprocessing's
forkserver (never from the trainer, whose vLLM / torch threads make fork() unsafe). Every call has a
time limit; a call past it, an exception, a worker that dies, malformed JSON, an unknown tool name or
arguments that do not match the schema each become an error observation (`ToolResult(error=True)`),
never an exception in the trainer and never a hang. What a tool prints and returns is cut to
`max_output_chars` inside the worker (a tool printing megabytes sends back a bounded string).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import multiprocessing
import operator
import os
import pickle
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "ToolCall",
    "ToolPool",
    "ToolResult",
    "calculator",
    "check_tool_arguments",
    "load_tools",
    "minimal_tool_prompt",
    "minimal_tool_system_prompt",
    "parse_hermes_tool_calls",
    "run_in_pool",
    "run_tool_calls",
    "template_has_tools",
    "template_tool_prompt",
    "tool_pool",
    "tool_schema",
    "truncate_text",
]

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_OUTPUT_CHARS = 1024


class ToolCall(NamedTuple):
    """One parsed call. `error` is set (and name / arguments may be empty) when the text was malformed."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None


class ToolResult(NamedTuple):
    """What a call returned, as the text the model will read; error=True for every failure."""

    name: str
    content: str
    error: bool


def tool_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of a tool function, `transformers.utils.get_json_schema(fn)`.

    {"type": "function", "function": {"name", "description", "parameters": {"type": "object",
    "properties": {...}, "required": [...]}}}. Needs type hints on every argument and a docstring with
    an `Args:` entry per argument (transformers raises a clear error otherwise).
    """
    from transformers.utils import get_json_schema

    return get_json_schema(fn)


def load_tools(specs: str) -> list[Callable[..., Any]]:
    """Tool functions from "module:function,module:function" (e.g. "rlprims.rollout:calculator").

    Each must be a module-level function of an importable module (the workers import it by name).
    ValueError names a malformed spec, a module that does not import, or a missing function.
    """
    import importlib

    tools = []
    for spec in (s.strip() for s in specs.split(",") if s.strip()):
        module, sep, name = spec.rpartition(":")
        if not sep or not module or not name.isidentifier():
            raise ValueError(f"tool {spec!r} must be 'module:function' (an importable module)")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"tool {spec!r}: {e}") from e
        tools.append(fn)
    return tools


_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def parse_hermes_tool_calls(text: str) -> list[ToolCall]:
    """Tool calls in the Hermes / Qwen2.5 format: each `<tool_call>JSON</tool_call>` block, in order.

    JSON = {"name": str, "arguments": object} ("arguments" may be a JSON-encoded string of an object, as
    some models write it; missing means {}). A block that is not such JSON gives a ToolCall with `error`
    set, so the model reads why. An opening tag without a closing one counts as one malformed call
    (the model tried to call a tool). No tag: [] (the turn is an answer).
    """
    calls = []
    for body in _CALL.findall(text):
        calls.append(_parse_call(body.strip()))
    tail = _CALL.sub("", text)
    if "<tool_call>" in tail:
        calls.append(ToolCall("", {}, "a <tool_call> was opened but never closed with </tool_call>"))
    return calls


def _parse_call(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(
            "", {}, f"the tool call is not valid JSON ({e.msg} at character {e.pos}): {body[:200]!r}"
        )
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", {}, 'a tool call must be a JSON object {"name": "...", "arguments": {...}}')
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(obj["name"], {}, f"the arguments of {obj['name']!r} must be a JSON object")
    return ToolCall(obj["name"], args)


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def check_tool_arguments(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> str | None:
    """Why `arguments` do not fit the tool's schema (missing, unexpected or wrongly typed), or None.

    Checks the top-level JSON types of `tool_schema`'s "parameters" (string, integer, number, boolean,
    array, object, null; a list of types; "nullable"; "enum"); nested items are not checked.
    """
    fn = schema["function"]
    params = fn.get("parameters", {})
    props = params.get("properties", {})
    missing = [k for k in params.get("required", []) if k not in arguments]
    unknown = [k for k in arguments if k not in props]
    problems = []
    if missing:
        problems.append(f"missing required argument(s) {missing}")
    if unknown:
        problems.append(f"unexpected argument(s) {unknown} (expected {sorted(props)})")
    for k, v in arguments.items():
        spec = props.get(k)
        if spec is None:
            continue
        types = spec.get("type", [])
        types = [types] if isinstance(types, str) else list(types)
        if spec.get("nullable"):
            types.append("null")
        if types and not any(_JSON_TYPES.get(t, lambda _: True)(v) for t in types):
            problems.append(f"argument {k!r} must be {' or '.join(types)}, got {type(v).__name__} {v!r:.50}")
        elif "enum" in spec and v not in spec["enum"]:
            problems.append(f"argument {k!r} must be one of {spec['enum']}, got {v!r:.50}")
    return f"{fn['name']}(): " + "; ".join(problems) if problems else None


def truncate_text(text: str, max_chars: int) -> str:
    """`text` if it fits, else its first max_chars characters and a note of how many were cut."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"... [truncated {len(text) - max_chars} characters]"


def template_has_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a `tools=` list (Qwen2.5, Hermes, Llama 3.1, ...)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = " ".join(template.values())
    return bool(template) and re.search(r"\btools\b", template) is not None


def minimal_tool_system_prompt(schemas: Sequence[Mapping[str, Any]], *, preamble: str = "") -> str:
    """The system message of the minimal format, for chat templates with no tool section.

    Text: `preamble` (if any); "You can call these tools:"; one line per tool,
    "- name(arg: type, ...): description" (types from the JSON schema, optional arguments marked "?");
    then the call syntax of `parse_hermes_tool_calls`, and that the result comes back in the next
    message (a message with role "tool", rendered by the template). Short on purpose: a 135M model
    reads it, and every prompt token is paid for in every forward.
    """
    lines = [preamble.strip()] if preamble.strip() else []
    lines.append("You can call these tools:")
    for s in schemas:
        fn = s["function"]
        params = fn.get("parameters", {})
        required = set(params.get("required", []))
        args = ", ".join(
            f"{k}{'' if k in required else '?'}: {_type_name(v)}"
            for k, v in params.get("properties", {}).items()
        )
        lines.append(f"- {fn['name']}({args}): {fn.get('description', '').strip()}")
    lines.append(
        'To call a tool, write <tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}'
        "</tool_call> and end your turn. The result comes back in the next message."
    )
    return "\n".join(lines)


def _type_name(spec: Mapping[str, Any]) -> str:
    t = spec.get("type", "any")
    return " | ".join(t) if isinstance(t, list) else str(t)


# ------------------------------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class ToolPool:
    """Tools by name, their schemas, and the worker processes that run them. Make it with `tool_pool`.

    Close it with `close()` or use it as a context manager; at interpreter exit pebble stops leftover
    workers too, and workers die with the process that made the pool.
    """

    tools: dict[str, Callable[..., Any]]
    schemas: dict[str, dict[str, Any]]
    timeout_s: float
    max_output_chars: int
    workers: int
    executor: Any = field(repr=False, compare=False)  # pebble.ProcessPool

    def close(self) -> None:
        """Stops the workers now (a call still running is killed). Idempotent."""
        self.executor.stop()
        self.executor.join(timeout=30)

    def __enter__(self) -> ToolPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tool_pool(
    tools: Sequence[Callable[..., Any]],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    workers: int = 2,
) -> ToolPool:
    """Worker processes for `run_tool_calls`; make one per run (per rank), close it at the end.

    tools: module-level functions with type hints and an `Args:` docstring (pickled by reference into
      the workers); their names are the names the model calls.
    timeout_s: time limit of one call, seconds; pebble's clock starts when a worker takes the call.
    max_output_chars: printed output plus the returned value are cut to this many characters.
    workers: processes; calls beyond them queue (each still gets its full time limit).
    Returns at once: the forkserver (which imports the tools' modules once) and the workers start in
    the background. ValueError for duplicate names, a tool without schema, one that cannot be pickled
    (a lambda or nested function), timeout_s <= 0, max_output_chars < 1 or workers < 1.
    """
    import pebble

    if not timeout_s > 0 or max_output_chars < 1 or workers < 1:
        raise ValueError(
            "need timeout_s > 0, max_output_chars >= 1, workers >= 1; "
            f"got {timeout_s}, {max_output_chars}, {workers}"
        )
    by_name: dict[str, Callable[..., Any]] = {}
    for fn in tools:
        name = getattr(fn, "__name__", None)
        if name in by_name:
            raise ValueError(f"two tools are named {name!r}")
        try:
            pickle.dumps(fn)
        except Exception as e:
            raise ValueError(
                f"tool {fn!r} cannot be sent to worker processes ({e}); define it at module level"
            ) from e
        by_name[name] = fn
    schemas = {name: tool_schema(fn) for name, fn in by_name.items()}
    modules = sorted({fn.__module__ for fn in by_name.values()})
    context = multiprocessing.get_context("forkserver")
    # Takes effect only if this process's forkserver is not running yet; import errors are ignored there.
    context.set_forkserver_preload(["__main__", *modules])  # as rlprims.rewards' pool: the same forkserver
    executor = pebble.ProcessPool(
        max_workers=workers, initializer=_init_worker, initargs=(os.getpid(),), context=context
    )
    threading.Thread(target=_start, args=(executor,), name="rlprims-tool-pool-start", daemon=True).start()
    return ToolPool(
        tools=by_name,
        schemas=schemas,
        timeout_s=float(timeout_s),
        max_output_chars=int(max_output_chars),
        workers=workers,
        executor=executor,
    )


def _start(executor: Any) -> None:
    try:
        executor.schedule(os.getpid)
    except Exception:  # noqa: BLE001 - a pool closed before it started; run_tool_calls reports real faults
        pass


def _init_worker(parent_pid: int) -> None:
    """In each worker: die with the process that made the pool, even while a call holds the GIL.

    The worker's parent is the forkserver, which exits once every holder of its "alive" pipe closed it;
    the worker closes its inherited copy and asks the kernel for SIGKILL when the forkserver exits
    (Linux PR_SET_PDEATHSIG). Elsewhere a thread polls the parent's pid instead.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    try:
        import ctypes

        if sys.platform != "linux" or ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) != 0:
            raise OSError("no PR_SET_PDEATHSIG")
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    except (OSError, TypeError, AttributeError):
        threading.Thread(target=_watch_pid, args=(parent_pid,), daemon=True).start()
    if not _pid_alive(parent_pid):
        os._exit(1)


def _watch_pid(pid: int) -> None:
    while _pid_alive(pid):
        time.sleep(1.0)
    os._exit(1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _BoundedText(io.TextIOBase):
    """A text sink that keeps the first `limit` characters and counts the rest (for print floods)."""

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0
        self.limit = limit
        self.last = ""  # the last character written (kept or not)

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        room = self.limit - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        self.last = s[-1:] or self.last
        return len(s)


def _call_tool(fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int) -> tuple[bool, str]:
    """Runs in a worker: fn(**arguments) with its prints captured; (ok, text cut to max_chars)."""
    sink = _BoundedText(max_chars)
    ok = True
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            value = fn(**arguments)
        out = value if isinstance(value, str) else "" if value is None else _to_text(value)
    except Exception as e:  # noqa: BLE001 - the model reads the error
        ok, out = False, f"{type(e).__name__}: {e}"
    printed = "".join(sink.parts)
    sep = "\n" if sink.last and out and sink.last != "\n" else ""
    total = sink.kept + sink.dropped + len(sep) + len(out)
    text = (printed + sep + out)[:max_chars]
    if total > len(text):
        text += f"... [truncated {total - len(text)} characters]"
    return ok, text


def _to_text(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def run_in_pool(
    pool: ToolPool, fns_and_args: Sequence[tuple[Callable[..., Any], tuple]]
) -> list[tuple[bool, Any]]:
    """Runs each `fn(*args)` in the pool's workers, concurrently, each under `pool.timeout_s`.

    Returns (True, value) per call, or (False, "why") when it raised, timed out or its worker died.
    Used for tool calls and for interactions (user simulators); order is kept.
    """
    futures = [
        pool.executor.schedule(_call_any, args=(fn, args), timeout=pool.timeout_s)
        for fn, args in fns_and_args
    ]
    return [_outcome(f, pool.timeout_s) for f in futures]


def _call_any(fn: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
    try:
        return True, fn(*args)
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"


def _outcome(future: Any, timeout_s: float) -> tuple[bool, Any]:
    import pebble

    try:
        return future.result()
    except FutureTimeout:
        return False, f"timed out after {timeout_s:g} s"
    except pebble.ProcessExpired as e:
        return False, f"the worker process died (exit code {e.exitcode})"
    except Exception as e:  # noqa: BLE001 - e.g. a value that cannot be pickled back
        return False, f"{type(e).__name__}: {e}"


def run_tool_calls(pool: ToolPool, calls: Sequence[ToolCall]) -> list[ToolResult]:
    """Runs the calls concurrently in the pool's workers; one ToolResult per call, in order.

    A parse error, an unknown tool name and arguments that do not fit the schema are answered without
    running anything; an exception, a time-out or a dead worker become "Error: ..." contents. Contents
    are cut to `pool.max_output_chars`. Never raises for a bad call.
    """
    results: list[ToolResult | None] = [None] * len(calls)
    jobs = []
    for i, call in enumerate(calls):
        if call.error is not None:
            results[i] = ToolResult(call.name, f"Error: {call.error}", True)
        elif call.name not in pool.tools:
            known = ", ".join(sorted(pool.tools)) or "none"
            results[i] = ToolResult(
                call.name, f"Error: unknown tool {call.name!r:.60} (available: {known})", True
            )
        elif (problem := check_tool_arguments(pool.schemas[call.name], call.arguments)) is not None:
            results[i] = ToolResult(call.name, f"Error: {problem}", True)
        else:
            jobs.append(i)
    futures = [
        pool.executor.schedule(
            _call_tool,
            args=(pool.tools[calls[i].name], calls[i].arguments, pool.max_output_chars),
            timeout=pool.timeout_s,
        )
        for i in jobs
    ]
    for i, future in zip(jobs, futures):
        ok, text = _outcome(future, pool.timeout_s)
        if not ok and not text.startswith("Error"):
            text = f"Error: {calls[i].name}(): {text}"
        results[i] = ToolResult(calls[i].name, text, not ok)  # already cut in the worker
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# The embedded task's tool

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression and returns its value.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "123 * 456".
    """
    tree = ast.parse(expression.strip(), mode="eval")
    value = _eval(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return str(value)


def _eval(node: ast.AST) -> int | float:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, (int, float))
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponents above 64 are not supported")
        return _BINOPS[type(node.op)](left, right)
    raise ValueError(f"unsupported expression element: {ast.unparse(node)!r:.40}")


# ------------------------------------------------------------------------------------------------
# Prompts with tools: the template's own tool section, or the minimal format


def template_tool_prompt(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], schemas: Sequence[Mapping[str, Any]]
) -> str:
    """The prompt text from the chat template's own tool section: `apply_chat_template(messages,
    tools=schemas, add_generation_prompt=True)` (Qwen2.5 / Hermes render them in the system message).

    Raises ValueError when the template has no tool section (it would drop the tools silently); use
    `minimal_tool_prompt` for such models.
    """
    if schemas and not template_has_tools(tokenizer):
        raise ValueError(
            "this chat template has no tool section (it ignores tools=); use minimal_tool_prompt"
        )
    return tokenizer.apply_chat_template(
        list(messages), tools=list(schemas) or None, tokenize=False, add_generation_prompt=True
    )


def minimal_tool_prompt(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], schemas: Sequence[Mapping[str, Any]]
) -> str:
    """The prompt text in the minimal format, for chat templates without a tool section (SmolLM2).

    `minimal_tool_system_prompt(schemas)` becomes the system message (a system message already in
    `messages` is kept as its preamble); then the template renders the conversation as usual.
    """
    msgs = list(messages)
    if schemas:
        preamble = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else ""
        msgs.insert(0, {"role": "system", "content": minimal_tool_system_prompt(schemas, preamble=preamble)})
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
