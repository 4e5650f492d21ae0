"""The one engine that rebuilds tensors, or any box of one, for every caller.

Data flows one way: a request (names, boxes, device, dtype) -> a plan (``plan.py``: pure, no
I/O) -> the executor (``execute.py``), which reads byte ranges (``source.py``, ``theta0.py``),
stages them onto the device (``staging.py``) and regenerates (``fused.py``, and the Triton
kernel of ``triton_kernels.py`` on CUDA) straight into the outputs. The reader, ``load``,
``verify``, ``unpack`` and the integrations are all callers of this one path.
"""
