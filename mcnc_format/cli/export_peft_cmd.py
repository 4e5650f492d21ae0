"""``mcnc export-peft FILE OUT_DIR``: an ``.mcnc`` LoRA adapter as a PEFT adapter folder.

The folder (``adapter_config.json`` + ``adapter_model.safetensors``) loads with
``peft.PeftModel.from_pretrained(base_model, OUT_DIR)``; see ``converters/peft_export.py``.
"""

from __future__ import annotations

from pathlib import Path

import click

from .json_out import emit_json, errors_as_json
from .safe_text import printable

__all__ = ["export_peft_command"]


@click.command("export-peft", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--base-model", default=None,
              help="base_model_name_or_path for adapter_config.json (default: the file's "
                   "info.base_model).")
@click.option("--task-type", default=None,
              help="PEFT task_type, e.g. CAUSAL_LM (default: none, a custom model).")
@click.option("--skip-non-lora", is_flag=True,
              help="Leave out tensors that are not lora instead of failing.")
@click.option("--force", is_flag=True, help="Overwrite an adapter already in OUT_DIR.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (errors too) instead of text.")
def export_peft_command(file: str, out_dir: Path, base_model: str | None,
                        task_type: str | None, skip_non_lora: bool, force: bool,
                        as_json: bool) -> None:
    """Export the lora tensors of FILE as a PEFT LoRA adapter folder OUT_DIR."""
    with errors_as_json(as_json, file, file=file, out_dir=out_dir):
        from ..converters.peft_export import export_peft  # torch: the factors are rebuilt

        result = export_peft(file, out_dir, base_model=base_model, task_type=task_type,
                             skip_non_lora=skip_non_lora, force=force)
    if as_json:
        emit_json({"file": file, "out_dir": str(result.folder), "modules": list(result.modules),
                   "rank": result.rank, "lora_alpha": result.lora_alpha,
                   "skipped": list(result.skipped)})
        return
    click.echo(f"wrote {printable(result.folder)} ({len(result.modules)} modules, r={result.rank}, "
               f"lora_alpha={result.lora_alpha})")
    if result.skipped:
        more = " ..." if len(result.skipped) > 5 else ""
        click.echo(f"skipped {len(result.skipped)} non-lora tensors: "
                   f"{printable(', '.join(result.skipped[:5]))}{more}", err=True)
