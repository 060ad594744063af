"""A user's reward function, by import path, with verl's compute_score signature."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
from pathlib import Path
from typing import Any, Callable

_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")


def load_reward_fn(spec: str) -> Callable[..., Any]:
    """The function named by "package.module:function" or "path/to/file.py:function".

    The function must accept verl's arguments by keyword, as verl's reward managers call it:
    `fn(data_source=..., solution_str=..., ground_truth=..., extra_info=...)` (extra **kwargs are
    fine). The result is a wrapper taking them positionally or by keyword, so
    `fn(data_source, solution_str, ground_truth, extra_info)` works too; it returns what the function
    returns (verl allows a float or a dict with a "score" key). A file is imported under a name made
    from its path, so two files with the same name do not collide. ValueError, naming the spec, when it
    is malformed, the module or file is missing or fails to import, or the function is missing, not
    callable, or lacks those parameters.
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise ValueError("reward function spec must be 'package.module:function' or "
                         f"'path/file.py:function', "
                         f"got {spec!r}")
    target, name = spec.rsplit(":", 1)
    if not target or not name.isidentifier():
        raise ValueError(f"reward function spec {spec!r}: need a module or .py path before ':' and "
                         "a function "
                         "name after it")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"reward function spec {spec!r}: no file at {path}")
        module_name = f"rlprims_reward_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"reward function spec {spec!r}: cannot import {path} as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"reward function spec {spec!r}: importing {path} failed: {e!r}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ValueError(f"reward function spec {spec!r}: no module {target!r} ({e})") from e
        except Exception as e:
            raise ValueError(f"reward function spec {spec!r}: importing {target!r} failed: {e!r}") from e
    if not hasattr(module, name):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward function spec {spec!r}: {target} has no {name!r}; its callables: {public}")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"reward function spec {spec!r}: {name} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(**{arg: None for arg in _ARGS})
    except TypeError as e:
        raise ValueError(f"reward function spec {spec!r}: {name} must accept the keyword arguments "
                         f"{', '.join(_ARGS)} (verl's compute_score): {e}") from e
    except ValueError:
        pass  # no signature (a builtin): trust it

    @functools.wraps(fn)
    def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any = None) -> Any:
        return fn(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                  extra_info=extra_info)

    return compute_score
