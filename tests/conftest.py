import os

from hypothesis import HealthCheck, settings

# CI has two cores: keep property tests bounded and free of wall-clock deadlines (a loaded machine
# must not turn a slow example into a failure).
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
