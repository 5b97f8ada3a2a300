"""Is the network there? Asked once per host, answered within about two seconds.

Download clients wait long when there is no network: huggingface_hub retries five times with
backoff (~40 s of ``Retrying in 8s`` lines), and torch.hub's urllib has no timeout at all (a
network that drops packets hangs it). So before any download ssl-eval asks two things here:
did the user say offline (``--offline``, ``SSL_EVAL_OFFLINE``, ``HF_HUB_OFFLINE``,
``TRANSFORMERS_OFFLINE``), and does the host answer one HEAD request within ``PROBE_TIMEOUT``
seconds (through the same proxy settings urllib and httpx read from the environment)? Each
host is probed once per process.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

PROBE_TIMEOUT = 2.0  # seconds; a host that has not answered by then is taken as unreachable
TRUE_VALUES = {"1", "true", "yes", "on"}  # as huggingface_hub reads HF_HUB_OFFLINE
OFFLINE_VARS = ("SSL_EVAL_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

_probed: dict[str, str | None] = {}
_lock = threading.Lock()


def offline_reason(flag: bool = False) -> str | None:
    """Why ssl-eval must not touch the network (``"--offline"``, ``"HF_HUB_OFFLINE=1"``), or
    None when nothing says so."""
    if flag:
        return "--offline"
    for var in OFFLINE_VARS:
        value = os.environ.get(var, "").strip()
        if value.lower() in TRUE_VALUES:
            return f"{var}={value}"
    return None


def hf_endpoint() -> str:
    """The Hugging Face host huggingface_hub downloads from (``HF_ENDPOINT`` moves it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _host(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.netloc, f"{parts.scheme}://{parts.netloc}/"


def _probe(root: str, timeout: float) -> str | None:
    """One HEAD request to ``root``; None if any HTTP answer came back (a 403 or 404 is an
    answer: the host is there), else what went wrong."""
    req = urllib.request.Request(root, method="HEAD", headers={"User-Agent": "ssl-eval"})
    try:
        with urllib.request.urlopen(req, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        reason = e.reason
        if type(reason).__name__.startswith("SSL"):  # the host answered; let the client judge
            return None
        if isinstance(reason, TimeoutError):
            return f"no answer in {timeout:g} s"
        return str(getattr(reason, "strerror", None) or reason)
    except TimeoutError:
        return f"no answer in {timeout:g} s"
    except Exception as e:  # noqa: BLE001 - http.client and ssl raise many types
        return type(e).__name__


def unreachable_many(urls: list[str], timeout: float = PROBE_TIMEOUT) -> dict[str, str | None]:
    """For each url: None when its host answers, else one phrase saying why not
    (``"huggingface.co unreachable: Name or service not known"``). Hosts not yet asked in this
    process are probed at the same time, so the whole call never takes much longer than
    ``timeout``, even when name resolution hangs (the socket timeout does not cover DNS; the
    join deadline does)."""
    pending: dict[str, tuple[threading.Thread, list]] = {}
    for url in urls:
        host, root = _host(url)
        with _lock:
            if host in _probed or host in pending:
                continue
        box: list[str | None] = []
        worker = threading.Thread(
            target=lambda r=root, b=box: b.append(_probe(r, timeout)), daemon=True
        )
        worker.start()
        pending[host] = (worker, box)
    deadline = time.monotonic() + timeout + 0.5
    for host, (worker, box) in pending.items():
        worker.join(max(0.0, deadline - time.monotonic()))
        why = box[0] if box else f"no answer in {timeout:g} s"
        with _lock:
            _probed[host] = None if why is None else f"{host} unreachable: {why}"
    with _lock:
        return {url: _probed[_host(url)[0]] for url in urls}


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """``unreachable_many`` for one url."""
    return unreachable_many([url], timeout)[url]


def forget_probes() -> None:
    """Probe again next time (tests; a long-lived process whose network came back)."""
    with _lock:
        _probed.clear()
