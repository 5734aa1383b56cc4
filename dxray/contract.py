"""The language-neutral data contract, generated into ``schemas/``: the config's JSON Schema
(``config.schema.json``) and one Arrow schema file per output table (``tables/{table}.arrow.json``).
A test keeps the committed files in step."""

from __future__ import annotations

import json
from pathlib import Path

from dxray.config import Config
from dxray.storage.schemas import export_schemas


def config_json_schema() -> str:
    return json.dumps(Config.model_json_schema(), indent=2, sort_keys=True) + "\n"


def write_contract(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.schema.json"
    config_path.write_text(config_json_schema())
    return [config_path, *export_schemas(folder / "tables")]
