"""The example plugin package in plugins/fico-key-norm installs and registers through its entry point."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

import fico

PACKAGE = Path(__file__).resolve().parent.parent / "plugins" / "fico-key-norm"


def test_plugin_package_installs_and_is_used(tmp_path, monkeypatch, tiny_model, single_inputs):
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(PACKAGE, source)  # builds write into the source tree; keep the checkout clean
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)], check=True)
    monkeypatch.syspath_prepend(str(target))
    registry = fico.Registry()
    assert registry.components["filter"]["key_norm"].__module__ == "fico_key_norm.plugin"
    recipe = fico.load_recipe("fastv", ["steps.0.filter={name: key_norm}"], registry=registry)
    model = tiny_model(dtype=torch.float32)
    with torch.no_grad(), fico.apply(model, recipe) as run:
        logits = model(**single_inputs(torch.float32)).logits
    assert run.trace.steps[0].removed == 288 and torch.isfinite(logits).all()
    for name in [m for m in sys.modules if m.startswith("fico_key_norm")]:
        del sys.modules[name]
