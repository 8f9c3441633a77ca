"""docs/own-model-and-data.md cannot rot: its Python blocks marked ``<!-- test: run -->`` are executed as they are,
and every ``$ optin ...`` command of the page runs as written, in one working folder holding tiny stand-ins of
the page's models and data (the same forms, a few generated images). Substitutions, each said here: the
timm checkpoint's architecture is a tiny registered Swin of the same family, and ``optin run`` scores with
``--scorer magnitude --quiet`` (the default trajectory scorer is tested elsewhere; here it would only be slow)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import NEGATIVE, POSITIVE, save_tiny_bert
from optin.cli import cli
from test_model_sources import image_folder  # also registers the tiny timm architecture "optin_test_swin"
from test_own_data import segmentation_folder

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-model-and-data.md"
SUBSTITUTE = {"timm:swin_tiny_patch4_window7_224": "timm:optin_test_swin"}
FAST = ("--scorer", "magnitude", "--quiet")


def blocks(text: str) -> list[tuple[str, str, bool]]:
    """(language, body, marked to run) of every fenced block of the page."""
    out = []
    for m in re.finditer(r"(<!-- test: run -->\n)?```(\w*)\n(.*?)```", text, re.S):
        out.append((m.group(2), m.group(3), bool(m.group(1))))
    return out


def commands(text: str) -> list[list[str]]:
    """The ``$ optin ...`` lines of the page's console blocks, as argument lists (without ``optin``)."""
    found = []
    for lang, body, _ in blocks(text):
        if lang == "console":
            for line in body.splitlines():
                if line.startswith("$ optin "):
                    for old, new in SUBSTITUTE.items():
                        line = line.replace(old, new)
                    found.append(shlex.split(line[len("$ optin "):]))
    return found


def table_header(text: str, first_column: str) -> str:
    """The header line of the page's example table whose first column is ``first_column``."""
    for lang, body, _ in blocks(text):
        if not lang and body.startswith(first_column + ","):
            return body.splitlines()[0]
    raise AssertionError(f"the page shows no {first_column},... table")


def stand_ins(root: Path, text: str) -> None:
    """The page's models and data, tiny, in ``root`` (the working folder)."""
    save_tiny_bert(root / "my-bert")
    header = table_header(text, "text")
    for name, (pos, neg) in {"reviews.csv": (POSITIVE[:6], NEGATIVE[:6]),
                             "reviews-test.csv": (POSITIVE[6:], NEGATIVE[6:])}.items():
        rows = [f"the movie was {w},pos" for w in pos] + [f"the film was {w},neg" for w in neg]
        (root / name).write_text(header + "\n" + "\n".join(rows) + "\n")
    image_folder(root / "photos", per_class=6)
    image_folder(root / "photos-test", per_class=2)

    import timm

    torch.manual_seed(0)
    torch.save(timm.create_model("optin_test_swin", num_classes=3).state_dict(), root / "swin-weights.pth")

    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=3)
                              ).save_pretrained(root / "my-hf-vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "my-hf-vit")
    pictures = sorted((root / "photos").rglob("*.png"))
    (root / "labelled.csv").write_text(table_header(text, "image") + "\n" + "".join(
        f"{p.relative_to(root)},{p.parent.name}\n" for p in pictures))

    from tiny_models import make_mask2former

    make_mask2former().model.save_pretrained(root / "my-mask2former")
    segmentation_folder(root / "streets", n=8)


def test_every_example_of_the_page_runs(cli_sandbox):
    text = PAGE.read_text()
    for lang, body, run in blocks(text):
        if run:
            assert lang == "python"
            exec(compile(body, str(PAGE), "exec"), {})  # the user's own code, as the page shows it
    assert (cli_sandbox / "my-vit" / "config.json").is_file()  # save_for_hf's folder, made by the page's code
    stand_ins(cli_sandbox, text)
    ran = []
    for args in commands(text):
        extra = FAST if args[0] == "run" else ()
        res = CliRunner().invoke(cli, args + list(extra), catch_exceptions=True)
        assert res.exit_code == 0, f"optin {shlex.join(args)}:\n{res.output}"
        ran.append(args[0])
        if args[0] == "run":
            out = Path(args[args.index("--output") + 1])
            report = json.loads((out / "report.json").read_text())
            assert report["macs_ratio"] <= float(args[args.index("--budget") + 1])
            assert report["params_after"] < report["params_before"]
            held = args[args.index("--eval-data") + 1] if "--eval-data" in args else None
            assert report["eval_split"] == (f"eval-data {Path(held)}" if held else
                                            f"hash split of {Path(args[args.index('--data') + 1])} (20%)")
    assert ran.count("run") == 5 and "bench" in ran


def test_the_page_is_linked_from_the_readme_and_the_cli_reference():
    root = PAGE.parents[1]
    assert "docs/own-model-and-data.md" in (root / "README.md").read_text()
    assert "own-model-and-data.md" in (root / "docs" / "cli.md").read_text()


@pytest.mark.parametrize("flag", ["--data", "--eval-data", "--checkpoint"])
def test_the_page_describes_the_flags(flag):
    assert f"`{flag}" in PAGE.read_text()
