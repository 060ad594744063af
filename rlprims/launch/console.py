"""What a training run prints: the run's own lines, not every library's start-up chatter.

A recipe's console shows, per step, the step's line from `rlprims.metrics.log_metrics` (reward, response
length, KL / entropy, time, and the validation score when it runs) and the rollout progress bar on rank 0.
`quiet_console()` (called by `rlprims.launch.init`) hides what would bury it: vLLM's engine-config dump and
INFO / WARNING logs of every rank, its weight-loading bars, transformers' loading bars and infos, FSDP2's
"returned a view tensor" warning, and deprecation / future warnings from the libraries. Errors still show.

`--verbose` on any recipe (or RLPRIMS_VERBOSE=1 in the environment) brings everything back.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["quiet_console", "verbose_requested", "VERBOSE_ENV"]

VERBOSE_ENV = "RLPRIMS_VERBOSE"

# Environment read by libraries when they are imported (vLLM configures its logger at import) or by
# processes they start: set only when the user has not set them.
_QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}
# Loggers of libraries that may already be imported when quiet_console runs.
_QUIET_LOGGERS = ("vllm", "transformers", "torch.distributed", "accelerate", "huggingface_hub",
                  "liger_kernel")  # liger: a warning per optional backend it cannot import (CuTe DSL, Ascend)
_QUIET_MESSAGES = (
    r"FSDP2-wrapped module .* returned a view tensor",  # FSDP2 warns on every forward of a decoder layer
    r"barrier\(\): using the device under current context",  # torch.distributed, once per rank (CUDA)
)


def verbose_requested() -> bool:
    """True when RLPRIMS_VERBOSE is set to something other than "", "0", "false" or "no"."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_console(*, verbose: bool | None = None) -> bool:
    """Silences library chatter for the rest of this process unless `verbose` (default: RLPRIMS_VERBOSE).

    Effects (all skipped when verbose): the environment defaults above (vLLM reads them when it is
    imported, so call this before the first `create_engine`), the level of the library loggers set to
    ERROR, transformers' progress bars off, and warnings filtered: DeprecationWarning, FutureWarning and
    FSDP2's view-tensor warning. Python's own default filters are kept for the caller's code
    (`__main__`). Returns whether the console was quieted.
    """
    if verbose is None:
        verbose = verbose_requested()
    if verbose:
        return False
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in _QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    if "transformers" in sys.modules or _importable("transformers"):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for name in _QUIET_LOGGERS:  # after importing transformers: huggingface_hub sets its level on import
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
