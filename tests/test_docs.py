"""The docs cannot rot silently: every CLI flag and every built-in plugin is documented."""
from pathlib import Path

import pytest

from optin import registry
from optin.cli import cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("command", ["list", "run", "score", "prune", "finetune", "compare", "bench", "export"])
def test_every_cli_flag_is_in_the_reference(command):
    text = (DOCS / "cli.md").read_text()
    assert f"`optin {command}" in text
    for param in cli.commands[command].params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert opt in text, f"{opt} of `optin {command}` is missing from docs/cli.md"


def test_every_builtin_plugin_is_described():
    text = (DOCS / "plugins.md").read_text()
    for info in registry.plugins():
        if info.origin == "optin":
            assert f"`{info.name}`" in text, f"{info.kind} {info.name} is missing from docs/plugins.md"
