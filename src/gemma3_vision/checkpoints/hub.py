"""Hugging Face hub ids (``google/gemma-3-4b-it``) → a local snapshot folder holding only what the tower needs.

The local cache comes first: when the config and every needed shard are cached, nothing touches the network, so
offline use works. Otherwise the shard index is read first and only the config files and the shards holding vision
or projector tensors are downloaded (a 27B checkpoint costs its ~0.8 GB tower, not 55 GB). ``HF_TOKEN``,
``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` are read at call time, not when huggingface_hub was imported.

A hub that cannot be reached fails in one request: ``hf_hub_download`` would retry a network error five times with
backoff (about 25 s, logging every attempt) before reporting the cache miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import FormatError, ModelNotFoundError
from ..safe_io import read_json_object
from .format_safetensors import CONFIG_NAME, GEMMA3_IGNORED, INDEX_NAME, SIGLIP_IGNORED, SINGLE_NAME

OPTIONAL_CONFIGS = ("preprocessor_config.json",)
MAX_INDEX_BYTES = 100_000_000
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}")
_SHARD = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}\.safetensors")
_TRUE = ("1", "on", "yes", "true")


class HubGatedError(ModelNotFoundError):
    """The repo is gated and this token has not been granted access."""


class HubOfflineError(ModelNotFoundError):
    """Offline (HF_HUB_OFFLINE or no network) and the files are not in the local cache."""


class HubRepoNotFoundError(ModelNotFoundError):
    """No such repo on the hub (or a private one this token cannot see)."""


def is_repo_id(name: str) -> bool:
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def cache_dir() -> Path:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub`` or ``~/.cache/...``."""
    if env := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None  # None: huggingface_hub falls back to the stored login


def needed_shards(weight_map: dict[str, Any], config: dict[str, Any], where: str) -> list[str]:
    """The shards holding anything but the text model (and, for SigLIP, its head and text tower)."""
    siglip = config.get("model_type") in ("siglip", "siglip_vision_model")
    ignored = SIGLIP_IGNORED if siglip else GEMMA3_IGNORED
    shards = set()
    for key, shard in weight_map.items():
        if not (isinstance(shard, str) and _SHARD.fullmatch(shard)):
            raise FormatError(f"{where}: shard for {key} must be a plain .safetensors file name, found {shard!r}")
        if not key.startswith(ignored):
            shards.add(shard)
    return sorted(shards)


def _weight_map(index: Path) -> dict[str, Any]:
    weight_map = read_json_object(index, "shard index", max_bytes=MAX_INDEX_BYTES).get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index}: not a safetensors index: expected an object with a weight_map")
    return weight_map


def cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The cached snapshot of ``main`` when it already holds the config and every needed shard, else None."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=cache)
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    if (snapshot / INDEX_NAME).is_file():
        shards = needed_shards(_weight_map(snapshot / INDEX_NAME), read_json_object(Path(config), "config"),
                               str(snapshot / INDEX_NAME))
        return snapshot if all((snapshot / s).is_file() for s in shards) else None
    return snapshot if (snapshot / SINGLE_NAME).is_file() else None


def fetch(repo_id: str, *, download: Callable[..., str] | None = None) -> Path:
    """A local folder (a cache snapshot) with the config files and the shards the vision tower needs.

    Args:
        repo_id: ``org/name`` on the Hugging Face hub.
        download: ``huggingface_hub.hf_hub_download`` or a stand-in with its signature (tests).

    Raises:
        HubOfflineError: offline or the hub unreachable, and not fully cached. HubGatedError: gated, no access.
            HubRepoNotFoundError: no such repo. ModelNotFoundError: any other hub failure. FormatError: a malformed
            index.
    """
    cache = cache_dir()
    if (snapshot := cached_snapshot(repo_id, cache)) is not None:
        return snapshot
    if is_offline():
        raise HubOfflineError(f"{repo_id} is not (fully) in the Hugging Face cache {cache} and HF_HUB_OFFLINE is "
                              "set: download it once online, or point HF_HOME / HF_HUB_CACHE at the cache holding it")
    with _quiet_hub():
        return _fetch(repo_id, cache, download)


def _fetch(repo_id: str, cache: Path, download: Callable[..., str] | None) -> Path:
    if download is None:
        from huggingface_hub import hf_hub_download
        download = hf_hub_download
        _check_reachable(repo_id, cache)  # before hf_hub_download, which retries a network error 5 times
    fetcher: Callable[..., str] = download

    def get(filename: str, required: bool = True) -> Path | None:
        return _download(fetcher, repo_id, filename, cache, required)

    config = get(CONFIG_NAME)
    assert config is not None
    for name in OPTIONAL_CONFIGS:
        get(name, required=False)
    files = [config]
    index = get(INDEX_NAME, required=False)
    if index is not None:
        files.append(index)
        for shard in needed_shards(_weight_map(index), read_json_object(config, "config"), f"{repo_id}/{INDEX_NAME}"):
            files.append(get(shard))  # type: ignore[arg-type]
    else:
        files.append(get(SINGLE_NAME))  # type: ignore[arg-type]
    folders = {f.parent for f in files}
    if len(folders) != 1:  # a push landed between two downloads: the files come from different revisions
        raise ModelNotFoundError(f"{repo_id} changed on the hub while downloading; run the command again")
    return folders.pop()


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub's own log lines and warnings off while we call it: our error is the one line that says what
    went wrong. ``HF_HUB_VERBOSITY`` set by the user is left alone. Progress bars are not logging and stay."""
    if os.environ.get("HF_HUB_VERBOSITY"):
        yield
        return
    logger = logging.getLogger("huggingface_hub")  # its modules' loggers are children of this one
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _check_reachable(repo_id: str, cache: Path) -> None:
    """One HEAD request for the config, without retries, so that an unreachable hub fails at once.

    A host that does not resolve or refuses the connection will not answer a sixth time either. Anything else this
    request meets (a missing or gated repo, a server error worth retrying) is left to the download, which reports it.

    Raises:
        HubOfflineError: the request failed below HTTP (name resolution, connection, timeout).
    """
    from huggingface_hub import constants, errors, get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, CONFIG_NAME), token=_token())
    except Exception as e:
        if isinstance(e, errors.HfHubHTTPError) or not _is_network_error(e):
            return
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise HubOfflineError(f"cannot reach the Hugging Face hub at {constants.ENDPOINT} ({reason}) and {repo_id} "
                              f"is not in the cache {cache}: check the network, or set HF_HUB_OFFLINE=1 with a "
                              "populated cache") from None


def _is_network_error(e: Exception) -> bool:
    """A failure below HTTP: requests' errors are OSErrors; httpx's (huggingface_hub >= 1.0) derive from its
    TransportError."""
    return isinstance(e, OSError) or any(c.__name__ == "TransportError" for c in type(e).__mro__)


def _download(download: Callable[..., str], repo_id: str, filename: str, cache: Path, required: bool
              ) -> Path | None:
    from huggingface_hub import errors

    url = f"https://huggingface.co/{repo_id}"
    try:
        return Path(download(repo_id, filename, cache_dir=cache, token=_token()))
    except errors.GatedRepoError:
        raise HubGatedError(f"{repo_id} is a gated repo and this account has no access: accept its license at {url} "
                            "and set HF_TOKEN (or run `hf auth login`)") from None
    except errors.RepositoryNotFoundError:
        raise HubRepoNotFoundError(f"no Hugging Face repo {repo_id!r} ({url}): check the name; a private repo "
                                   "needs HF_TOKEN") from None
    except errors.RevisionNotFoundError:
        raise HubRepoNotFoundError(f"{repo_id} has no main revision") from None
    except errors.RemoteEntryNotFoundError:
        if required:
            raise ModelNotFoundError(f"{repo_id} has no {filename}: not a safetensors checkpoint") from None
        return None
    except errors.LocalEntryNotFoundError:  # no connection and not cached
        raise HubOfflineError(f"cannot reach the Hugging Face hub for {repo_id}/{filename} and it is not in the "
                              f"cache {cache}: check the network, or set HF_HUB_OFFLINE=1 with a populated cache"
                              ) from None
    except errors.HfHubHTTPError as e:
        raise ModelNotFoundError(f"Hugging Face hub error for {repo_id}/{filename}: {e}") from None
