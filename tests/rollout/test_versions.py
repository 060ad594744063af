"""The vLLM version check of create_engine: a warning naming the tested range outside it."""

import pytest

from rlprims.rollout.engine import TESTED_VLLM, vllm_version_warning


@pytest.mark.parametrize("version", ["0.26.0", "0.26.1+cu129", "0.30.2", "0.32.0", "0.32.0+cpu"])
def test_tested_versions_pass(version):
    assert vllm_version_warning(version) is None


@pytest.mark.parametrize("version", ["0.11.0", "0.25.9", "0.33.0", "1.0.0", "0.34.0rc1", "dev"])
def test_other_versions_warn_with_the_range(version):
    text = vllm_version_warning(version)
    assert text is not None and version in text
    (lo, hi) = TESTED_VLLM
    assert f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}" in text and "pip install" in text


def test_installed_vllm_is_in_the_tested_range():
    vllm = pytest.importorskip("vllm")
    assert vllm_version_warning(vllm.__version__) is None, vllm.__version__
