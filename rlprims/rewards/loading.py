"""A user's reward function, by import path, with verl's compute_score signature.

Trust: loading a reward function imports and runs the named module or file (as verl does), in this
process and again in every reward worker process (`rlprims.rewards.reward_pool`). Name only code you
trust.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")


@dataclass(frozen=True)
class LoadedRewardFn:
    """A verl-style compute_score named by `spec` ("package.module:function" or "/abs/path/file.py:function").

    Callable as `fn(data_source, solution_str, ground_truth, extra_info=None)` (positionally or by
    keyword); it calls the user's function by keyword, as verl's reward managers do, and returns what
    it returns (a number, a bool or a dict with a "score" key). It pickles as its spec alone, so a worker
    process (`reward_pool`) imports the file itself, once per process, on first use. Make it with
    `load_reward_fn`, which checks the spec first.
    """

    spec: str

    def load(self) -> Callable[..., Any]:
        """The user's function itself (imported once per process)."""
        return _import_reward_fn(self.spec)

    def __call__(self, data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None) -> Any:
        return self.load()(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                           extra_info=extra_info)


def load_reward_fn(spec: str) -> LoadedRewardFn:
    """The function named by "package.module:function" or "path/to/file.py:function", checked now.

    The function must accept verl's arguments by keyword, as verl's reward managers call it:
    `fn(data_source=..., solution_str=..., ground_truth=..., extra_info=...)` (extra **kwargs are
    fine). The result (a `LoadedRewardFn`) takes them positionally or by keyword, so
    `fn(data_source, solution_str, ground_truth, extra_info)` works too, and can be sent to worker
    processes. A relative file path is resolved against the current directory now. A file is imported
    under a name made from its path, so two files with the same name do not collide. ValueError, naming
    the spec, when it is malformed, the module or file is missing or fails to import, or the function is
    missing, not callable, or lacks those parameters. This imports and runs the named code.
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ValueError("reward function spec must be 'package.module:function' or "
                         f"'path/file.py:function', got {spec!r}")
    target, name = spec.rsplit(":", 1)
    if not target or not name.isidentifier():
        raise ValueError(f"reward function spec {spec!r}: need a module or .py path before ':' and "
                         "a function name after it")
    if _is_file(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward function spec {spec!r}: no file at {path}")
        target = str(path)
    loaded = LoadedRewardFn(f"{target}:{name}")
    try:
        loaded.load()
    except ValueError as e:
        raise ValueError(f"reward function spec {spec!r}: {e}") from e
    return loaded


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


@functools.cache  # one import per process and spec (a worker process imports the file once)
def _import_reward_fn(spec: str) -> Callable[..., Any]:
    target, name = spec.rsplit(":", 1)
    if _is_file(target):
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"no file at {path}")
        module_name = f"rlprims_reward_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"cannot import {path} as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"importing {path} failed: {e!r}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ValueError(f"no module {target!r} ({e})") from e
        except Exception as e:
            raise ValueError(f"importing {target!r} failed: {e!r}") from e
    if not hasattr(module, name):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"{target} has no {name!r}; its callables: {public}")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"{name} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(**{arg: None for arg in _ARGS})
    except TypeError as e:
        raise ValueError(f"{name} must accept the keyword arguments {', '.join(_ARGS)} "
                         f"(verl's compute_score): {e}") from e
    except ValueError:
        pass  # no signature (a builtin): trust it
    return fn
