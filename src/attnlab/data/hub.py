"""Fast, plain failure when the Hugging Face Hub cannot be reached.

`datasets` and `transformers` retry an unreachable Hub with exponential back-off (about 25 seconds) and
then raise a generic connection error. One short request up front lets us say plainly what is wrong.
"""

from __future__ import annotations

import functools

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
