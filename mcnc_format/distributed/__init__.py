"""Loading ``.mcnc`` files into sharded models through torch's distributed checkpointing (DCP).

``torch.distributed.checkpoint.load(model.state_dict(), storage_reader=MCNCStorageReader(p))``
fills FSDP2, tensor-parallel and 2-D sharded models: DCP works out the box of each tensor that
each rank holds, and every rank rebuilds exactly those boxes from the file's few kilobytes of
alpha/beta on its own device, with no collective carrying weights and no dense bytes anywhere.
``load`` is the same call with ``MCNCLoadPlanner``, whose checks of names and shapes raise
``UsageError`` on every rank. See docs/distributed.md.

An integration: the core never imports this package, and ``import mcnc_format`` does not
import ``torch.distributed``.
"""

from ..torch_compat import require_checkpoint_api

require_checkpoint_api("mcnc_format.distributed")

from .planner import MCNCLoadPlanner, load  # noqa: E402 (after the torch check)
from .storage import MCNCStorageReader, ReadStats  # noqa: E402

__all__ = ["MCNCLoadPlanner", "MCNCStorageReader", "ReadStats", "load"]
