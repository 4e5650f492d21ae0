"""AdapterBank: three MCNC-LoRA adapters of a tiny Llama served per row of one batch.

The adapters are trained with ``add_mcnc_lora`` (a few Adam steps each, different ranks,
generator seeds and chunkings) and packed as serving systems would get them: two with
``mcnc pack --base`` (theta0 references the base safetensors file), one with ``save_model``
(the base stored in the file). A mixed batch's logits equal, row by row, those of the base
with that row's adapter merged into a copy of it; the rebuilt factors equal the reader's
``get_lora_factors`` bit for bit; eviction and re-rebuild change nothing; generation with
mixed adapters equals each adapter's own; an adapter of another base is refused.

Inputs are fresh each run, seeded from ``MCNC_TEST_SEED`` or a random seed printed on failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from serving_helpers import ADAPTERS, make_bank, make_llama, make_tokens, merged_model, serve
from torch_helpers import SEED, assert_same_outputs, one_thread  # noqa: F401 (autouse)

import mcnc_format
import mcnc_format as mf
from mcnc_format import GeneratorSpec
from mcnc_format.errors import MCNCError, UsageError
from mcnc_format.serving import AdapterBank


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return serve(tmp_path_factory)


def test_factors_equal_the_readers_bit_for_bit(served):
    bank = make_bank(served)
    for name, path in served[1].items():
        factors = bank.factors(name)
        with mcnc_format.open(path) as f:
            loras = [t for t in f.keys() if f.tensor_info(t).encoding == "lora"]  # noqa: SIM118
            assert sorted(factors) == sorted(t.removesuffix(".weight") for t in loras)
            for tensor in loras:
                a, b, scale = f.get_lora_factors(tensor)
                got_a, got_b, got_scale = factors[tensor.removesuffix(".weight")]
                assert torch.equal(got_a, a) and torch.equal(got_b, b), (SEED, name, tensor)
                assert got_scale == scale
    stats = bank.stats()
    # Kilobytes resident; "a" and "c" share one generator (same seed and architecture).
    assert stats.adapters == 3 and stats.generators == 2
    assert stats.resident_bytes < stats.factor_bytes / 4


def test_mixed_batch_equals_each_adapter_merged_into_its_own_base(served):
    bank = make_bank(served)
    rows = ["b", None, "a", "a", "c", "b"]
    tokens = make_tokens(len(rows), 9, 100)
    with torch.no_grad():
        logits = bank(tokens, adapters=rows).logits
        for i, name in enumerate(rows):
            model = served[0] if name is None else merged_model(served, name)
            want = model(tokens[i : i + 1]).logits[0]
            assert_same_outputs(logits[i], want)
            if name is not None:  # the same arithmetic as the trained model's adapter path
                trained = served[2][name](tokens[i : i + 1]).logits[0]
                torch.testing.assert_close(logits[i], trained, rtol=0, atol=1e-6)
        assert not torch.allclose(logits[0], logits[1])
        # the base model is left as it was: no hooks after the call
        assert torch.equal(served[0](tokens).logits, bank(tokens, adapters=[None] * 6).logits)


def _factor_bytes(factors) -> int:
    return sum(a.nbytes + b.nbytes for a, b, _ in factors.values())


def test_eviction_and_rebuild_give_the_same_result(served):
    roomy = make_bank(served)
    sizes = {n: _factor_bytes(roomy.factors(n)) for n in ADAPTERS}
    assert sizes["a"] + sizes["b"] == sizes["c"]  # ranks 4, 4 and 8 on the same modules
    tight = make_bank(served, cache=sizes["c"])  # room for "c", or for "a" and "b"
    tokens = make_tokens(3, 7, 200)
    cached = [("a",), ("a", "b"), ("c",)] * 2
    with torch.no_grad():
        want = {n: roomy(tokens, adapters=[n] * 3).logits for n in ADAPTERS}
        for name, expected in zip([*ADAPTERS, *ADAPTERS], cached, strict=True):
            assert torch.equal(tight(tokens, adapters=[name] * 3).logits, want[name])
            assert tight.stats().cached == expected
            assert tight.stats().factor_bytes <= sizes["c"]
    assert tight.stats().rebuilds == 6
    with pytest.raises(UsageError, match="factor_cache_bytes"):
        tight.prepare(["a", "c"])
    tight.remove("a")
    assert "a" not in tight and tight.names() == ["b", "c"]
    with pytest.raises(UsageError, match="no adapter named 'a'"):
        tight(tokens, adapters=["a", None, None])


def _assert_same_sequence(mixed: torch.Tensor, alone: torch.Tensor, what: object) -> None:
    """A row of a batch equals the sequence generated alone, then padding (a row that met
    the end-of-sequence token is padded while the others go on: greedy search pads with the
    pad token, 0 here, beam search with the end-of-sequence token, LlamaConfig's 2)."""
    assert torch.equal(mixed[: alone.numel()], alone), (SEED, what)
    assert set(mixed[alone.numel() :].tolist()) <= {0, 2}, (SEED, what)


def test_generate_with_mixed_adapters_equals_each_adapters_own(served):
    bank = make_bank(served)
    rows = ["a", "c", None, "b"]
    prompts = make_tokens(len(rows), 5, 300)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = bank.generate(prompts, adapters=rows, **kwargs)
        for i, name in enumerate(rows):
            model = served[0] if name is None else merged_model(served, name)
            _assert_same_sequence(mixed[i], model.generate(prompts[i : i + 1], **kwargs)[0],
                                  name)
        # beams: the widened batch is mapped back to its rows
        beams = bank.generate(prompts[:2], adapters=rows[:2], num_beams=2, **kwargs)
        for i, name in enumerate(rows[:2]):
            alone = merged_model(served, name).generate(prompts[i : i + 1], num_beams=2, **kwargs)
            _assert_same_sequence(beams[i], alone[0], (name, "beams"))


def test_adapters_cannot_change_while_a_call_is_served(served):
    """Adding, removing or preparing adapters from inside a call (a generate callback, or
    another thread) is refused: with Route.TRITON the call reads slab slots at every step, so
    an eviction switched a row to another adapter, or to none, mid-generation. The call goes
    on with the adapters it began with; after it, the bank changes as usual."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    bank = make_bank(served, cache=1 << 20)
    bank.remove("c")
    refused: list[str] = []

    class Churn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            for change in (lambda: bank.add("c", served[1]["c"]), lambda: bank.remove("a"),
                           lambda: bank.prepare(["b"]), lambda: bank.factors("a"),
                           lambda: bank(input_ids, adapters=["a"] * len(input_ids))):
                with pytest.raises(UsageError, match="while the bank serves a call") as excinfo:
                    change()
                refused.append(str(excinfo.value))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    rows, prompts = ["a", "b"], make_tokens(2, 5, 400)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = bank.generate(prompts, adapters=rows, **kwargs)
        churned = bank.generate(prompts, adapters=rows, **kwargs,
                                stopping_criteria=StoppingCriteriaList([Churn()]))
    assert torch.equal(churned, want) and len(refused) == 5 * 3
    assert bank.names() == ["a", "b"]
    bank.add("c", served[1]["c"])
    bank.remove("a")
    assert bank.names() == ["b", "c"]


def test_an_adapter_for_another_base_is_refused(served, tmp_path):
    files = served[1]
    wider = AdapterBank(make_llama(hidden=48), device="cpu", factor_cache_bytes=1 << 20)
    with pytest.raises(MCNCError, match="shape"):
        wider.add("a", files["a"])
    other_names = AdapterBank(torch.nn.Sequential(torch.nn.Linear(32, 32)), device="cpu",
                              factor_cache_bytes=1 << 20)
    with pytest.raises(MCNCError, match=r"not the weight of an nn\.Linear"):
        other_names.add("a", files["a"])
    retrained = make_llama()  # same names and shapes, other weights
    with torch.no_grad():
        retrained.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    bank = AdapterBank(retrained, device="cpu", factor_cache_bytes=1 << 20)
    for name in ("a", "c"):  # an external sha256 pin; the base stored in the file
        with pytest.raises(MCNCError, match="another base"):
            bank.add(name, files[name])
    bank.add("a", files["a"], check_base=False)
    assert bank.names() == ["a"]
    plain = tmp_path / "plain.mcnc"
    mcnc_format.save(plain, {"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(MCNCError, match="no lora tensor"):
        bank.add("plain", plain, check_base=False)
    with pytest.raises(UsageError, match="one adapter"):
        bank(make_tokens(2, 3, 0), adapters=["a"])


def test_a_base_changed_after_an_add_is_checked_again(served):
    """The bank hashes a base weight once per version of its data: after the base model is
    changed in place, or a weight replaced, the next adapter pinned to the old base is
    refused (it was accepted when the first digest was kept by name)."""
    import copy

    _, files, _ = served
    base = copy.deepcopy(served[0])
    bank = AdapterBank(base, device="cpu", factor_cache_bytes=1 << 20)
    bank.add("a", files["a"])
    q_proj = base.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q_proj.weight.add_(0.01)
    with pytest.raises(MCNCError, match="another base"):
        bank.add("again", files["a"])
    original = served[0].model.layers[0].self_attn.q_proj.weight
    q_proj.weight = torch.nn.Parameter(original.detach().clone())  # the old bytes again
    bank.add("again", files["a"])
    q_proj.weight = torch.nn.Parameter(q_proj.weight.detach() * 2)
    with pytest.raises(MCNCError, match="another base"):
        bank.add("twice", files["a"])


def test_benchmark_quick_run(tmp_path):
    """The benchmark's smoke run completes and the bank agrees with PEFT (timings unchecked);
    with Triton, under ``TRITON_INTERPRET=1``, so that its Triton route's code runs too."""
    import json
    import os
    import subprocess
    import sys

    from mcnc_format.engine.backend import triton_available

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_adapters.py"
    out = tmp_path / "out.json"
    triton = triton_available()
    env = dict(os.environ, **({"TRITON_INTERPRET": "1"} if triton else {}))
    subprocess.run([sys.executable, str(script), "--size", "quick", "--threads", "1", "--json",
                    str(out)], check=True, capture_output=True, timeout=300, env=env)
    result = json.loads(out.read_text())
    assert result["resident"]["ratio"] > 10
    assert result["max_logit_difference_vs_peft"] < 1e-5
    routes = {"torch", "triton"} if triton else {"torch"}
    assert set(result["max_logit_difference_vs_peft_by_route"]) == routes
    assert set(result["prefill_seconds"]) == routes
    assert set(result["switch"]) == {"rebuild", "safetensors_warm", "safetensors_cold",
                                     "peft_warm", "peft_cold"}


def test_factors_in_groups_of_either_order_keep_their_roles(tmp_path: Path) -> None:
    """A module's A and B in segments of different m (two engine groups), B's group first for
    one module: the bank still hands out (A, B) as the reader does."""
    from mcnc_format import MCNC, LoRA, Segment

    base = torch.nn.Module()
    base.p = torch.nn.Linear(8, 8, bias=False)
    base.q = torch.nn.Linear(8, 8, bias=False)
    g = torch.Generator().manual_seed(5)
    spec = GeneratorSpec(k=3, d=16, hidden=(8,), seed=5)
    s1 = Segment(spec, torch.randn(8, 2, 3, generator=g), torch.randn(8, 2, generator=g) * 0.1)
    s2 = Segment(spec, torch.randn(8, 3, 3, generator=g), torch.randn(8, 3, generator=g) * 0.1)
    path = tmp_path / "swap.mcnc"
    mf.save(path, {"p.weight": LoRA(MCNC(s1, (8, 8)), MCNC(s2, (8, 8)), 0.5),
                   "q.weight": LoRA(MCNC(s2, (8, 8)), MCNC(s1, (8, 8)), 0.5)})
    bank = AdapterBank(base, device="cpu", factor_cache_bytes=1 << 20)
    bank.add("x", path, check_base=False)
    with mf.open(path) as f:
        for module in ("p", "q"):
            a, b, _ = f.get_lora_factors(f"{module}.weight")
            got_a, got_b, _ = bank.factors("x")[module]
            assert torch.equal(got_a, a) and torch.equal(got_b, b), module


def test_a_failed_add_leaves_no_generator_behind(tmp_path: Path) -> None:
    """An inline generator registered by an add that then fails is dropped, and a later add
    under the same name uses its own file's generator."""
    from mcnc_format import MCNC, LoRA, Segment, Theta0

    base = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    save_file({"t": torch.randn(2, 8)}, str(tmp_path / "ext.safetensors"))
    shapes = GeneratorSpec(k=3, d=16, hidden=(8,), seed=0).parameter_shapes()

    def adapter(path: Path, theta0: Theta0) -> Path:
        spec = GeneratorSpec(k=3, d=16, hidden=(8,), seed=None,
                             inline=tuple(torch.randn(s) for s in shapes))
        seg = Segment(spec, torch.randn(2, 2, 3), torch.randn(2, 2))
        mf.save(path, {"0.weight": LoRA(MCNC(seg, (2, 8), theta0=theta0), MCNC(seg, (8, 2)),
                                        0.5)})
        return path

    bad = adapter(tmp_path / "bad.mcnc", Theta0.external("ext.safetensors", "t", "0" * 64))
    good = adapter(tmp_path / "good.mcnc", Theta0.zeros())
    bank = AdapterBank(base, device="cpu", factor_cache_bytes=1 << 20)
    with pytest.raises(mf.ExternalReferenceDamaged):
        bank.add("x", bad)
    assert bank.stats().generators == 0
    bank.add("x", good)
    a, b, _ = mf.open(good).get_lora_factors("0.weight")
    got_a, got_b, _ = bank.factors("x")["0"]
    assert torch.equal(got_a, a) and torch.equal(got_b, b)


def test_a_multihead_attention_output_projection_is_refused(tmp_path: Path) -> None:
    """MultiheadAttention reads ``out_proj.weight`` without calling the Linear: a hook there
    would never run, so the bank refuses the adapter instead of ignoring it."""
    from mcnc_format import MCNC, LoRA, Segment

    base = torch.nn.Module()
    base.attn = torch.nn.MultiheadAttention(8, 2)
    g = torch.Generator().manual_seed(5)
    seg = Segment(GeneratorSpec(k=3, d=16, hidden=(8,), seed=5),
                  torch.randn(2, 1, 3, generator=g), torch.randn(2, 1, generator=g))
    path = tmp_path / "mha.mcnc"
    mf.save(path, {"attn.out_proj.weight": LoRA(MCNC(seg, (2, 8)), MCNC(seg, (8, 2)), 0.5)})
    bank = AdapterBank(base, device="cpu", factor_cache_bytes=1 << 20)
    with pytest.raises(MCNCError, match="MultiheadAttention"):
        bank.add("x", path, check_base=False)
