"""GPU loading: a pipelined loader and the fused Triton regeneration kernel.

``pipeline`` works everywhere (on the CPU it runs the eager path with synchronous copies);
``triton_kernels`` needs the optional ``mcnc-format[gpu]`` extra and is imported only when the
fused path is used. The public entry points are in ``mcnc_format.streaming``.
"""

from .pipeline import LoadOptions, PipelinedLoader, Progress, triton_available

__all__ = ["LoadOptions", "PipelinedLoader", "Progress", "triton_available"]
