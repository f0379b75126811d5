"""The README's cookbook, run as written: every ```bash tested block of README.md, in order, then
those of each docs/*.md page (alphabetical, in order within a page), as one script in one project
directory on generated photos, so a page's block may use what the README walk-through made. Each
entry point gets the tiniest settings for the keys its command does not set (a tiny backbone,
32 px images, one epoch, the csv logger, no workers), so a command shows what it is there to show
in the least time: each `python` is a new interpreter, and its imports (torch, Lightning, timm,
Hydra) are most of its cost. Also the links: the README links every docs page, and every link
between the pages leads to a file and a heading that exist."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_MODEL, make_image_folder, make_label_file, offline_env

FAST = {  # per entry point: added to a command that does not set the key itself
    "train.py": {
        "model.name": TINY_MODEL,
        "model.weights": "null",
        "data.image_size": "32",
        "data.num_workers": "0",  # data.batch_size stays 32: the 12 training images are one batch
        "trainer.max_epochs": "1",
        "logger": "csv",
        "callbacks.rich_progress_bar": "null",
        "callbacks.rich_model_summary": "null",
    },
    "eval.py": {"num_workers": "0"},
    "predict.py": {"num_workers": "0"},
}
SHIM = """#!/usr/bin/env bash
# python, but the entry points get the test's fast settings for keys the command does not set
args=("$@"); extra=(); fast=()
script=${1:-}; [[ $script == -* ]] && script=${2:-}
case "${script##*/}" in
%s
esac
for kv in "${fast[@]}"; do
  given=0
  for arg in "${args[@]}"; do [[ $arg == "${kv%%%%=*}="* ]] && given=1; done
  (( given )) || extra+=("$kv")
done
exec %s "${args[@]}" "${extra[@]}"
"""


def shim_text() -> str:
    cases = "\n".join(
        f"  {script}) fast=({' '.join(f'{k}={v}' for k, v in settings.items())}) ;;"
        for script, settings in FAST.items()
    )
    return SHIM % (cases, sys.executable)


DOCS = ROOT / "docs"


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash tested\n(.*?)^```", markdown, flags=re.S | re.M)


def cookbook_script() -> str:
    """The README's tested blocks, then each docs page's, each announced on stderr (a failure's
    output says which block it was in)."""
    pages = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    lines = ["set -euo pipefail"]
    for page in pages:
        for i, block in enumerate(bash_blocks(page.read_text()), 1):
            lines += [f"echo '>>> {page.relative_to(ROOT)}, tested block {i}' >&2", block]
    return "\n".join(lines)


def test_the_readme_has_tested_blocks_for_the_walkthrough() -> None:
    blocks = "\n".join(bash_blocks((ROOT / "README.md").read_text()))
    for command in (
        "split_folder.py",
        "train.py",
        "eval.py",
        "predict.py",
        "export.py",
        "ckpt_path=last",
        "-m",
    ):
        assert command in blocks


def outside_code(markdown: str) -> str:
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes, -1, -2, ...
    for repeats."""
    found: set[str] = set()
    repeats: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", outside_code(markdown), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = repeats.get(slug, 0)
        found.add(f"{slug}-{n}" if n else slug)
        repeats[slug] = n + 1
    return found


def links(markdown: str) -> list[str]:
    """Relative links (no scheme): `page.md`, `page.md#anchor`, `#anchor`."""
    found = re.findall(r"\]\(([^)\s]+)\)", outside_code(markdown))
    return [link for link in found if not re.match(r"[a-z]+:", link)]


def test_the_readme_links_every_docs_page_and_each_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    linked = {link.split("#")[0] for link in links(readme) if link.startswith("docs/")}
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert linked - pages == set(), "the README links pages that do not exist"
    assert pages - linked == set(), "docs pages the README does not link"


def test_every_link_between_the_pages_leads_to_a_file_and_heading() -> None:
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for link in links(page.read_text()):
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


@pytest.mark.slow
def test_the_cookbook_runs_as_written(tmp_path: Path) -> None:
    """Also the one real command-line run of train.py (a run, a sweep, a resume): what Hydra
    writes, the log, the metrics and the results table the user sees."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("train.py", "eval.py", "predict.py", "export.py", "conf", "scripts"):
        (project / name).symlink_to(ROOT / name)
    photos = make_image_folder(project / "data" / "raw", splits={"all": 8}, size=40) / "all"
    photos.rename(project / "data" / "photos")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "python"
    shim.write_text(shim_text())
    shim.chmod(0o755)
    script = cookbook_script()
    env = {**offline_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        ["bash", "-c", script], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    split = project / "data" / "photos_split"
    assert {p.name for p in split.iterdir()} == {"train", "val", "test"}
    runs = sorted((project / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2  # the default recipe, and the gradual run (resumed in place to 3 epochs)
    (sweep,) = (project / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [job.name for job in jobs] == ["0", "1"]
    for run in (*runs, *jobs):
        for name in (".hydra/config.yaml", "train.log", "metrics.csv", "results.json"):
            assert (run / name).is_file(), run / name
    epochs = [json.loads((run / "results.json").read_text())["epochs"] for run in runs]
    assert epochs == [1, 3]
    default, gradual = runs
    with open(gradual / "metrics.csv", newline="") as f:  # the rows from before the resume are kept
        assert {r["epoch"] for r in csv.DictReader(f) if r["val/acc"]} == {"0", "1", "2"}
    assert list((gradual / ".hydra").glob("resumed_*/config.yaml"))
    tables = re.findall(r"Results\s+\(/", proc.stdout)  # the title wraps in a narrow console
    assert len(tables) == 5 and "val/acc" in proc.stdout  # 2 runs, 2 sweep jobs, the resume
    assert not (project / "logs" / "mlflow").exists()  # csv unless a command picks another logger
    with open(project / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and all(r["label"] in ("circle", "square", "triangle") for r in rows)
    with open(project / "preds_onnx.csv", newline="") as f:  # docs/after-training.md's block
        assert [r["label"] for r in csv.DictReader(f)] == [r["label"] for r in rows]
    assert (project / "exported" / "model.onnx").is_file()
    assert "# Leaderboard: 2 jobs" in proc.stdout
    assert "Per-class report" in proc.stdout and "Exported (onnx, parity checked)" in proc.stdout
    assert "PassManager" not in proc.stdout + proc.stderr  # the ONNX exporter's chatter is kept quiet
    eval_runs = list((project / "logs" / "eval" / "runs").iterdir())
    assert len(eval_runs) == 1 and (eval_runs[0] / "confusion_matrix.png").is_file()


def label_source_commands() -> list[list[str]]:
    """The overrides of each `python train.py` line in the README's label-source block, as the
    shell splits them (the block is not run: three training runs would double the walk-through)."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"\*\*Labels in a file.*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    lines = [line for line in block.splitlines() if line.startswith("python train.py")]
    return [shlex.split(line)[2:] for line in lines]


@pytest.mark.slow
def test_the_readme_s_label_source_recipes_read_their_data(
    compose_train, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each command, as the shell and Hydra parse it (the regular expression's quoting
    included), reads data laid out as its comment says."""
    from transferkit.config.build import build
    from transferkit.data.demo import draw_shape

    make_label_file(tmp_path / "data" / "xray")
    pets = tmp_path / "data" / "pets"
    pets.mkdir(parents=True)
    for i, breed in enumerate(["Abyssinian", "Bengal", "Abyssinian_mix", "Bengal"] * 3):
        draw_shape("circle", seed=i, size=32).save(pets / f"{breed}_{i}.jpg")
    make_label_file(tmp_path / "data" / "tiles", multilabel=True)
    monkeypatch.chdir(tmp_path)  # the commands' paths are relative to where they run
    read = []
    for overrides in label_source_commands():
        data = build(compose_train(tmp_path, overrides).data)
        read.append((data.class_names, data.multilabel, len(data.folders.train) + len(data.folders.val)))
    shapes = ["circle", "square", "triangle"]
    assert read == [
        (shapes, False, 48),
        (["Abyssinian", "Abyssinian_mix", "Bengal"], False, 12),
        (shapes, True, 24),
    ]
