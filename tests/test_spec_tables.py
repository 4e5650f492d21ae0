"""SPEC.md's tables and literals against ``mcnc_format.constants`` and the test vectors.

The spec is the contract and ``constants.py`` its executable copy; these tests parse the
spec's text so that an edit to either side that is not made to the other fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mcnc_format import constants as C
from mcnc_format import errors, philox, reference

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "spec" / "SPEC.md").read_text()
INDEX = json.loads((ROOT / "spec" / "vectors" / "index.json").read_text())


def section(number: int) -> str:
    """The text of ``## number.`` up to the next ``## `` heading."""
    match = re.search(rf"^## {number}\. .*?(?=^## )", SPEC, re.S | re.M)
    assert match, f"SPEC.md has no section {number}"
    return match.group(0)


def table_rows(text: str) -> list[list[str]]:
    """Cells of the markdown table rows in ``text`` (header and rule lines excluded)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|\s*-", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:]


def limits() -> dict[str, int]:
    out = {}
    for name, value in table_rows(section(9)):
        match = re.match(r"([\d,]+)", value)
        assert match, value
        out[name.strip("`")] = int(match.group(1).replace(",", ""))
    return out


def rules() -> dict[str, str]:
    """Rule id -> the error class cell of §12's table."""
    return {rule: error for rule, _, error in table_rows(section(12))}


@pytest.mark.parametrize(("name", "value"), sorted(limits().items()))
def test_limit_table_matches_constants(name: str, value: int) -> None:
    assert getattr(C, name) == value


def test_limit_table_is_complete() -> None:
    assert set(limits()) == {
        "MAX_HEADER_BYTES", "MAX_RANK", "MAX_TENSORS", "MAX_BLOBS", "MAX_GENERATORS",
        "MAX_SEGMENTS", "MAX_NAME_BYTES", "MAX_METADATA_ENTRIES", "MAX_METADATA_VALUE_BYTES",
        "MAX_K", "MAX_D", "MAX_HIDDEN_LAYERS", "MAX_HIDDEN_WIDTH", "MAX_M", "MAX_NUMEL",
        "MAX_ZSTD_RATIO", "MAX_GENERATOR_WEIGHTS",
    }
    assert "(2^48)" in section(9) and C.MAX_NUMEL == 2**48


def test_philox_constants() -> None:
    text = section(8)
    constants = [int(h, 16) for h in re.findall(r"`(0x[0-9A-Fa-f]{8})`", text)]
    assert constants == [C.PHILOX_M0, C.PHILOX_M1, C.PHILOX_W0, C.PHILOX_W1]
    assert f"Philox4x32 with {C.PHILOX_ROUNDS} rounds" in text


def test_philox_known_answers_in_spec() -> None:
    """The Random123 answers quoted in §8.1 hold for both implementations."""
    pattern = re.compile(r"counter `\(([^)]*)\)`, key `\(([^)]*)\)` gives `([0-9a-f\s]+)`")
    answers = pattern.findall(re.sub(r"\s+", " ", section(8)))
    assert len(answers) == 2
    for counter_text, key_text, output_text in answers:
        counter = tuple(int(w, 16) for w in counter_text.split(","))
        key = tuple(int(w, 16) for w in key_text.split(","))
        output = tuple(int(w, 16) for w in output_text.split())
        assert reference.philox4x32_ref(counter, key) == output  # type: ignore[arg-type]
        import torch

        words = philox.philox4x32(*(torch.tensor([c]) for c in counter), *key)
        assert tuple(int(w) for w in words) == output


def test_numerics_constants() -> None:
    text = re.sub(r"\s+", " ", SPEC)
    for name in ("REGEN_RTOL", "REGEN_RTOL_16"):
        rtol = re.search(rf"`{name} = ([0-9.e+-]+)`", text)
        assert rtol and float(rtol.group(1)) == getattr(C, name), name
    assert re.search(r"`NORMAL_ATOL = 2\^-18`", text) and C.NORMAL_ATOL == 2.0**-18
    allowance = re.search(r"`max\(MAX_ZSTD_RATIO \* length, ZSTD_MIN_DECODED_ALLOWANCE\)` = "
                          r"`max\((\d+) \* length, (\d+) MiB\)`", text)
    assert allowance, "§4's zstd bound"
    assert int(allowance.group(1)) == C.MAX_ZSTD_RATIO
    assert int(allowance.group(2)) << 20 == C.ZSTD_MIN_DECODED_ALLOWANCE
    assert f"`1 <= m <= {C.MAX_M}`" in text


def test_preamble_literals() -> None:
    text = section(2)
    magic = re.search(r"magic\s+= ((?:[0-9A-F]{2} ){7}[0-9A-F]{2})", text)
    assert magic and bytes.fromhex(magic.group(1)) == C.MAGIC
    assert re.search(rf"major \(u16\)\s+= {C.FORMAT_MAJOR}\b", text)
    assert re.search(rf"minor \(u16\)\s+= {C.FORMAT_MINOR}\b", text)
    assert re.search(rf"^{C.PREAMBLE_SIZE}\s+N\s+header", text, re.M)
    alignment = re.search(r"power of two in \[(\d+), 2\^(\d+)\]; the reference writer's "
                          r"default is (\d+)", section(3))
    assert alignment
    assert int(alignment.group(1)) == C.MIN_ALIGNMENT
    assert 1 << int(alignment.group(2)) == C.MAX_ALIGNMENT
    assert int(alignment.group(3)) == C.DEFAULT_ALIGNMENT


def test_zstd_frame_magic() -> None:
    """§2 names the bytes that start a Zstandard frame; the reader refuses anything else."""
    match = re.search(r"`ZSTD_FRAME_MAGIC` = `((?:[0-9A-F]{2} ){3}[0-9A-F]{2})`", section(2))
    assert match and bytes.fromhex(match.group(1)) == C.ZSTD_FRAME_MAGIC


def test_dtype_sizes() -> None:
    match = re.search(r"Dtype names: `([^`]+)`\s+with item sizes ([\d ]+)\.", section(1))
    assert match
    names, sizes = match.group(1).split(), [int(s) for s in match.group(2).split()]
    assert dict(zip(names, sizes, strict=True)) == C.DTYPE_SIZES


def test_codecs() -> None:
    match = re.search(r'codec: "(\w+)" \| "(\w+)"', section(4))
    assert match and match.groups() == C.CODECS


def test_encodings_theta0_kinds_and_schemes() -> None:
    assert {e.value for e in C.Encoding} == set(re.findall(r'encoding: "(\w+)"', section(6)))
    assert {k.value for k in C.Theta0Kind} == set(re.findall(r'\{kind: "(\w+)"', section(7)))
    assert {s.value for s in C.Scheme} == set(re.findall(r"^\| `(\w+)` \|", section(7), re.M))


def test_rule_error_classes_exist() -> None:
    for rule, cell in rules().items():
        names = re.findall(r"\b[A-Z]\w*Error\b", cell)
        assert names, rule
        for name in names:
            assert issubclass(getattr(errors, name), errors.MCNCError), (rule, name)


def test_every_rule_has_a_vector() -> None:
    """Every rule of §12 can be broken by a file, and some invalid vector breaks it."""
    covered = {v["rule"] for v in INDEX["invalid"]}
    assert set(rules()) == covered


def test_vectors_raise_the_rule_error() -> None:
    """Each invalid vector's error is (a subclass of) one its rule's row names, and errors
    the row says are raised "when read" come from read-stage vectors."""
    table = rules()
    for vector in INDEX["invalid"]:
        cell = table[vector["rule"]]
        allowed = [getattr(errors, n) for n in re.findall(r"\b[A-Z]\w*Error\b", cell)]
        error = getattr(errors, vector["error"])
        assert any(issubclass(error, a) for a in allowed), (vector["file"], cell)
        if "read)" in cell and vector["error"] == "UnsupportedFeatureError":
            assert vector["stage"] == "read", vector["file"]
    assert {v["stage"] for v in INDEX["invalid"] if v["rule"] == "R22"} == {"verify"}
