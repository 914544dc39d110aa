import os

import pytest

from knowedit import ModelLoadError, load_model
from knowedit.models import cache


def test_unreachable_model_error_names_model_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("some-org/not-a-cached-model")
    msg = str(e.value)
    assert "some-org/not-a-cached-model" in msg and "local directory" in msg


def test_cache_root_conventions(monkeypatch, tmp_path):
    monkeypatch.delenv("KNOWEDIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "knowedit"
    monkeypatch.setenv("KNOWEDIT_CACHE", str(tmp_path / "x"))
    assert cache.cache_root() == tmp_path / "x"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with cache.atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise KeyboardInterrupt  # an interrupted first conversion
    assert not target.exists() and os.listdir(tmp_path) == []
    with cache.atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").exists()
