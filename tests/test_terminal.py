"""The CLI run as a user runs it, on a terminal: stderr a pty, where `encode` shows its progress bar.

Every other CLI test captures stderr through a pipe, which hides the bar."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_rgb
from gemma3_vision.backends import resolve_backend

pty = pytest.importorskip("pty", reason="pseudo-terminals need a POSIX system")
fcntl = pytest.importorskip("fcntl", reason="pseudo-terminals need a POSIX system")
termios = pytest.importorskip("termios", reason="pseudo-terminals need a POSIX system")


def run_on_terminal(*args: str) -> tuple[int, str]:
    """``python -m gemma3_vision ARGS`` with stderr on a pseudo-terminal: (exit code, what it printed there)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    proc = subprocess.Popen([sys.executable, "-m", "gemma3_vision", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    printed = bytearray()
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        printed += chunk
    os.close(leader)
    return proc.wait(timeout=300), printed.decode("utf-8", "replace")


def test_encode_on_a_terminal_shows_progress_and_reports_failures(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(make_rgb(40, 30, 0)).save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code, printed = run_on_terminal("encode", str(folder), "--model", "random:tiny", "--out", str(out))
    assert "Traceback" not in printed, printed
    assert code == 3, printed  # one input failed: EXIT_SOME_FAILED
    assert "encoding" in printed, printed  # the tqdm bar
    assert "2/2" in printed, printed  # with its total
    assert "model random:tiny, " in printed and f"backend {resolve_backend('auto', torch.device('cpu'))}" in printed, \
        printed
    assert "failed:" in printed and "broken.png" in printed, printed
    for line in printed.replace("\r", "\n").splitlines():  # each message on a line of its own, not on the bar's
        assert not ("warning:" in line and not line.startswith("warning:")), printed
        assert not ("failed:" in line and not line.startswith("failed:")), printed
    assert np.load(out / "a.png.npy").ndim == 2


def test_nothing_to_encode_on_a_terminal_is_one_warning_and_exit_4(tmp_path):
    folder = tmp_path / "phone"
    folder.mkdir()
    (folder / "IMG_0001.HEIC").write_bytes(b"not read")
    code, printed = run_on_terminal("encode", str(folder), "--model", "random:tiny", "--out", str(tmp_path / "out"))
    assert code == 4, printed  # EXIT_NOTHING_FOUND
    assert printed.startswith("warning: nothing to encode") and "(1 .heic)" in printed, printed
    assert "encoding" not in printed and not (tmp_path / "out").exists(), printed  # no bar, nothing written
