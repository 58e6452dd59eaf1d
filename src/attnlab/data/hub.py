"""Fast, plain failure when the Hugging Face Hub cannot be reached.

`datasets` and `transformers` retry an unreachable Hub with exponential back-off (about 25 seconds) and
then raise a generic connection error. One short request up front lets us say plainly what is wrong.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

_PROBE_TIMEOUT_S = 5.0


def hub_offline_mode() -> bool:
    """True when the user asked for cache-only operation (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1)."""
    import os

    from huggingface_hub import constants

    flags = (os.environ.get("HF_DATASETS_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


@functools.lru_cache(maxsize=1)
def hub_unreachable_reason() -> str | None:
    """None if the Hub answers (any HTTP status counts) or offline mode is on; else a short reason.

    Uses huggingface_hub's own HTTP session, so proxies and a custom HF_ENDPOINT are honoured.
    The answer is cached for the process.
    """
    if hub_offline_mode():
        return None
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=_PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001  (any transport failure means unreachable: DNS, refused, timeout, TLS)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{constants.ENDPOINT}: {reason}"
    return None


def hub_revision(repo_id: str, repo_type: str) -> str | None:
    """The commit that Hub repository `repo_id` ("model" or "dataset") resolves to now, for loading it
    pinned and recording it: asked of the Hub, or, offline or unreachable, read from the local Hub cache
    (`refs/main`, which huggingface_hub keeps so that a later offline load finds the same commit). None when
    neither knows; the loader then reports the problem in its own words."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.file_download import repo_folder_name

    offline = hub_offline_mode() or hub_unreachable_reason() is not None
    api = HfApi()
    try:
        if hasattr(api, "resolve_revision"):  # newer huggingface_hub: also records refs/main in the cache
            return api.resolve_revision(repo_id, repo_type=repo_type, local_files_only=offline).resolved
        if not offline:
            return api.repo_info(repo_id, repo_type=repo_type).sha
    except Exception:  # noqa: BLE001  (not found, gated, bad name, nothing cached: the loader says which)
        return None
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / "main"
    try:
        commit = ref.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None
