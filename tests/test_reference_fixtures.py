"""The reference fixtures of ../shared: skipped when absent for users, a failure in CI (REQUIRE_SHARED=1)."""

import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT, REQUIRE_SHARED_VAR, reference_path


def outcome(call) -> tuple[type | None, str]:
    """What `call` raised, caught whatever it is: a skip escaping `pytest.raises(Failed)` would
    turn this very test into a skip, the accident it is here to catch."""
    try:
        call()
    except BaseException as err:  # pytest's skip and fail are BaseExceptions
        return type(err), str(err)
    return None, ""


def test_a_missing_fixture_skips_by_default_and_fails_when_required(tmp_path, monkeypatch):
    def missing():
        return reference_path(tmp_path, "titok", "case1_legacy_vq_pixeldecoder.yaml")

    monkeypatch.delenv(REQUIRE_SHARED_VAR, raising=False)
    kind, message = outcome(missing)
    assert kind is pytest.skip.Exception and "titok reference fixtures are not in this checkout" in message
    monkeypatch.setenv(REQUIRE_SHARED_VAR, "1")
    kind, message = outcome(missing)
    assert kind is pytest.fail.Exception and "REQUIRE_SHARED=1 requires it" in message
    (tmp_path / "reference/titok").mkdir(parents=True)
    (tmp_path / "reference/titok/case1_legacy_vq_pixeldecoder.yaml").write_text("{}")
    assert reference_path(tmp_path, "titok", "case1_legacy_vq_pixeldecoder.yaml").is_file()


def test_ci_fails_a_reference_test_file_when_shared_is_missing(tmp_path):
    """A whole reference test file, as CI runs it, against a checkout whose ../shared is gone: each of
    its 6 tests that need a fixture fails, none skips."""
    env = {**os.environ, REQUIRE_SHARED_VAR: "1", "TOKENIZERS_VIS_SHARED": str(tmp_path / "no-shared")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", "tests/nn/test_vqgan_cnn.py"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 1, result.stdout[-2000:]
    # A fixture that fails is reported as an error of each test that uses it.
    assert "6 error" in summary and "skipped" not in summary, summary
    assert "REQUIRE_SHARED=1 requires it" in result.stdout
