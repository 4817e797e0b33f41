"""The README and the documentation cannot rot: their examples run, their links resolve, their references are
generated from the code.

The README's examples run as written except for two stated substitutions: the model becomes ``random:tiny``
(the full ``random`` tower takes seconds to minutes an image on 2 cores; ``google/gemma-3-4b-it`` cannot be
downloaded in CI) and the output folder ``out`` becomes a temporary folder. The set-up part of each quick-start
command (venv, pinned torch, install) is checked for, not run: this test runs inside that set-up.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

# Pages other branches deliver, which the README links to already. A link to one of them passes while the page is
# missing; once it exists, test_awaited_pages_are_still_missing fails until it is taken off this set.
AWAITED: set[str] = set()

SETUP = ["python3.11 -m venv .venv", ". .venv/bin/activate", "pip install torch==2.13.0"]


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def quick_start(install: str) -> list[str]:
    """The README's quick-start command that installs ``install``, as its ``&&``-joined steps."""
    commands = [" ".join(b.replace("\\\n", " ").split()) for b in blocks(README, "sh")]
    found = [c for c in commands if f"&& pip install -e {install} " in c + " "]
    assert len(found) == 1, f"expected one quick-start command installing {install}, found {found}"
    return [step.strip() for step in found[0].split("&&")]


def test_quick_starts_do_all_the_set_up_on_a_fresh_machine():
    for install, last in (('".[fastest]"', "cat out/index.jsonl"), ('".[test]"', "python -m pytest")):
        steps = quick_start(install)
        assert steps[:3] == SETUP, f"set-up steps {steps[:3]} != {SETUP}"
        assert steps[3] == f"pip install -e {install}" and steps[-1] == last, steps


def test_quick_start_encode_runs_and_gives_what_the_readme_shows(tmp_path):
    steps = quick_start('".[fastest]"')[4:]  # after the set-up: encode, then cat the index
    out = tmp_path / "out"
    script = " && ".join(steps)
    script = script.replace("--model random ", "--model random:tiny ").replace("--out out", f"--out {out}")
    script = script.replace("cat out/", f"cat {out}/")
    script = script.replace("gemma3-vision ", f"{shlex.quote(sys.executable)} -m gemma3_vision ", 1)
    assert "random:tiny" in script and str(out) in script, f"the substitutions did not apply: {script}"
    run = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"
    records = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["status"] for r in records] == ["ok"] * 3, run.stdout

    # The console block: `ls out` lists these files, and each .npy is [tokens, text hidden] float32.
    console = blocks(README, "console")[0]
    listed = console.split("$ ls out\n", 1)[1].split("\n", 1)[0].split()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(listed)
    array = np.load(out / "landscape.jpg.npy")
    assert array.dtype == np.float32 and array.ndim == 2, (array.dtype, array.shape)


def test_python_example_runs(monkeypatch):
    [example] = blocks(README, "python")
    assert example.count('g3.load("google/gemma-3-4b-it")') == 1, "the example's model argument changed"
    code = example.replace('g3.load("google/gemma-3-4b-it")', 'g3.load("random:tiny", dtype="float32")')
    monkeypatch.chdir(ROOT)  # the example names the example images relative to the repository
    namespace: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn that they are random
        exec(compile(code, "README.md python example", "exec"), namespace)
    model, tokens, patches, doc = (namespace[k] for k in ("model", "tokens", "patches", "doc"))
    text_hidden = model.projector_config.text_hidden_size
    assert tuple(tokens.shape) == (2, model.tokens_per_image(), text_hidden), tokens.shape
    assert tuple(patches.shape) == (2, model.tokens_per_image(project=False), model.vision_config.hidden_size)
    assert len(doc.crops) == 2, f"diagram.png (300x600) gives two Pan & Scan crops, got {doc.crop_boxes}"


def relative_links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = FENCE.sub("", text)  # links inside code blocks are code, not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def github_anchors(path: Path) -> set[str]:
    """Heading anchors as GitHub makes them: lower case, punctuation dropped, each space a hyphen."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", path.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in DOCS.glob("*.md"))])
def test_every_relative_link_resolves(page):
    source = ROOT / page
    broken = []
    for link in relative_links(source):
        target_name, _, anchor = link.partition("#")
        target = (source.parent / target_name).resolve() if target_name else source
        if str(target.relative_to(ROOT)) in AWAITED and not target.exists():
            continue
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in github_anchors(target):
            broken.append(f"{link} (no heading gives #{anchor})")
    assert not broken, f"{page}: broken links: {', '.join(broken)}"


def test_awaited_pages_are_still_missing():
    landed = sorted(p for p in AWAITED if (ROOT / p).exists())
    assert not landed, f"{landed} exist now: take them off AWAITED in this test and add them to mkdocs.yml's nav"


def test_the_cli_page_names_every_command():
    from gemma3_vision.cli import main

    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in main.commands if f"\n| `{name}` |" not in page]
    assert not missing, f"docs/cli.md's table of commands lacks {missing}"


def test_cli_help_has_no_angle_brackets_the_site_would_hide():
    # mkdocs-click renders help text as Markdown, where <relative path> is an HTML tag and vanishes.
    from gemma3_vision.cli import main

    texts = {name: " ".join([cmd.help or "", *(getattr(p, "help", None) or "" for p in cmd.params)])
             for name, cmd in {"": main, **main.commands}.items()}
    tagged = {name: re.findall(r"<[A-Za-z][^>]*>", text) for name, text in texts.items()}
    assert not any(tagged.values()), f"help texts with <...>: {tagged}"


def test_the_references_are_generated_from_the_code():
    cli = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert "::: mkdocs-click\n    :module: gemma3_vision.cli\n    :command: main\n" in cli
    api = (DOCS / "python-api.md").read_text(encoding="utf-8")
    for name in ("load", "Gemma3Vision", "preprocess", "VisionConfig", "ProjectorConfig", "errors"):
        assert f"\n::: gemma3_vision.{name}\n" in api, f"docs/python-api.md lacks the reference of {name}"


def test_ci_runs_the_readme_test_command_and_builds_the_docs_strictly():
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if not line.startswith("#")]
    assert "python -m pytest" in ci, "CI does not run the README's test command"
    assert any("mkdocs build --strict" in line for line in ci), "CI does not build the docs strictly"


def test_every_result_file_the_docs_cite_exists_and_records_its_provenance():
    cited = set()
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = page.read_text(encoding="utf-8")
        cited |= {m for m in re.findall(r"(?:benchmarks/results/)?([\w.-]+/[\w.-]+\.json)", text)
                  if (ROOT / "benchmarks" / "results" / m).parent.is_dir()}
    kept = {str(p.relative_to(ROOT / "benchmarks" / "results"))
            for p in (ROOT / "benchmarks" / "results").glob("*/*.json")}
    assert cited == kept, f"cited but missing: {sorted(cited - kept)}; kept but not cited: {sorted(kept - cited)}"
    for name in sorted(kept):
        meta = json.loads((ROOT / "benchmarks" / "results" / name).read_text(encoding="utf-8")).get("meta", {})
        missing = [k for k in ("machine", "versions", "command") if not meta.get(k)]
        assert not missing, f"benchmarks/results/{name}: meta lacks {missing}"
