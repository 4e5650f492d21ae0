"""Imported first by the test modules written against torch's current distributed API: on an
older torch (.ci/floor runs the suite on torch 2.3) the importing module is skipped, with
the reason, instead of failing to import."""

import pytest
from dist_helpers import OLD_DISTRIBUTED, requires_current_distributed

if requires_current_distributed.args[0]:
    pytest.skip(OLD_DISTRIBUTED, allow_module_level=True)
