"""Reaching the Hugging Face Hub: one quick probe before the first download, offline mode when it does not answer.

Without ``HF_HUB_OFFLINE=1``, transformers and huggingface_hub retry an unreachable Hub for minutes
before they give up (GPT-2's weights and tokenizer, a CLIP, a model's repo id: several files, each
with its own retries). :func:`prepare` asks the Hub once, with a short timeout, before the first of
them; when nothing answers, the process switches to offline mode, so that what is in the local
cache still loads at once and what is not fails at once, with :func:`unreachable_hint` saying why.
"""
from __future__ import annotations

import os
import ssl
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

PROBE_SECONDS = 5.0
_unreachable: str | None = None  # why the Hub did not answer, once a probe found it so


def prepare(name: str) -> None:
    """Call before loading ``name`` (a Hub id or a local path) with from_pretrained: probes the Hub the
    first time a Hub id is loaded, and turns offline mode on when it does not answer."""
    global _unreachable
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not name or is_local(name):
        return  # nothing to ask the Hub
    reason = probe(constants.ENDPOINT, PROBE_SECONDS)
    if reason is None:
        return
    _unreachable = f"the Hugging Face Hub ({constants.ENDPOINT}) {reason}"
    constants.HF_HUB_OFFLINE = True  # what huggingface_hub and transformers consult before each request
    os.environ["HF_HUB_OFFLINE"] = "1"  # and worker processes started from here
    print(f"note: {_unreachable}: working offline, from the local Hugging Face cache "
          "(set HF_HUB_OFFLINE=1 to skip this check)", file=sys.stderr)


def is_local(name: str) -> bool:
    """Whether a model name is a path on some machine (which loads nowhere else), not a Hub id."""
    return name.startswith((".", "/", "~")) or os.path.isabs(name) or (bool(name) and Path(name).exists())


def unreachable_hint() -> str:
    """For an error about a backbone that did not load: ``; ...`` saying the Hub did not answer, or nothing."""
    if _unreachable is None:
        return ""
    return (f"; {_unreachable}, so only the local cache was searched: load it once where the Hub is "
            "reachable (it is then cached), or give a local folder")


def probe(endpoint: str, seconds: float) -> str | None:
    """None when ``endpoint`` answers an HTTP request within ``seconds`` (any status, through the proxy
    the environment names, as huggingface_hub's requests go), else why not. Name resolution, which no
    socket timeout bounds, runs in a thread that is waited for ``seconds`` at most."""
    outcome: list[str | None] = []

    def ask() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=seconds).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # an answer, if not a welcome one
            outcome.append(None)
        except urllib.error.URLError as e:
            outcome.append(None if isinstance(e.reason, ssl.SSLError) else f"is unreachable ({e.reason})")
        except (TimeoutError, OSError) as e:
            outcome.append(f"is unreachable ({type(e).__name__}: {e})")

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else f"did not answer within {seconds:g} s"
