"""Reading the JSON files of a model or export directory (``config.json``, ``griffin.json``,
``generation_config.json``...): one reader, whose short reasons the callers put into their own
one-line errors or reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from griffin_export.errors import first_line


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``ValueError`` with a short reason ("missing",
    "unreadable or not JSON (...)", "not a JSON object") otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable or not JSON ({first_line(exc, 200)})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data
