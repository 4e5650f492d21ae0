"""What the MCNC training tests share: the seed, the output tolerance, one intra-op thread."""

from __future__ import annotations

import os

import pytest
import torch

OUTPUT_RTOL = 1e-5
SEED = int(os.environ.get("MCNC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread avoids OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_outputs(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within ``OUTPUT_RTOL`` of the output's scale; names the seed when not."""
    scale = want.abs().max().item()
    assert torch.allclose(got, want, rtol=OUTPUT_RTOL, atol=OUTPUT_RTOL * scale), (
        f"seed {SEED}: max difference {(got - want).abs().max().item():.3g} at output scale "
        f"{scale:.3g}")


def assert_state_dict_packs_like_the_model(model: torch.nn.Module, directory) -> bytes:
    """``save_model`` and ``export_state_dict`` of a ``weights_only`` reload of the plain state
    dict write the same bytes; returns them."""
    import io

    import mcnc_format
    from mcnc_format.torch import export_state_dict, save_model

    first = save_model(model, directory / "a.mcnc").read_bytes()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    mcnc_format.save(directory / "b.mcnc", export_state_dict(state))
    assert (directory / "b.mcnc").read_bytes() == first
    return first
