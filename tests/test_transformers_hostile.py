"""``from_pretrained`` on a hostile or mistaken ``config.json``: the class is resolved only from
transformers' model registries for the config's model type, and the config is checked
against the file's tensor names and shapes (on a one-layer probe on the meta device) before
the model is built. Every case is a ``ConfigError`` naming what is wrong, fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from torch_helpers import one_thread  # noqa: F401 (autouse fixture)
from transformers_helpers import llama

from mcnc_format.errors import ConfigError
from mcnc_format.torch import MCNCConfig, reparametrize
from mcnc_format.transformers import from_pretrained, save_pretrained

CONFIG = MCNCConfig(k=4, d=64, hidden=(8,), seed=7)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = llama()
    reparametrize(model, CONFIG)
    return save_pretrained(model, tmp_path_factory.mktemp("saved") / "m")


def _with(folder: Path, tmp_path: Path, **changes: Any) -> Path:
    """A copy of the saved folder whose config.json has ``changes``."""
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("architecture", ["pipeline", "123", "utils", "__class__",
                                          "BertModel", "AutoModel", "PreTrainedModel",
                                          "LlamaConfig", "GPT2LMHeadModel"])
def test_architectures_resolve_only_to_a_model_class_of_the_config(
        folder: Path, tmp_path: Path, architecture: str) -> None:
    hostile = _with(folder, tmp_path, architectures=[architecture])
    with pytest.raises(ConfigError, match="architecture"):
        from_pretrained(hostile)


@pytest.mark.parametrize(("changes", "names"), [
    ({"hidden_size": -4}, "hidden_size"),
    ({"hidden_size": 48, "num_attention_heads": 4}, "shape"),
    ({"intermediate_size": 1 << 40}, "shape"),
    ({"num_hidden_layers": 20000}, "num_hidden_layers"),
    ({"num_hidden_layers": 1}, "num_hidden_layers"),
    ({"vocab_size": 7}, "shape"),
])
def test_a_config_that_does_not_fit_the_file_fails_before_building(
        folder: Path, tmp_path: Path, changes: dict[str, Any], names: str) -> None:
    bad = _with(folder, tmp_path, **changes)
    with pytest.raises(ConfigError, match=names):
        from_pretrained(bad)


def test_the_saved_folder_still_loads(folder: Path) -> None:
    assert type(from_pretrained(folder)).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
@pytest.mark.parametrize("text", ["null", '"text"', "[1]", '{"model_type": ["llama"]}',
                                  '{"model_type": "llama", "hidden_size": "x"}',
                                  '{"max_new_tokens": "x"}', "{not json"])
def test_a_config_file_transformers_cannot_read_is_a_config_error(
        folder: Path, tmp_path: Path, name: str, text: str) -> None:
    """Whatever transformers raises reading a broken ``config.json`` or
    ``generation_config.json`` (a ``TypeError``, its own validation error, an ``OSError``
    after the model was built) is a ``ConfigError`` naming the file, or the file is read."""
    broken = _with(folder, tmp_path)
    (broken / name).write_text(text)
    try:
        from_pretrained(broken)
    except ConfigError as exc:
        path = str(broken / name)
        assert exc.path == path and str(exc).startswith(f"{path}: ")
        assert not str(exc).startswith(f"{path}: {path}")


def test_architectures_given_as_one_name_is_that_name(folder: Path, tmp_path: Path) -> None:
    """``"architectures": "LlamaForCausalLM"`` (a string, not a list) names that class, not
    the class ``'L'``."""
    assert type(from_pretrained(_with(folder, tmp_path, architectures="LlamaForCausalLM"))
                ).__name__ == "LlamaForCausalLM"
