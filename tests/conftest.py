import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

# CI has two cores: keep property tests bounded and free of wall-clock deadlines (a loaded machine
# must not turn a slow example into a failure).
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every test session starts from an empty model cache, as a user's first run does: the default model
# is converted from its GGUF once per session (~30 s), by whichever test asks first, and every
# subprocess (torchrun recipe runs) inherits this cache. A warm ~/.cache/rlprims once hid a first-run
# bug from CI. RLPRIMS_TEST_CACHE=DIR reuses DIR instead (local iteration; CI never sets it).
_SESSION_CACHE = None


def pytest_configure(config):
    global _SESSION_CACHE
    if os.environ.get("RLPRIMS_TEST_CACHE"):
        os.environ["RLPRIMS_CACHE"] = os.environ["RLPRIMS_TEST_CACHE"]
    else:
        _SESSION_CACHE = tempfile.mkdtemp(prefix="rlprims-test-cache-")
        os.environ["RLPRIMS_CACHE"] = _SESSION_CACHE


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
