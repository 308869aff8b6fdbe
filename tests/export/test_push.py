"""`--push`: create_repo + upload_folder with the right arguments (HfApi mocked: nothing reaches the
Hub), and the token / offline / argument errors."""

from unittest.mock import MagicMock

import huggingface_hub
import pytest

from tokenizers_vis.export import main
from tokenizers_vis.hub import HubTokenError, push_to_hub


@pytest.fixture
def hf_api(monkeypatch):
    """A mocked `huggingface_hub.HfApi` class, with offline mode lifted for the push itself."""
    api_class = MagicMock(name="HfApi")
    api_class.return_value.create_repo.return_value = "https://huggingface.co/acme/titok-tiny"
    monkeypatch.setattr(huggingface_hub, "HfApi", api_class)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return api_class


@pytest.mark.parametrize("private", [False, True])
def test_push_creates_the_repo_and_uploads_the_folder(private, hf_api, tiny_checkpoint, tmp_path, monkeypatch,
                                                     capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "out"
    argv = [str(tiny_checkpoint), str(out), "--repo-id", "acme/titok-tiny", "--push"] + (["--private"] if private else [])
    assert main(argv) == 0
    hf_api.assert_called_once_with(token="hf_test_token")
    api = hf_api.return_value
    api.create_repo.assert_called_once_with(repo_id="acme/titok-tiny", private=private, repo_type="model",
                                            exist_ok=True)
    api.upload_folder.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["folder_path"] == str(out) and kwargs["repo_id"] == "acme/titok-tiny"
    assert kwargs["repo_type"] == "model"
    assert "pushed to https://huggingface.co/acme/titok-tiny" in capsys.readouterr().out
    assert 'load_tokenizer("acme/titok-tiny")' in (out / "README.md").read_text()


def test_missing_token_fails_before_exporting(hf_api, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "out"
    assert main([str(tiny_checkpoint), str(out), "--repo-id", "acme/titok-tiny", "--push"]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert not out.exists()
    hf_api.assert_not_called()
    with pytest.raises(HubTokenError):
        push_to_hub(tmp_path, "acme/titok-tiny")


def test_push_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    api_class = MagicMock(name="HfApi")
    monkeypatch.setattr(huggingface_hub, "HfApi", api_class)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        push_to_hub(tmp_path, "acme/titok-tiny", token="hf_test_token")
    api_class.assert_not_called()


def test_push_needs_an_existing_folder(hf_api, tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder to upload"):
        push_to_hub(tmp_path / "missing", "acme/titok-tiny", token="hf_test_token")
    hf_api.assert_not_called()


@pytest.mark.parametrize("extra", [["--push"], ["--private"], ["--repo-id", "not a repo id"]])
def test_bad_argument_combinations(extra, tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_checkpoint), str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
