"""The command-line docs cannot drift: every command and option the CLI has is documented in the README or in a
page of docs/ (``serve`` has its own, docs/serving.md)."""

from __future__ import annotations

from pathlib import Path

import click

from gemma3_vision.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = "\n".join([README, *(page.read_text(encoding="utf-8") for page in sorted((ROOT / "docs").glob("*.md")))])


def test_every_command_and_option_is_in_the_readme():
    missing = []
    for name, command in main.commands.items():
        if f"### `gemma3-vision {name} " not in DOCS:
            missing.append(f"command {name}")
        for param in command.params:
            if isinstance(param, click.Option):
                missing += [f"{name} {opt}" for opt in param.opts if f"`{opt}`" not in DOCS]
    assert not missing, f"README.md and docs/*.md lack: {', '.join(missing)}"


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest" in README and "\npython -m pytest" in ci
