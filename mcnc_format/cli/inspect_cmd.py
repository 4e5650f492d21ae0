"""``mcnc inspect FILE``: what a file holds and how small it is, read from the header alone.

No blob is read, so inspecting a multi-gigabyte file is instant, and neither is torch imported
(``summary.read_file_header``: msgpack, zstandard and xxhash). ``--json`` prints the same facts
as one JSON object whose keys are documented in README.md ("mcnc inspect --json").
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from .. import constants as C
from ..engine.resolve import DefaultResolver
from ..engine.source import OpenedHeader
from ..header import GeneratorEntry, Header, LoRATensor, PRNGTheta0, TensorEntry
from ..summary import opened_summary, read_file_header, tensor_info
from .json_out import emit_json, errors_as_json
from .safe_text import markup_safe

__all__ = ["describe", "inspect"]

SUMMARY_KEYS = (
    "file_bytes",
    "header_bytes",
    "dense_bytes",
    "file_ratio",
    "weights_ratio",
    "parameters",
    "compressed_parameters",
    "stored_alpha_beta_values",
    "tensors",
    "segments",
    "generators",
    "format_version",
)
_SHOWN_VALUE_CHARS = 120
_PIPED_WIDTH = 160


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (stable keys, see README) instead of tables.")
def inspect(file: str, as_json: bool) -> None:
    """Show the tensors, sizes, generators and segments of an .mcnc FILE (header only)."""
    with errors_as_json(as_json, file, file=file):
        path = DefaultResolver().local_path(file)
        facts = describe(str(path), read_file_header(path, file))
    if as_json:
        emit_json(facts)
        return
    _print_tables(facts)


def describe(path: str, opened: OpenedHeader) -> dict[str, Any]:
    """Everything ``inspect`` shows of the file at ``path``, as plain JSON-ready values."""
    header = opened.header
    summary = opened_summary(opened)
    return {
        "file": path,
        "format_version": summary["format_version"],
        "alignment": header.alignment,
        "summary": {key: summary[key] for key in SUMMARY_KEYS},
        "metadata": dict(header.metadata),
        "info": dict(header.info),
        "tensors": [_tensor_facts(header, t) for t in header.tensors],
        "generators": [_generator_facts(i, g) for i, g in enumerate(header.generators)],
        "segments": _segment_facts(header),
    }


def _tensor_facts(header: Header, t: TensorEntry) -> dict[str, Any]:
    info = tensor_info(header, t)
    theta0 = t.theta0s()[0] if t.theta0s() else None
    facts: dict[str, Any] = {
        "name": t.name,
        "shape": list(t.shape),
        "dtype": t.dtype,
        "encoding": info.encoding,
        "stored_values": info.stored_values,
        "stored_bytes": info.stored_bytes,
        "theta0": info.theta0,
        "theta0_scheme": str(theta0.scheme) if isinstance(theta0, PRNGTheta0) else None,
        "segment": info.segment,
        "generator": info.generator,
    }
    if isinstance(t, LoRATensor):
        facts["scale"] = t.scale
        facts["factors"] = {
            part: {"shape": list(x.shape), "dtype": x.dtype, "segment": x.segment,
                   "offset": x.offset, "theta0": str(x.theta0.kind)}
            for part, x in (("A", t.A), ("B", t.B))
        }
    return facts


def _generator_facts(index: int, g: GeneratorEntry) -> dict[str, Any]:
    return {
        "index": index,
        "k": g.k,
        "d": g.d,
        "hidden": list(g.hidden),
        "activation": g.activation,
        "L": g.L,
        "omega0": g.omega0,
        "bias": g.bias,
        "normalize": g.normalize,
        "weights": g.weights.to_dict(),
    }


def _segment_facts(header: Header) -> list[dict[str, Any]]:
    members = [0] * len(header.segments)
    for t in header.tensors:
        for member in t.members():
            members[member.segment] += 1
    out = []
    for i, s in enumerate(header.segments):
        alpha, beta = header.blobs[s.alpha], header.blobs[s.beta]
        out.append({
            "index": i,
            "generator": s.generator,
            "chunks": s.chunks,
            "m": s.m,
            "members": members[i],
            "alpha": {"dtype": alpha.dtype, "codec": alpha.codec, "bytes": alpha.length},
            "beta": {"dtype": beta.dtype, "codec": beta.codec, "bytes": beta.length},
        })
    return out


# -- rendering -----------------------------------------------------------------------------
def _print_tables(facts: dict[str, Any]) -> None:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped to a file or a pager: do not fold names at 80 columns
        console = Console(highlight=False, width=max(console.width, _PIPED_WIDTH))
    console.print(_summary_panel(facts))
    console.print(_tensor_table(facts["tensors"]))
    if facts["generators"]:
        console.print(_generator_table(facts["generators"]))
    if facts["segments"]:
        console.print(_segment_table(facts["segments"]))


def _summary_panel(facts: dict[str, Any]) -> Panel:
    s = facts["summary"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("format version", f"{s['format_version']} (alignment {facts['alignment']})")
    grid.add_row("file size", f"{_bytes(s['file_bytes'])}, header {s['header_bytes']:,} bytes")
    grid.add_row("dense equivalent", _bytes(s["dense_bytes"]))
    grid.add_row("file ratio", f"{s['file_ratio']:,.1f}x  (dense bytes / file bytes)")
    grid.add_row("weights ratio", f"{s['weights_ratio']:,.1f}x  "
                 f"({s['compressed_parameters']:,} compressed parameters from "
                 f"{s['stored_alpha_beta_values']:,} stored alpha/beta values)")
    grid.add_row("parameters", f"{s['parameters']:,}")
    grid.add_row("entries", f"{s['tensors']:,} tensors, {s['segments']:,} segments, "
                 f"{s['generators']:,} generators")
    parts: list[Any] = [grid]
    for title in ("metadata", "info"):
        if facts[title]:
            table = Table.grid(padding=(0, 2))
            table.add_column(style="cyan")
            table.add_column(overflow="fold")
            for key, value in sorted(facts[title].items()):
                table.add_row(markup_safe(key), markup_safe(_shorten(value)))
            parts += [f"[bold]{title}[/bold]", table]
    return Panel(Group(*parts), title=markup_safe(facts["file"]), title_align="left", expand=False)


def _tensor_table(tensors: list[dict[str, Any]]) -> Table:
    table = Table(title="tensors (values, bytes: this tensor's share of what the file stores)",
                  title_justify="left")
    table.add_column("name", overflow="fold", min_width=12)
    for column in ("shape", "dtype", "encoding", "values", "bytes", "theta0", "seg", "gen"):
        table.add_column(column, justify="right" if column in ("values", "bytes", "seg", "gen")
                         else "left", overflow="fold")
    for t in tensors:
        segment = t["segment"]
        if "factors" in t:
            segment = f"A:{t['factors']['A']['segment']} B:{t['factors']['B']['segment']}"
        # Names and the other strings come from the file: no markup, no terminal controls.
        table.add_row(markup_safe(t["name"]), "x".join(map(str, t["shape"])) or "scalar",
                      markup_safe(t["dtype"]), markup_safe(t["encoding"]),
                      f"{t['stored_values']:,}", f"{t['stored_bytes']:,}",
                      markup_safe(t["theta0_scheme"] or t["theta0"] or "-"),
                      markup_safe(_dash(segment)), _dash(t["generator"]))
    return table


def _generator_table(generators: list[dict[str, Any]]) -> Table:
    table = Table(title="generators", title_justify="left")
    for column in ("#", "k", "d", "hidden", "L", "omega0", "bias", "normalize", "weights"):
        table.add_column(column, justify="right" if column in ("#", "k", "d") else "left")
    for g in generators:
        w = g["weights"]
        weights = f"philox seed {w['seed']}" if w["kind"] == C.WEIGHTS_PHILOX else (
            f"inline blobs {w['blobs']}")
        table.add_row(str(g["index"]), str(g["k"]), f"{g['d']:,}",
                      " -> ".join(map(str, g["hidden"])), f"{g['L']:g}", f"{g['omega0']:g}",
                      _yes(g["bias"]), _yes(g["normalize"]), weights)
    return table


def _segment_table(segments: list[dict[str, Any]]) -> Table:
    table = Table(title="segments", title_justify="left")
    for column in ("#", "generator", "chunks", "m", "members", "alpha", "beta"):
        table.add_column(column, justify="left" if column in ("alpha", "beta") else "right")
    for s in segments:
        table.add_row(str(s["index"]), str(s["generator"]), f"{s['chunks']:,}", str(s["m"]),
                      str(s["members"]), _blob_text(s["alpha"]), _blob_text(s["beta"]))
    return table


def _blob_text(blob: dict[str, Any]) -> str:
    return f"{blob['dtype']} {blob['codec']}, {_size(blob['bytes'])}"


def _size(n: int) -> str:
    """Bytes for people: ``9.5 KiB``; exact below a KiB."""
    if n < 1024:
        return f"{n:,} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:,.1f} {unit}"


def _bytes(n: int) -> str:
    """Exact and readable: ``9,768 bytes (9.5 KiB)``."""
    return f"{n:,} bytes" + (f" ({_size(n)})" if n >= 1024 else "")


def _shorten(value: str) -> str:
    return value if len(value) <= _SHOWN_VALUE_CHARS else value[:_SHOWN_VALUE_CHARS] + "…"


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
