"""``MCNCError`` carries its rule, file, field and tensor as attributes; ``str`` is built from
them, and they survive pickling (errors cross process boundaries in data loaders)."""

from __future__ import annotations

import pickle

import pytest

import mcnc_format as mf
from mcnc_format import errors
from mcnc_format.header import Header


@pytest.mark.parametrize("cls", [errors.MCNCError, errors.HeaderError, errors.DeviceMemoryError,
                                 errors.HubFileNotFoundError, errors.MappingError])
def test_fields_format_the_message_and_survive_pickling(cls: type[errors.MCNCError]) -> None:
    exc = cls("expected a uint32", rule="R71", path="m.mcnc", field="tensors[3].theta0.seed",
              tensor="w")
    assert str(exc) == "m.mcnc: tensors[3].theta0.seed: expected a uint32 (R71)"
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls and str(back) == str(exc)
    assert (back.rule, back.path, back.field, back.tensor) == ("R71", "m.mcnc",
                                                                "tensors[3].theta0.seed", "w")
    assert str(cls("plain")) == "plain" and str(pickle.loads(pickle.dumps(cls("plain")))) == "plain"


def test_absent_parts_are_left_out() -> None:
    assert str(errors.FormatError("bad", rule="R1", path="f.mcnc")) == "f.mcnc: bad (R1)"
    assert str(errors.WriteError("bad", field="metadata")) == "metadata: bad"


def test_header_errors_name_the_field_and_rule() -> None:
    value = {"alignment": 64, "blobs": [], "generators": [], "segments": [], "metadata": {},
             "tensors": [{"name": "t", "encoding": "mcnc", "shape": [2], "dtype": "f32",
                          "segment": 0, "theta0": {"kind": "prng", "scheme": "uniform",
                                                   "seed": -1, "stream": 0, "bound": 1.0}}]}
    with pytest.raises(mf.HeaderError) as caught:
        Header.parse(value, "x.mcnc", 1)
    exc = caught.value
    assert (exc.rule, exc.path, exc.field) == ("R71", "x.mcnc", "tensors[0].theta0.seed")
    assert str(exc).startswith("x.mcnc: tensors[0].theta0.seed: expected an integer")
