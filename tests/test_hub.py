"""Hugging Face hub ids, never touching the real hub: a populated cache used offline, and a stand-in for
hf_hub_download serving a local "remote" repo that records what was fetched."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.errors as hf_errors
import pytest
import torch

from conftest import TINY_PROJECTOR, TINY_VISION
from format_fixtures import populate_hf_cache, write_hf_folder
from gemma3_vision.checkpoints import hub
from gemma3_vision.checkpoints.resolve import resolve
from gemma3_vision.errors import FormatError, ModelNotFoundError

REPO = "acme/gemma-3-tiny-it"


def _http_error(cls: type, status: int) -> Exception:
    response_cls = hf_errors.Response
    request_cls = sys.modules[response_cls.__module__.split(".")[0]].Request
    return cls(f"{status}", response=response_cls(status, request=request_cls("GET", "https://huggingface.co/x")))


class FakeHub:
    """hf_hub_download's signature over a local folder; writes the real cache layout and records every file."""

    def __init__(self, remote: Path, revision: str = "b" * 40, error: Exception | None = None):
        self.remote, self.revision, self.error, self.fetched = remote, revision, error, []

    def __call__(self, repo_id: str, filename: str, *, cache_dir: Path, token: str | None = None, **_) -> str:
        if self.error is not None:
            raise self.error
        self.fetched.append(filename)
        src = self.remote / filename
        if not src.is_file():
            raise _http_error(hf_errors.RemoteEntryNotFoundError, 404)
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        blob = repo / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(self.revision)
        link = repo / "snapshots" / self.revision / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(os.path.relpath(blob, link.parent), link)
        return str(link)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty cache under a temporary HF_HOME, online, no token."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    return tmp_path / "hf" / "hub"


@pytest.fixture
def hf_env(hf_cache, monkeypatch):
    """``hf_cache``, with the hub's reachability check (one HEAD request) answered without the network."""
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", lambda url, **_: None)
    return hf_cache


def closed_port() -> int:
    """A local port nothing listens on: bound by the OS, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sharded_remote(tmp_path, tiny_state):
    """3 shards: two hold the tower and projector, the last only the text model."""
    return write_hf_folder(tmp_path / "remote", tiny_state, TINY_VISION, TINY_PROJECTOR, shards=3)


def assert_same_tensors(checkpoint, state):
    for name, want in state.items():
        assert torch.equal(checkpoint.tensors[name].read(), want), name


def test_offline_load_from_a_populated_cache(hf_env, monkeypatch, sharded_remote, tiny_state):
    files = {p.name: p for p in sharded_remote.iterdir() if not p.name.endswith("00003-of-00003.safetensors")}
    populate_hf_cache(hf_env, REPO, files)  # the text-only shard was never downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck = resolve(REPO)
    assert ck.format == "hf-safetensors" and ck.description == f"hf:{REPO}"
    assert_same_tensors(ck, tiny_state)


def test_hf_hub_cache_variable_is_honoured(tmp_path, hf_env, monkeypatch, sharded_remote, tiny_state):
    populate_hf_cache(tmp_path / "elsewhere", REPO, {p.name: p for p in sharded_remote.iterdir()})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_tensors(resolve(REPO), tiny_state)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_hostile_cached_json_is_a_format_error(hf_env, monkeypatch, sharded_remote, name):
    (sharded_remote / name).write_text("[" * 100_000 + "]" * 100_000)  # json.loads: RecursionError
    populate_hf_cache(hf_env, REPO, {p.name: p for p in sharded_remote.iterdir()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FormatError, match=f"{name}: .* nests too deeply"):
        resolve(REPO)


def test_offline_miss_is_its_own_error(hf_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubOfflineError, match="not .*in the Hugging Face cache .*HF_HUB_OFFLINE"):
        resolve(REPO)


def test_download_fetches_the_index_first_and_only_needed_shards(hf_env, monkeypatch, sharded_remote, tiny_state):
    fake = FakeHub(sharded_remote)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake)
    ck = resolve(REPO)
    assert fake.fetched == ["config.json", "preprocessor_config.json", "model.safetensors.index.json",
                            "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]
    assert_same_tensors(ck, tiny_state)
    fake.fetched.clear()
    resolve(REPO)  # now cached: nothing is fetched at all
    assert fake.fetched == []


def test_single_file_repo_and_missing_optional_config(hf_env, monkeypatch, tmp_path, tiny_state):
    remote = write_hf_folder(tmp_path / "single", tiny_state, TINY_VISION, TINY_PROJECTOR)
    (remote / "preprocessor_config.json").unlink()
    fake = FakeHub(remote)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake)
    assert_same_tensors(resolve(REPO), tiny_state)
    assert fake.fetched == ["config.json", "preprocessor_config.json", "model.safetensors.index.json",
                            "model.safetensors"]


def test_index_naming_a_path_outside_the_repo_is_refused_before_download(hf_env, monkeypatch, sharded_remote):
    index = sharded_remote / "model.safetensors.index.json"
    index.write_text(index.read_text().replace("model-00001-of-00003.safetensors", "../../etc/x.safetensors"))
    fake = FakeHub(sharded_remote)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake)
    with pytest.raises(hub.FormatError, match="plain .safetensors file name"):
        resolve(REPO)
    assert not any(".." in f for f in fake.fetched)


@pytest.mark.parametrize("error, kind, message", [
    (lambda: _http_error(hf_errors.GatedRepoError, 403), hub.HubGatedError, "gated .*HF_TOKEN"),
    (lambda: _http_error(hf_errors.RepositoryNotFoundError, 404), hub.HubRepoNotFoundError, "no Hugging Face repo"),
    (lambda: hf_errors.LocalEntryNotFoundError("no network"), hub.HubOfflineError, "cannot reach"),
], ids=["gated", "missing-repo", "no-network"])
def test_hub_failures_are_distinct_errors(hf_env, monkeypatch, error, kind, message):
    monkeypatch.setattr("huggingface_hub.hf_hub_download", FakeHub(Path("/nonexistent"), error=error()))
    with pytest.raises(kind, match=message) as info:
        resolve(REPO)
    assert isinstance(info.value, ModelNotFoundError)
    others = {hub.HubGatedError, hub.HubRepoNotFoundError, hub.HubOfflineError} - {kind}
    assert not isinstance(info.value, tuple(others))


def test_token_comes_from_hf_token_at_call_time(hf_env, monkeypatch, sharded_remote):
    seen = []
    fake = FakeHub(sharded_remote)

    def spy(repo_id, filename, **kwargs):
        seen.append(kwargs["token"])
        return fake(repo_id, filename, **kwargs)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", spy)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    resolve(REPO)
    assert set(seen) == {"hf_test_token"}


def test_names_that_are_not_repo_ids():
    assert hub.is_repo_id("google/gemma-3-4b-it")
    for name in ("gemma3", "a/b/c", "../x", "org/..", "org/name:tag", "org/a--b", ""):
        assert not hub.is_repo_id(name), name


def test_unreachable_hub_is_one_typed_error_at_once(hf_cache, monkeypatch, caplog):
    """No retries, no huggingface_hub log lines: hf_hub_download alone retries a refused connection 5 times."""
    import huggingface_hub

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    level = logging.getLogger("huggingface_hub").level
    caplog.set_level(logging.DEBUG)
    start = time.perf_counter()
    with pytest.raises(hub.HubOfflineError, match=f"cannot reach the Hugging Face hub at {endpoint} .*{REPO}"):
        resolve(REPO)
    elapsed = time.perf_counter() - start
    print(f"unreachable hub reported in {elapsed:.2f} s")
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")], caplog.text
    assert logging.getLogger("huggingface_hub").level == level  # restored


def test_cli_unreachable_hub_prints_one_line_in_seconds(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), OLLAMA_MODELS=str(tmp_path / "no-ollama"),
               HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gemma3_vision", "info", "foo/bar"], env=env,
                            capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    print(f"CLI exited in {elapsed:.2f} s: {result.stderr.strip()}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach the Hugging Face hub at {env['HF_ENDPOINT']}")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_http_errors_of_the_check_are_left_to_the_download(hf_env, monkeypatch):
    """A 404 on the reachability check is no network failure: the download reports the missing repo."""
    def check(url, **_):
        raise _http_error(hf_errors.RepositoryNotFoundError, 404)

    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", check)
    error = _http_error(hf_errors.RepositoryNotFoundError, 404)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", FakeHub(Path("/nonexistent"), error=error))
    with pytest.raises(hub.HubRepoNotFoundError):
        resolve(REPO)
