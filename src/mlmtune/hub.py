"""Every access to the Hugging Face Hub goes through here, so none of it is hidden.

The libraries underneath retry an unreachable Hub for about a minute before they fail. We ask
once, with a short timeout, whether the Hub answers at all; when it does not, we switch the
libraries to offline mode (so whatever is in the local cache still works) and fail with one
line that says what to do when the files are not cached.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import datasets.config
import huggingface_hub.constants
from huggingface_hub import HfApi

from mlmtune.errors import MlmtuneError

PROBE_TIMEOUT_S = 3.0
OFFLINE_HINT = "point it at a local path instead, or run `mlmtune quickstart` for the offline demo"


def _env_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """True when a TCP connection to the Hub endpoint opens within PROBE_TIMEOUT_S.

    Name resolution can block far longer than a socket timeout, so the probe runs in a daemon
    thread and we stop waiting for it after the timeout.
    """
    if _env_offline():
        return False
    url = urlparse(endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])


def go_offline() -> None:
    """Put huggingface_hub, transformers and datasets in offline mode for the rest of the process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # the libraries read these at import: set them too
    datasets.config.HF_HUB_OFFLINE = True


def prepare_hub_access() -> bool:
    """Called before any Hub id is resolved: returns True when online, else switches to offline mode."""
    online = hub_reachable()
    if not online:
        go_offline()
    return online


def unreachable_error(what: str, name: str) -> MlmtuneError:
    return MlmtuneError(
        f"{what} {name!r} is not a local path, the Hugging Face Hub ({endpoint()}) cannot be reached, "
        f"and it is not in the local cache: {OFFLINE_HINT}"
    )


def push_folder(folder: str, repo_id: str) -> str:
    """Upload a finished model folder (without its checkpoints) to the Hub; returns the repo URL."""
    if not prepare_hub_access():
        raise MlmtuneError(
            f"--push-to-hub: the Hugging Face Hub ({endpoint()}) cannot be reached; the model is saved in "
            f"{folder}, push it later with `hf upload {repo_id} {folder}`"
        )
    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=repo_id, ignore_patterns=["checkpoints/*", ".*"])
    except Exception as e:  # the Hub's errors (auth, permissions) become one line
        raise MlmtuneError(f"--push-to-hub to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return str(url)


def sentence_files(repo_id: str, root_files: tuple[str, ...]) -> Path | None:
    """A Hub model's sentence-transformers files (`root_files` and the folders its modules.json names), fetched
    into the Hub cache beside the weights transformers fetched, or found there offline: the snapshot folder, or
    None when the model has no modules.json (or it is neither reachable nor cached)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    offline = not prepare_hub_access()
    try:
        modules = Path(hf_hub_download(repo_id, "modules.json", local_files_only=offline))
        names = [m["path"].strip("/") for m in json.loads(modules.read_text(encoding="utf-8"))]
        patterns = [*root_files, *(f"{p}/*" for p in names if p and ".." not in p)]
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except Exception:  # not there, not cached, unreadable: the model is trained as an ordinary one
        return None
