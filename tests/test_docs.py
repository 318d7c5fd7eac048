"""The plugin tutorial in docs/plugins.md runs as written."""

import os
import re
from pathlib import Path

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
