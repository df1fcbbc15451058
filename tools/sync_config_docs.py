"""Regenerate the two mirrors of the config schema: pyproject's run-config defaults and the docs' reference.

Why: Flower reads the run-config defaults from ``[tool.flwr.app.config]`` and docs/configuration.md
documents every key; both are derived from :class:`common.config.FedA2VConfig` and ``tests/test_config.py`` fails when
they drift. Run ``python tools/sync_config_docs.py`` after changing the schema.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.config import FedA2VConfig, flatten, markdown_reference

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose files this rewrites

TABLE_HEAD = "| key | type | default | description |"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def pyproject_block() -> str:
    lines: list[str] = []
    previous = None
    for key, value in flatten(FedA2VConfig().model_dump(by_alias=True)).items():
        section = key.split(".")[0] if "." in key else ""
        if section != previous and lines:
            lines.append("")
        previous = section
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n\n"


def main() -> None:
    pyproject = ROOT / "pyproject.toml"
    text = pyproject.read_text()
    head = "[tool.flwr.app.config]\n"
    start = text.index(head) + len(head)
    end = text.index("[tool.pytest.ini_options]")
    pyproject.write_text(text[:start] + pyproject_block() + text[end:])
    page = ROOT / "docs" / "configuration.md"
    text = page.read_text()
    page.write_text(text[: text.index(TABLE_HEAD)] + markdown_reference() + "\n")
    print("updated pyproject.toml [tool.flwr.app.config] and docs/configuration.md's reference table")


if __name__ == "__main__":
    main()
