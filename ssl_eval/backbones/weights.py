"""Where weights come from, in order: ``--weights FILE``, the ssl-eval weights folder
($SSL_EVAL_WEIGHTS_DIR, default ~/.cache/ssl-eval/weights), the Hugging Face and torch.hub
caches, then a download when online. Otherwise a clear error says which file to put where.

Every download goes through ``WeightsSource.download``: offline (``--offline``,
SSL_EVAL_OFFLINE, HF_HUB_OFFLINE) it is never tried, and a host that does not answer one probe
(``core/network.py``, ~2 s) is skipped, so no network ends in one line within seconds instead
of the hub client's retries."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import UserError
from ..core.network import hf_endpoint, offline_reason, unreachable_many


def weights_dir() -> Path:
    env = os.environ.get("SSL_EVAL_WEIGHTS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ssl-eval" / "weights"


def torch_hub_checkpoints() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


@dataclass(frozen=True)
class WeightsSource:
    """Every place a backbone's weights may be found."""

    filenames: tuple[str, ...]  # accepted names in the weights folder
    hf_repo: str | None = None  # Hugging Face repo id (timm's hub copies)
    hf_filenames: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    url: str | None = None  # official download address (torch.hub cache uses its basename)
    notes: list[str] = field(default_factory=list, compare=False)
    extra_hf_repos: tuple[str, ...] = ()  # other Hugging Face copies in the same layout
    how: str = ""  # how to obtain the file when there is no plain download (e.g. a converter)

    def _hf_cached(self) -> Path | None:
        repos = ((self.hf_repo,) if self.hf_repo else ()) + self.extra_hf_repos
        if not repos:
            return None
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        for repo in repos:
            for fn in self.hf_filenames:
                hit = try_to_load_from_cache(repo, fn)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
        return None

    def _hub_cached(self) -> Path | None:
        if not self.url:
            return None
        p = torch_hub_checkpoints() / os.path.basename(self.url)
        return p if p.is_file() else None

    def find_local(self) -> Path | None:
        for fn in self.filenames:
            p = weights_dir() / fn
            if p.is_file():
                return p
        return self._hf_cached() or self._hub_cached()

    def is_official(self, path: str | Path) -> bool:
        """Whether ``path`` is one of the places this source puts or finds its file (by name,
        or inside the Hugging Face cache of its repository), not a ``--weights`` file of
        another name."""
        p = Path(path)
        if p.name in self.filenames or (self.url and p.name == os.path.basename(self.url)):
            return True
        repos = ((self.hf_repo,) if self.hf_repo else ()) + self.extra_hf_repos
        folders = {"models--" + r.replace("/", "--") for r in repos}
        return p.name in self.hf_filenames and any(part in folders for part in p.parts)

    def status(self) -> str:
        local = self.find_local()
        if local is not None:
            return f"present ({local})"
        return "downloadable" if (self.hf_repo or self.url) else "missing"

    def download(self) -> Path:
        """Download from the first source whose host answers the probe (Hugging Face, then
        the official address); a UserError naming the file otherwise."""
        errors, unreachable_hosts = [], []
        hosts = ([hf_endpoint()] if self.hf_repo else []) + ([self.url] if self.url else [])
        probes = unreachable_many(hosts)  # at once: ~2 s at most, however many hosts
        if self.hf_repo:
            why = probes[hf_endpoint()]
            if why:
                unreachable_hosts.append(why)
            else:
                try:
                    from huggingface_hub import hf_hub_download

                    return Path(hf_hub_download(self.hf_repo, self.hf_filenames[0]))
                except Exception as e:  # network errors come in many types
                    errors.append(f"{self.hf_repo}: {type(e).__name__}")
        if self.url:
            why = probes[self.url]
            if why:
                unreachable_hosts.append(why)
            else:
                import torch.hub

                dest = torch_hub_checkpoints() / os.path.basename(self.url)
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    torch.hub.download_url_to_file(self.url, str(dest), progress=True)
                    return dest
                except Exception as e:
                    errors.append(f"{self.url}: {type(e).__name__}")
        if errors:
            why = f"download failed ({'; '.join(errors + unreachable_hosts)})"
        elif unreachable_hosts:
            why = f"no network ({'; '.join(unreachable_hosts)})"
        else:
            why = "no download address is known"
        raise UserError(self.missing_message(why))

    def missing_message(self, why: str) -> str:
        where = weights_dir()
        msg = f"weights not found: {why}. Place {self.filenames[0]}"
        if self.url:
            msg += f" (the official file {self.url})"
        msg += f" in {where} (set SSL_EVAL_WEIGHTS_DIR to move that folder)"
        if self.url:
            msg += f", or at {torch_hub_checkpoints() / os.path.basename(self.url)} (torch.hub's cache)"
        if self.hf_repo:
            msg += (
                f", or fetch it into the Hugging Face cache with "
                f"`hf download {self.hf_repo} {self.hf_filenames[0]}`"
            )
        msg += ", or pass --weights FILE"
        if self.how:
            msg += f". {self.how}"
        return msg

    def resolve(self, explicit: Path | None, offline: bool) -> Path:
        if explicit is not None:
            p = Path(explicit).expanduser()
            if not p.is_file():
                raise UserError(f"--weights {p}: no such file")
            return p
        local = self.find_local()
        if local is not None:
            return local
        why = offline_reason(offline)
        if why:
            raise UserError(self.missing_message(f"offline ({why}) and no local copy"))
        return self.download()
