"""The example third-party plugin (docs/examples/optin-taylor) installs, is discovered and runs end to end.

Installs the example into the current environment with pip (editable, so running this test twice is
harmless), then checks in fresh processes what a plugin author would see: ``optin list --json`` shows the
``taylor`` and ``activation`` scorers from distribution ``optin-taylor`` and its ``toy-polarity`` task, and
``optin run --scorer taylor`` prunes a tiny BERT to the budget.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "optin-taylor"

POSITIVE = ["good", "great", "fine", "lovely", "nice", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "ugly", "boring"]
NOUNS = ["film", "movie", "plot", "cast", "story", "music"]


def _env(tmp_path: Path) -> dict[str, str]:
    # light on CPU (the machine is shared) and never reaching for the network
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "OPTIN_CACHE": str(tmp_path / "cache")}


def _install_example() -> None:
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not available in this environment")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check"]
    if importlib.util.find_spec("setuptools") is not None:  # build with the local setuptools, offline
        cmd.append("--no-build-isolation")  # (without it, pip fetches setuptools from the package index)
    res = subprocess.run(cmd + ["-e", str(EXAMPLE)], capture_output=True, text=True)
    assert res.returncode == 0, f"pip install failed:\n{res.stdout}\n{res.stderr}"


def _write_data(path: Path) -> list[str]:
    """A CSV of short labelled phrases; returns the words it uses."""
    rows = []
    for adjs, label in ((POSITIVE, "pos"), (NEGATIVE, "neg")):
        for a in adjs:
            for n in NOUNS:
                rows.append({"text": f"the {n} was {a}", "label": label})
                rows.append({"text": f"a {a} {n}", "label": label})
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return ["the", "was", "a", *POSITIVE, *NEGATIVE, *NOUNS]


def _write_model(path: Path, words: list[str]) -> None:
    """A randomly initialised 2-layer BERT classifier with a word-level vocabulary."""
    import torch
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    path.mkdir(parents=True)
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab_file))
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def test_example_plugin_is_discovered_and_runs(tmp_path: Path) -> None:
    _install_example()
    env = _env(tmp_path)

    listed = subprocess.run([sys.executable, "-m", "optin.cli", "list", "--json"], capture_output=True,
                            text=True, env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    info = json.loads(listed.stdout)
    taylor = [p for p in info["plugins"] if p["kind"] == "scorer" and p["name"] == "taylor"]
    assert len(taylor) == 1, info["plugins"]
    assert taylor[0]["origin"] == "optin-taylor"
    assert taylor[0]["available"], taylor[0]["error"]
    assert taylor[0]["target"] == "optin_taylor:TaylorScorer"
    activation = [p for p in info["plugins"] if p["kind"] == "scorer" and p["name"] == "activation"]
    assert len(activation) == 1 and activation[0]["origin"] == "optin-taylor" and activation[0]["available"]
    assert activation[0]["target"] == "optin_taylor.activation:ActivationScorer"
    assert activation[0]["summary"].startswith("Activation size")
    assert "toy-polarity" in info["tasks"]  # the hook-style contribution of the same package
    assert not info["broken_hooks"]

    data = tmp_path / "polarity.csv"
    model = tmp_path / "tiny-bert"
    _write_model(model, _write_data(data))
    out = tmp_path / "run"
    ran = subprocess.run(
        [sys.executable, "-m", "optin.cli", "run", "--scorer", "taylor", "--data", str(data), "--model", str(model),
         "--budget", "0.6", "--calib-size", "16", "--eval-size", "32", "--set", "micro_batch=4", "--quiet",
         "--output", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ran.returncode == 0, f"optin run failed:\n{ran.stdout}\n{ran.stderr}"
    report = json.loads((out / "report.json").read_text())
    assert report["scorer"] == "taylor"
    assert report["options"] == {"micro_batch": 4}
    assert report["calibration_examples"] == 16
    # the searcher may round up by its 1e-6 MACs tolerance, nothing more
    assert report["macs_after"] <= 0.6 * report["macs_before"] + 1e-6
    assert (out / "model" / "optin-plan.json").is_file()

    from optin.rankings import Scores

    scores = Scores.load(out / "scores.safetensors")  # describe() is stored with the scores
    assert scores.scorer == "taylor" and scores.options == {"micro_batch": 4}
    assert all(float(t.min()) >= 0 for ts in scores.values.values() for t in ts)  # absolute values


def test_example_plugin_own_tests_pass(tmp_path: Path) -> None:
    """The unit tests the example ships for its authors (docs/examples/optin-taylor/tests) pass."""
    _install_example()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                         capture_output=True, text=True, env=_env(tmp_path), cwd=EXAMPLE)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"


MISSPELLED_HOOK = '''"""A hook plugin with a typo: pluggy's hook is optin_tasks."""
from optin.hooks import hookimpl


@hookimpl
def optin_task():
    return {}
'''


def test_a_misspelled_hook_is_listed_as_broken_naming_it(tmp_path: Path) -> None:
    """A package whose ``optin.hooks`` module implements ``optin_task`` (no such hook) is reported as broken
    by ``optin list`` with the hook's name, and every other hook plugin still works.

    The package is pip-installed into a folder of its own that only the ``optin`` subprocesses see
    (``PYTHONPATH``): other processes using the shared environment meanwhile never see the broken plugin,
    and there is nothing to uninstall."""
    if importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None:
        pytest.skip("needs pip and setuptools to build the test package offline")
    pkg = tmp_path / "pkg"
    (pkg / "optin_typo").mkdir(parents=True)
    (pkg / "optin_typo" / "__init__.py").write_text(MISSPELLED_HOOK)
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "optin-typo"\nversion = "0.1.0"\n\n'
        '[project.entry-points."optin.hooks"]\ntypo-tasks = "optin_typo"\n\n'
        '[tool.setuptools]\npackages = ["optin_typo"]\n')
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                          "--disable-pip-version-check", "--target", str(site), str(pkg)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"pip install failed:\n{res.stdout}\n{res.stderr}"
    env = {**_env(tmp_path), "PYTHONPATH": str(site), "COLUMNS": "200"}

    listed = subprocess.run([sys.executable, "-m", "optin.cli", "list", "--json"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    info = json.loads(listed.stdout)
    assert "unknown hook 'optin_task'" in info["broken_hooks"]["typo-tasks"]
    assert "optin_tasks" in info["broken_hooks"]["typo-tasks"]  # the message lists the hooks that exist
    assert {"trec", "fashion-mnist"} <= set(info["tasks"]) and "minilm-trec" in info["models"]

    table = subprocess.run([sys.executable, "-m", "optin.cli", "list"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "typo-tasks" in table.stdout and "'optin_task'" in table.stdout
