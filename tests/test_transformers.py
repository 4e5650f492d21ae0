"""transformers models in and out of ``.mcnc``: ``mcnc_format.transformers``.

Tiny Llama (tied embeddings), GPT-2 (tied) and BERT models are built from local configs,
trained a few steps in the manifold (``reparametrize``, or MCNC-LoRA for BERT), written with
``save_pretrained`` and built again with ``from_pretrained`` from the folder and through the
local Hub-protocol server: logits and greedy ``generate()`` tokens equal the trained model's,
tied weights come back tied, ``dtype`` and ``device`` are honoured, the card's own example
runs, and a folder that does not fit gives an ``MCNCError`` naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hub_server import WRITE_TOKEN, HubServer
from torch import nn
from torch_helpers import assert_same_outputs, one_thread  # noqa: F401 (autouse fixture)
from transformers import AutoTokenizer
from transformers_helpers import MODELS, llama, output, tokenizer, tokens, train

import mcnc_format
from mcnc_format.errors import HubError, MCNCError, ReparametrizeError, UsageError
from mcnc_format.torch import MCNCConfig, add_mcnc_lora, reparametrize
from mcnc_format.transformers import from_pretrained, push_to_hub, save_pretrained

CONFIG = MCNCConfig(k=4, d=64, hidden=(8,), seed=7)
REPO = "alice/tiny-llm"


def trained(name: str) -> nn.Module:
    """``name``'s model trained in the manifold: every Linear/Embedding weight reparametrized
    (GPT-2's Conv1D layers stay dense), BERT with MCNC-LoRA on query and value."""
    torch.manual_seed(0)
    model = MODELS[name]()
    if name == "bert":
        add_mcnc_lora(model, CONFIG, target_modules=["query", "value"], rank=2)
    else:
        reparametrize(model, CONFIG)
    return train(model)


def assert_tied(model: nn.Module) -> None:
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_save_then_from_pretrained_gives_the_trained_model(name: str, tmp_path: Path) -> None:
    model = trained(name)
    folder = save_pretrained(model, tmp_path / name)
    loaded = from_pretrained(folder)
    assert type(loaded) is type(model)
    assert not loaded.training
    ids = tokens(1)
    assert_same_outputs(output(loaded, ids), output(model, ids))
    if name != "bert":
        assert_tied(loaded)
        with mcnc_format.open(folder / "model.mcnc") as f:  # the tied weight, stored once
            assert "lm_head.weight" not in list(f.keys())
        prompt = ids[:, :4]
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(loaded.generate(prompt, max_new_tokens=6, do_sample=False), want)
        assert (folder / "generation_config.json").is_file()
    else:
        assert not (folder / "generation_config.json").exists()


def test_tokenizer_and_the_cards_example(tmp_path: Path) -> None:
    """The tokenizer is saved where transformers looks; the card's code block, run as it is,
    builds the model and the tokenizer."""
    model, tok = trained("llama"), tokenizer()
    folder = save_pretrained(model, tmp_path / "m", tok)
    text = "w5 w9 w33 w60"
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tok(text)["input_ids"]
    card = (folder / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert f'from_pretrained("{folder}")' in code and "AutoTokenizer" in code
    scope: dict = {}
    exec(code, scope)
    ids = tokens(2)
    assert_same_outputs(output(scope["model"], ids), output(model, ids))
    assert scope["tokenizer"](text)["input_ids"] == tok(text)["input_ids"]


def test_push_to_hub_then_load_by_uri_and_repo_id(hub: HubServer, tmp_path: Path) -> None:
    model = trained("llama")
    result = push_to_hub(model, REPO, tokenizer=tokenizer(), token=WRITE_TOKEN)
    assert {"config.json", "model.mcnc", "generation_config.json", "README.md",
            "tokenizer.json"} <= set(result.paths)
    card = hub.file_bytes(REPO, "README.md").decode()
    assert f'from_pretrained("{REPO}")' in card and "tmp" not in card
    ids = tokens(3)
    want = output(model, ids)
    for name in (f"hf://{REPO}", REPO, f"hf://{REPO}@{result.commit}"):
        loaded = from_pretrained(name)
        assert_same_outputs(output(loaded, ids), want)
        assert_tied(loaded)
    prompt = ids[:, :3]
    assert torch.equal(loaded.generate(prompt, max_new_tokens=5, do_sample=False),
                       model.generate(prompt, max_new_tokens=5, do_sample=False))
    with pytest.raises(UsageError, match="give one"):
        from_pretrained(f"hf://{REPO}@main", revision="other")


def test_a_base_beside_the_file_is_fetched_from_the_repository(hub: HubServer,
                                                              tmp_path: Path) -> None:
    """A ``model.mcnc`` whose adapted weights reference the base checkpoint beside it
    (``base.safetensors``, SHA-256 pinned) loads from its folder, and from the Hub too, with
    the token given (a private repository): the base is fetched from the repository at the
    file's commit. It was looked for in the cache's snapshot, where nothing had fetched it."""
    from safetensors.torch import save_file

    from mcnc_format import Theta0
    from mcnc_format import hub as mhub
    from mcnc_format.reader import tensor_sha256
    from mcnc_format.torch import save_model

    torch.manual_seed(0)
    model = add_mcnc_lora(llama(), CONFIG, target_modules=["q_proj"], rank=2)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    weights = {n: model.get_submodule(n.removesuffix(".weight")).weight.detach().clone()
               for n in names}
    model = train(model)
    folder = save_pretrained(model, tmp_path / "m")
    save_file(weights, str(folder / "base.safetensors"))
    save_model(model, folder / "model.mcnc", theta0={
        n: Theta0.external("base.safetensors", n, tensor_sha256(w)) for n, w in weights.items()})
    ids = tokens(7)
    want = output(model, ids)
    assert_same_outputs(output(from_pretrained(folder), ids), want)
    pushed = mhub.push(folder, REPO, private=True, token=WRITE_TOKEN)
    assert "base.safetensors" in pushed.paths
    for name in (REPO, f"hf://{REPO}@{pushed.commit}"):
        assert_same_outputs(output(from_pretrained(name, token=WRITE_TOKEN), ids), want)


def test_a_model_without_generation_config_loads_offline_once_pulled(
        hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder has no ``generation_config.json``: offline, the cache's record that the
    commit lacks it is trusted, so a model pulled once by repo id or URI loads without the
    Hub, as one that generates does."""
    from huggingface_hub import constants

    model = trained("bert")
    push_to_hub(model, "alice/encoder", token=WRITE_TOKEN)
    ids = tokens(6)
    want = output(model, ids)
    assert_same_outputs(output(from_pretrained("alice/encoder"), ids), want)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.clear_requests()
    for name in ("alice/encoder", "hf://alice/encoder"):
        assert_same_outputs(output(from_pretrained(name), ids), want)
    assert hub.requests == []


def test_push_to_a_repository_holding_dense_weights_is_refused(hub: HubServer) -> None:
    """As ``save_pretrained`` refuses a folder with ``model.safetensors``: the pushed config
    beside another model's dense weights, which plain transformers loads first, would give a
    repository that loads wrong. Nothing is committed, on the branch or a new one."""
    hub.create_repo(REPO, files={"model.safetensors": b"dense weights of another model"})
    head = hub.head(REPO)
    for revision in (None, "mcnc"):
        with pytest.raises(HubError, match=r"\['model\.safetensors'\]"):
            push_to_hub(trained("llama"), REPO, revision=revision, token=WRITE_TOKEN)
    assert hub.head(REPO) == head
    with pytest.raises(KeyError):  # no branch was created
        hub.head(REPO, "mcnc")


def test_dtype_and_device_are_honoured(tmp_path: Path) -> None:
    model = trained("llama")
    folder = save_pretrained(model, tmp_path / "m")
    half = from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.config.dtype == torch.bfloat16
    assert_tied(half)
    ids = tokens(4)
    want = output(model, ids)
    assert (output(half, ids).float() - want).abs().max() < 0.05 * want.abs().max()
    shapes = from_pretrained(folder, device="meta")
    assert all(p.is_meta for p in shapes.parameters())
    with pytest.raises(UsageError, match="device"):
        from_pretrained(folder, device="cuda:9")


def test_transformers_spellings_of_dtype_and_device_are_honoured_or_refused(
        tmp_path: Path) -> None:
    """What users pass to transformers' own from_pretrained: ``torch_dtype`` converts the
    weights (it did not: the config said bfloat16 over float32 weights), a ``device_map``
    naming one device places them, ``dtype="auto"`` keeps them as stored; a ``device_map``
    spreading the model, download options and keywords that are no config field are refused
    instead of dropped."""
    folder = save_pretrained(trained("llama"), tmp_path / "m")
    half = from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.config.dtype == torch.bfloat16
    assert {p.dtype for p in from_pretrained(folder, dtype="auto").parameters()} == {
        torch.float32}
    for device_map in ("meta", {"": "meta"}, torch.device("meta")):
        assert all(p.is_meta for p in from_pretrained(folder, device_map=device_map).parameters())
    assert not from_pretrained(folder, low_cpu_mem_usage=True).training
    for keywords, message in [({"device_map": "auto"}, "spreads the model"),
                              ({"device_map": {"model": "cpu", "lm_head": "meta"}}, "spreads"),
                              ({"device_map": "cpu", "device": "meta"}, "different devices"),
                              ({"dtype": torch.float16, "torch_dtype": torch.bfloat16}, "give"),
                              ({"subfolder": "sub"}, "download options"),
                              ({"local_files_only": True}, "download options"),
                              ({"num_hidden_layer": 1}, r"\['num_hidden_layer'\]")]:
        with pytest.raises(UsageError, match=message):
            from_pretrained(folder, **keywords)


def test_plain_transformers_takes_the_loaded_state_dict(tmp_path: Path) -> None:
    """What transformers offers without a hook: the state dict handed to from_pretrained."""
    model = trained("gpt2")
    folder = save_pretrained(model, tmp_path / "m")
    cls = type(from_pretrained(folder))
    config = cls.config_class.from_pretrained(folder)
    plain = cls.from_pretrained(None, config=config,
                                state_dict=mcnc_format.load(folder / "model.mcnc"))
    ids = tokens(5)
    assert_same_outputs(output(plain, ids), output(model, ids))


def test_a_folder_that_does_not_fit_names_the_file(tmp_path: Path) -> None:
    model = trained("llama")
    folder = save_pretrained(model, tmp_path / "m")
    other = llama()
    other.config.num_hidden_layers = 1
    other.config.architectures = ["LlamaForCausalLM"]
    other.config.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "model.mcnc").write_bytes((folder / "model.mcnc").read_bytes())
    with pytest.raises(MCNCError, match=re.escape(str(tmp_path / "other" / "model.mcnc"))):
        from_pretrained(tmp_path / "other")
    (folder / "model.mcnc").unlink()
    with pytest.raises(MCNCError, match=re.escape(str(folder / "model.mcnc"))):
        from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(MCNCError, match=re.escape(str(folder / "config.json"))):
        from_pretrained(folder)
    with pytest.raises(MCNCError, match="no such folder"):
        from_pretrained(tmp_path / "nothing" / "here")
    with pytest.raises(ReparametrizeError, match="mcnc_config"):
        save_pretrained(llama(), tmp_path / "plain")


def test_a_file_missing_weights_says_what_to_do_instead(tmp_path: Path) -> None:
    """A ``model.mcnc`` holding part of the model (what ``mcnc pack --base`` writes: the
    adapter alone) is refused naming the missing weights, with a fix from_pretrained's caller
    can apply, not load_into's "pass strict=False", which from_pretrained does not take."""
    from mcnc_format.errors import StateDictMismatchError

    folder = save_pretrained(trained("llama"), tmp_path / "m")
    weights = mcnc_format.load(folder / "model.mcnc")
    del weights["model.norm.weight"]
    (folder / "model.mcnc").unlink()
    mcnc_format.save(folder / "model.mcnc", weights)
    with pytest.raises(StateDictMismatchError, match=r"'model\.norm\.weight'") as excinfo:
        from_pretrained(folder)
    assert "strict=False to load what matches" not in str(excinfo.value)
    assert "load_adapter" in str(excinfo.value)


def test_dtypes_that_are_not_floating_are_refused_before_building(tmp_path: Path) -> None:
    model = reparametrize(llama(), MCNCConfig(k=4, d=32, hidden=(16, 16)))
    save_pretrained(model, tmp_path / "m")
    for dtype in ("bfloat16", torch.int8):
        with pytest.raises(UsageError, match="dtype"):
            from_pretrained(tmp_path / "m", dtype=dtype)
    assert torch.get_default_dtype() == torch.float32
    loaded = from_pretrained(tmp_path / "m", dtype="bf16")
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_a_folder_with_dense_weights_of_an_earlier_save_is_refused(tmp_path: Path) -> None:
    """transformers would load ``model.safetensors`` before anything else: saving beside it
    would leave a folder that loads other weights."""
    from mcnc_format.errors import WriteError

    folder = tmp_path / "m"
    llama().save_pretrained(folder)  # a plain save: model.safetensors
    model = reparametrize(llama(), MCNCConfig(k=4, d=32, hidden=(16, 16)))
    with pytest.raises(WriteError, match=r"model\.safetensors"):
        save_pretrained(model, folder)
    assert not (folder / "model.mcnc").exists()


@pytest.mark.parametrize("kind", ["lora", "reparametrize"])
def test_gradient_checkpointing_with_model_chunking_trains_as_without(kind: str) -> None:
    """transformers' gradient checkpointing (non-reentrant) with the paper's one-segment
    chunking: the same Adam steps as without it (it raised ``CheckpointError``)."""
    config = MCNCConfig(k=4, d=64, hidden=(8,), seed=5, chunking="model")
    models = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        if kind == "lora":
            model = add_mcnc_lora(llama(), config, target_modules=["q_proj", "v_proj"],
                                  rank=4, lora_alpha=8)
        else:
            model = reparametrize(llama(), config)
        if checkpointed:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        models.append(model)
    trained = [dict(train(model).named_parameters()) for model in models]
    assert trained[0].keys() == trained[1].keys()
    for name, plain in trained[0].items():
        torch.testing.assert_close(trained[1][name], plain, rtol=1e-5, atol=1e-6, msg=name)
