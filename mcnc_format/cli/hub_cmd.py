"""``mcnc push`` and ``mcnc pull``: publish to and fetch from the Hugging Face Hub.

The token, endpoint and offline mode are huggingface_hub's own (``hf auth login`` or
``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``). The work is ``mcnc_format.hub``.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import HubError
from ..hub import parse_uri, pull, push
from .json_out import emit_json, errors_as_json
from .safe_text import printable

__all__ = ["pull_command", "push_command"]


@click.command("push", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.argument("repo_id")
@click.option("--revision", help="Branch to push to (created if missing). Default: main.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--path-in-repo", help="Where the file (or the folder's content) goes.")
@click.option("-m", "--message", help="Commit message.")
@click.option("--base-model", help="Base model repo id for the model card.")
@click.option("--tag", "tags", multiple=True, help="Extra model card tag (repeatable).")
@click.option("--no-card", is_flag=True, help="Leave README.md alone.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (errors too) instead of text.")
def push_command(path: Path, repo_id: str, revision: str | None, private: bool,
                 path_in_repo: str | None, message: str | None, base_model: str | None,
                 tags: tuple[str, ...], no_card: bool, as_json: bool) -> None:
    """Upload PATH (an .mcnc file, or a folder) to the Hub repository REPO_ID in one commit,
    with a model card, and print the pinned hf:// URI of each file."""
    with errors_as_json(as_json, path, path=path, repo_id=repo_id, revision=revision):
        result = push(path, repo_id, revision, private, path_in_repo=path_in_repo,
                      commit_message=message, base_model=base_model, tags=tags,
                      model_card=not no_card)
    if as_json:
        emit_json({"repo_id": result.repo_id, "revision": result.revision,
                   "commit": result.commit, "paths": list(result.paths),
                   "uris": list(result.uris)})
        return
    click.echo(f"pushed {len(result.paths)} file(s) to "
               f"{printable(result.repo_id)}@{printable(result.revision)} "
               f"(commit {printable(result.commit)})", err=True)
    for uri in result.uris:
        click.echo(printable(uri))


@click.command("pull", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repo_id")
@click.argument("filename", required=False)
@click.option("--revision", help="Branch, tag or commit. Default: main.")
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Copy into this folder instead of only the Hugging Face cache.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (errors too) instead of text.")
def pull_command(repo_id: str, filename: str | None, revision: str | None,
                 local_dir: Path | None, as_json: bool) -> None:
    """Download FILENAME (or the whole repository) from REPO_ID and print its local path.

    REPO_ID may also be an hf://ORG/REPO[@REVISION][/PATH] URI. Every .mcnc file is checked
    against its checksums, and downloaded again once if damaged.
    """
    with errors_as_json(as_json, repo_id=repo_id, filename=filename, revision=revision):
        if repo_id.startswith("hf://"):
            uri = parse_uri(repo_id, require_path=False, error=HubError)
            repo_id, revision = uri.repo_id, revision or uri.revision
            filename = filename or uri.path or None
        local = pull(repo_id, filename, revision, local_dir=local_dir)
    if as_json:
        emit_json({"repo_id": repo_id, "filename": filename, "revision": revision,
                   "path": str(local)})
        return
    click.echo(printable(local))
