"""The GPU targets (issues 12, 14 and 25), in one place: ``bench_gpu.py`` prints its verdicts
against them and ``gpu_record.py`` writes each recorded run's verdicts. Torch-free."""

from __future__ import annotations

#: Same-run figures against the real alternative, and SPEC.md §10.1's error bounds.
TARGETS: dict[str, float] = {
    "fused_llama_params_per_s": 1.0e12,  # regeneration, LLaMA generator, bf16 out
    "warm_ratio": 1 / 30,  # from scratch, against safetensors.torch.load_file(device="cuda")
    "cold_ratio": 1 / 100,
    "delta_ratio": 1 / 3,  # base + delta, the base's digest cached
    "delta_ratio_full": 1 / 2,  # base + delta, hashing every byte of the base
    "delta_cold_ratio": 1.1,  # base + delta, page cache dropped: the disk is the bound
    "fp32_rel_error": 1e-5,  # SPEC.md §10.1: REGEN_RTOL
    "narrow_rel_error": 1e-4,  # REGEN_RTOL_16: f16 and bf16 outputs, before their rounding
    "workspace_min_bytes": 64 << 20,  # GPU peak <= weights + max(64 MiB, 2 % of weights)
    "workspace_fraction": 0.02,
    "lora_merged_over_base": 1.10,  # an MCNC-LoRA merged while its base streams in
    "adapters_per_gib": 500,  # the adapter bank, against PEFT's dense adapters
    "adapter_switch_speedup": 10,  # against PEFT's load_adapter, warm
    "mixed_batch_speedup": 3,  # against PEFT serving one adapter at a time
}


def gpu_peak_allowed(weights_bytes: float) -> float:
    """The most GPU memory a load may hold at its peak: its outputs and a bounded workspace."""
    return weights_bytes + max(TARGETS["workspace_min_bytes"],
                               weights_bytes * TARGETS["workspace_fraction"])
