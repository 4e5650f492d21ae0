"""The model card (README.md) that ``mcnc push`` writes or merges.

Why merge rather than write: a repository's card is its owners' text. A push only sets the
metadata the Hub uses to find and label the model (``library_name``, ``tags``,
``base_model``) and rewrites one marked section holding the facts of the ``.mcnc`` files; any
other text and metadata are kept, and pushing the same files again gives the same card.
Parsing and rendering the YAML block is left to ``huggingface_hub.ModelCard``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .errors import MCNCError
from .header import ExternalTheta0, Header, InlineWeights, LoRATensor
from .summary import opened_summary, read_file_header
from .uri import SCHEME, HubURI, parse_uri

if TYPE_CHECKING:
    from .reader import MCNCFile

__all__ = [
    "LIBRARY_NAME",
    "SECTION_BEGIN",
    "SECTION_END",
    "SECTION_MARK",
    "FileFacts",
    "TransformersUsage",
    "render_card",
]

LIBRARY_NAME = "mcnc-format"
TAGS = ("mcnc",)
#: Where the section begins; the rest of the comment names the writer (``section_begin``).
SECTION_MARK = "<!-- mcnc-format:begin"
#: Who writes the section: ``mcnc push`` (``mcnc_format.hub.push``), or ``save_pretrained``
#: for a folder not pushed yet.
PUSH_WRITER = "`mcnc push` (mcnc_format.hub.push)"
SAVE_PRETRAINED_WRITER = "`mcnc_format.transformers.save_pretrained`"
SECTION_END = "<!-- mcnc-format:end -->"
_ROW = re.compile(r"^\| `(?P<path>[^`]+)` \|.*$", re.MULTILINE)
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_PIPE = "\\|"  # a "|" inside a table cell
#: Characters of a path that Markdown or the card's own markers would read (``_cell_path``).
_UNSAFE = re.compile(r"[%`<>\x00-\x1f\x7f]")
_DEFAULT_BRANCH = "main"
# The files of a transformers model saved by mcnc_format.transformers.save_pretrained.
CONFIG_FILE = "config.json"
TRANSFORMERS_FILES = (CONFIG_FILE, "model.mcnc")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class TransformersUsage:
    """The card's example builds a transformers model (``config.json`` + ``model.mcnc``) with
    ``mcnc_format.transformers.from_pretrained`` instead of loading a state dict, and loads
    the tokenizer when the repository has one."""

    tokenizer: bool

    @classmethod
    def detect(cls, paths: Collection[str], config: Path | None) -> TransformersUsage | None:
        """The usage for a repository holding ``paths`` whose ``config.json`` is the local file
        ``config`` (None when it is not being pushed), or None if it is no such model: a
        transformers config names its ``model_type``; other code's config.json need not."""
        if config is None or not all(name in paths for name in TRANSFORMERS_FILES):
            return None
        try:
            body = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(body, dict) or not isinstance(body.get("model_type"), str):
            return None
        return cls(tokenizer=any(name in paths for name in TOKENIZER_FILES))

    def lines(self, source: str, revision: str | None) -> list[str]:
        """The example's code: ``source`` is a repo id or a local folder."""
        pin = f", revision={json.dumps(revision)}" if revision else ""
        imports = ["from mcnc_format.transformers import from_pretrained"]
        calls = [f"model = from_pretrained({json.dumps(source)}{pin})"]
        if self.tokenizer:
            imports.append("from transformers import AutoTokenizer")
            calls.append(f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(source)}{pin})")
        return [*imports, "", *calls]


@dataclass(frozen=True)
class FileFacts:
    """What the card's table says about one ``.mcnc`` file, read from its header."""

    path: str
    parameters: int
    file_ratio: float
    weights_ratio: float
    generators: str
    file_bytes: int
    dense_bytes: int
    has_lora: bool
    base_models: tuple[str, ...]

    @classmethod
    def of(cls, path_in_repo: str, mcnc_file: MCNCFile) -> FileFacts:
        """The facts of an open file."""
        return cls.from_header(path_in_repo, mcnc_file.header, mcnc_file.summary())

    @classmethod
    def read(cls, path_in_repo: str, local: Path) -> FileFacts:
        """The facts of the local file ``local``, from its header alone (no torch)."""
        opened = read_file_header(local, str(local))
        return cls.from_header(path_in_repo, opened.header, opened_summary(opened))

    @classmethod
    def from_header(cls, path_in_repo: str, header: Header, summary: dict[str, Any]
                    ) -> FileFacts:
        return cls(
            path=path_in_repo,
            parameters=summary["parameters"],
            file_ratio=summary["file_ratio"],
            weights_ratio=summary["weights_ratio"],
            generators=_describe_generators(header),
            file_bytes=summary["file_bytes"],
            dense_bytes=summary["dense_bytes"],
            has_lora=any(isinstance(t, LoRATensor) for t in header.tensors),
            base_models=_base_models(header),
        )

    def row(self) -> str:
        cells = [f"`{_cell_path(self.path)}`", f"{self.parameters:,}",
                 f"{self.file_ratio:.1f}x", f"{self.weights_ratio:.1f}x", self.generators,
                 _size(self.file_bytes), _size(self.dense_bytes)]
        return "| " + " | ".join(cells) + " |"


def render_card(existing: str | None, repo_id: str, facts: Sequence[FileFacts], *,
                base_model: str | None = None, tags: Iterable[str] = (),
                keep_rows_for: Collection[str] = (), revision: str | None = None,
                transformers: TransformersUsage | None = None,
                local_folder: str | None = None) -> str:
    """The card after a push of ``facts``' files to branch ``revision`` of ``repo_id``.

    ``existing`` is the current README.md (None for a new repo). Table rows of files listed
    in ``keep_rows_for`` (still in the repo) but not pushed now are kept. The loading example
    names ``revision`` unless it is the default branch; with ``transformers`` it builds the
    model with ``mcnc_format.transformers.from_pretrained``, from ``local_folder`` when the
    card describes a folder not yet pushed (``save_pretrained``, which the section then names
    as its writer; otherwise ``mcnc push``). ``base_model``
    given here wins over the card's value, which wins over one found in the files (an
    ``hf://`` theta0 reference, or ``info.base_model`` when it looks like a repo id).
    """
    from huggingface_hub import ModelCard

    name = repo_id.rsplit("/", 1)[-1]
    content = existing or f"---\nlibrary_name: {LIBRARY_NAME}\n---\n\n# {name}\n"
    try:
        card = ModelCard(content)
    except ValueError as exc:
        raise MCNCError(f"{repo_id}: README.md: its YAML metadata cannot be parsed ({exc}); "
                        "fix it, or push without a model card (--no-card)") from exc
    data = card.data
    data.library_name = LIBRARY_NAME
    extra = ("lora",) if any(f.has_lora for f in facts) else ()
    data.tags = _union(_as_list(data.tags), TAGS, extra, tags)
    inferred = _union(*(f.base_models for f in facts))
    chosen = base_model or data.base_model or (inferred[0] if len(inferred) == 1 else inferred)
    if chosen:
        data.base_model = chosen
    section = _section(repo_id, revision, card.text, facts, keep_rows_for,
                       transformers, local_folder)
    card.text = _with_section(card.text, section)
    return str(card)


def section_begin(writer: str) -> str:
    """The comment that opens the section, naming who wrote it."""
    return f"{SECTION_MARK} (written by {writer}; edits here are replaced) -->"


SECTION_BEGIN = section_begin(PUSH_WRITER)


def _section(repo_id: str, revision: str | None, text: str, facts: Sequence[FileFacts],
             keep_rows_for: Collection[str], transformers: TransformersUsage | None,
             local_folder: str | None) -> str:
    rows = {path: match.group(0) for match in _ROW.finditer(_old_section(text))
            if (path := unquote(match["path"].replace(_PIPE, "|"))) in keep_rows_for}
    rows.update({f.path: f.row() for f in facts})
    intro = [
        section_begin(SAVE_PRETRAINED_WRITER if local_folder else PUSH_WRITER),
        "## MCNC files",
        "",
        "Weights in the `.mcnc` format of the `mcnc-format` library: each chunk of a "
        "compressed tensor is rebuilt from a few coefficients by a small random generator "
        "network, so the files are much smaller than the dense weights. `file_ratio` is the "
        "dense bytes over the file's bytes (what shipping the file saves, everything "
        "included); `weights_ratio` is the compressed parameters over the stored alpha-beta "
        "values (how much MCNC shrinks the weights it compresses), as `mcnc inspect` reports "
        "them.",
        "",
    ]
    if not rows:  # e.g. a push of a folder holding only config files
        return "\n".join([*intro, "This repository holds no `.mcnc` files yet.", SECTION_END])
    paths = sorted(rows)
    branch = None if revision in (None, _DEFAULT_BRANCH) else revision
    if transformers is not None:
        usage = transformers.lines(local_folder or repo_id, None if local_folder else branch)
    else:
        shown = next((path for path in paths if not _UNSAFE.search(path)), paths[0])
        example = json.dumps(str(HubURI(repo_id, branch, shown)), ensure_ascii=False)
        usage = ["import mcnc_format", "", f"state_dict = mcnc_format.load({example})"]
    return "\n".join([
        *intro,
        "| File | Parameters | file_ratio | weights_ratio | Generator | File size | Dense size |",
        "|---|---:|---:|---:|---|---:|---:|",
        *(rows[path] for path in paths),
        "",
        "```python",
        *usage,
        "```",
        SECTION_END,
    ])


def _old_section(text: str) -> str:
    start = text.find(SECTION_MARK)
    end = text.find(SECTION_END, start)
    return text[start:end] if start >= 0 and end >= 0 else ""


def _with_section(text: str, section: str) -> str:
    """Replace the marked section in place, or append it: idempotent by construction."""
    start = text.find(SECTION_MARK)
    end = text.find(SECTION_END, start)
    if start >= 0 and end >= 0:
        return text[:start] + section + text[end + len(SECTION_END):]
    body = text.rstrip("\n")
    return f"{body}\n\n{section}\n" if body.strip() else f"\n{section}\n"


def _cell_path(path: str) -> str:
    """A repository path as the table shows it, inert in Markdown: ``%``, backticks, ``<``,
    ``>`` and control characters percent-encoded (a file named with the section's end
    marker, a backtick or a newline would otherwise end the section, the code span or the
    row), ``|`` escaped; ``unquote`` after unescaping ``|`` gives the path back."""
    encoded = _UNSAFE.sub(lambda match: f"%{ord(match[0]):02X}", path)
    return encoded.replace("|", _PIPE)


def _describe_generators(header: Header) -> str:
    kinds = []
    for g in header.generators:
        layers = "x".join(str(h) for h in g.hidden)
        source = "stored" if isinstance(g.weights, InlineWeights) else "seeded"
        kinds.append(f"k={g.k}, d={g.d}, {layers} sine MLP ({source})")
    return "; ".join(dict.fromkeys(kinds)) or "none"


def _base_models(header: Header) -> tuple[str, ...]:
    """Repos referenced by ``hf://`` theta0 entries, then ``info.base_model`` if a repo id."""
    found: list[str] = []
    for t in header.tensors:
        for entry in t.theta0s():
            if isinstance(entry, ExternalTheta0) and entry.uri.startswith(SCHEME):
                found.append(parse_uri(entry.uri).repo_id)
    declared = header.info.get("base_model", "")
    if _REPO_ID.match(declared):
        found.append(declared)
    return tuple(dict.fromkeys(found))


def _as_list(value: object) -> list[str]:
    """Card tags as a list: YAML allows one string as well as a list."""
    if isinstance(value, str):
        return [value]
    return [str(item) for item in value] if isinstance(value, Iterable) else []


def _union(*groups: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(item for group in groups for item in group))


def _size(nbytes: int) -> str:
    """Binary units, one decimal: ``1.5 MiB``."""
    exponent = min((max(nbytes, 1).bit_length() - 1) // 10, len(_UNITS) - 1)
    if exponent == 0:
        return f"{nbytes} B"
    return f"{nbytes / 1024**exponent:.1f} {_UNITS[exponent]}"
