"""Offline weight lookup: explicit file or folder, then the torch hub cache, else a clear error."""

from __future__ import annotations

import pytest

from tokenizers_vis.nn.weights import MissingWeightsError, find_weights, hub_checkpoint_dir


def test_explicit_file_and_folder(tmp_path, empty_hub_dir):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert find_weights(weights, "w.pth", "some_weights") == weights
    assert find_weights(tmp_path, ["other.pth", "w.pth"], "some_weights") == weights


def test_hub_cache_accepts_any_listed_name(empty_hub_dir):
    assert hub_checkpoint_dir() == empty_hub_dir / "checkpoints"
    alias = empty_hub_dir / "checkpoints" / "alias.pth"
    alias.write_bytes(b"x")
    assert find_weights(None, ["canonical.pth", "alias.pth"], "some_weights") == alias


def test_missing_file_names_file_cache_and_option(empty_hub_dir):
    with pytest.raises(MissingWeightsError) as err:
        find_weights(None, ["canonical.pth", "alias.pth"], "some_weights")
    message = str(err.value)
    assert "canonical.pth" in message and "some_weights=PATH" in message
    assert str(empty_hub_dir / "checkpoints") in message
    assert isinstance(err.value, FileNotFoundError)


def test_a_given_path_that_does_not_exist_is_an_error(tmp_path, empty_hub_dir):
    # Even with the file in the cache: a typo in the config must not silently load another file.
    (empty_hub_dir / "checkpoints" / "w.pth").write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match="some_weights="):
        find_weights(tmp_path / "typo.pth", "w.pth", "some_weights")
