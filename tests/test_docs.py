"""The plugin tutorial in docs/plugins.md, and the documented plugin commands, run as written."""

import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_plugin_tutorial_runs(tmp_path, capsys):
    plugin, run = blocks("python")
    (tmp_path / "norm_filter.py").write_text(plugin)
    (tmp_path / "norm_prune.yaml").write_text(blocks("yaml")[0])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(run, "docs/plugins.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.strip() == str(576 - 2 * 32)


def test_cost_doc_example_runs():
    text = (DOC.parent / "cost.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "docs/cost.md", "exec"), {})


def test_architecture_doc_family_example_registers_a_family():
    from fico.adapters.family import FamilyRegistry

    text = (DOC.parent / "architecture.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace = {}
    exec(compile(block, "docs/architecture.md", "exec"), namespace)
    registry = FamilyRegistry()
    registry.register(type("Plugin", (), {"fico_model_families": staticmethod(namespace["fico_model_families"])}))
    assert "My-VLM" in [family.name for family in registry.families]


ROOT = DOC.parent.parent


def documented_plugin_commands():
    """(document, command) for every `fico ...` line of the README and docs that loads a
    plugin file, as printed (an indented block line, or inline code)."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in path.read_text().splitlines():
            for command in re.findall(r"`(fico [^`]*--plugin[^`]*)`", line) or (
                    [line.strip()] if line.startswith("    fico ") and "--plugin" in line else []):
                found.append((path.name, command))
    return found


def test_the_documented_plugin_commands_are_found():
    names = {name for name, _ in documented_plugin_commands()}
    assert {"README.md", "plugins.md", "recipes.md"} <= names


@pytest.mark.parametrize("document,command", documented_plugin_commands())
def test_documented_plugin_commands_run_as_printed(tmp_path, capsys, document, command):
    """Options before overrides, as the docs print them (argparse alone would reject the
    override after --plugin FILE)."""
    import shlex

    from fico.commands.cli import main

    words = shlex.split(command)
    cwd = os.getcwd()
    if "norm_filter.py" in command:  # the tutorial's own file (docs/plugins.md)
        (tmp_path / "norm_filter.py").write_text(blocks("python")[0])
        os.chdir(tmp_path)
    else:
        os.chdir(ROOT)
    try:
        assert main(words[1:]) == 0, command
    finally:
        os.chdir(cwd)
    name = re.search(r"\{name: (\w+)\}", command).group(1)
    assert f"{name} instead of attention_rank" in capsys.readouterr().out
