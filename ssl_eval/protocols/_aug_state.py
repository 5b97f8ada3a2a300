"""The augmented probe's state between epochs: every head stack's weights, momentum buffers
and BatchNorm statistics, the selection so far and the history, written by rank 0 after each
epoch (atomically, behind a length and crc32 header) and read back on a rerun of the unit.
"""

from __future__ import annotations

from pathlib import Path

from ..core import distributed
from ..core.files import DamagedFile, read_torch_checked, write_torch_checked
from ..core.runtime import warn

HEAD_STATE = ("W", "b", "mW", "mb", "rmean", "rvar")


def save(path: Path | None, state: dict) -> None:
    """The unit's state after an epoch, atomically behind a length and crc32 header, written
    by rank 0; its failure is every rank's one-line error."""
    error = None
    if path is not None and distributed.is_main():
        try:
            write_torch_checked(path, state)
        except OSError as e:
            error = f"linear_aug: cannot write its state {path}: {str(e).splitlines()[0]}"
    distributed.agree(error)


def _load(path: Path | None, fingerprint: str, stacks: int, epochs: int, device) -> dict | None:
    """This unit's saved state; None when there is none or it is another setting's; a damaged
    one is reported in one line, removed, and the unit starts over."""
    if path is None or not path.is_file():
        return None
    try:
        st = read_torch_checked(path, device)
        if not isinstance(st, dict) or st.get("fingerprint") != fingerprint:
            return None
        heads = st.get("heads")
        if (
            not 0 <= st.get("epoch", -1) < epochs
            or not isinstance(heads, list)
            or len(heads) != stacks
            or any(not isinstance(h, dict) or set(h) != set(HEAD_STATE) for h in heads)
        ):
            raise DamagedFile("not a linear_aug state of the form ssl-eval writes")
    except DamagedFile as e:
        warn(f"linear_aug state {path} is damaged ({e}); discarding it, the unit starts over")
        path.unlink(missing_ok=True)
        return None
    return st


def resume(path: Path | None, fingerprint: str, stacks: int, epochs: int, device) -> dict | None:
    """The state to resume from, on every rank: rank 0 decides (``_load``), then every other
    rank reads the file rank 0 read; one that cannot stops every rank in one line."""
    st = _load(path, fingerprint, stacks, epochs, device) if distributed.is_main() else None
    if distributed.world() == 1 or not distributed.broadcast(st is not None):
        return st
    error = None
    if not distributed.is_main():
        try:
            st = read_torch_checked(path, device)
            if st.get("fingerprint") != fingerprint:
                raise DamagedFile("another setting's state")
        except DamagedFile as e:
            error = (
                f"rank {distributed.rank()} cannot read the linear_aug state {path} rank 0 read "
                f"({e}); put --cache-dir on a filesystem every node shares"
            )
    distributed.agree(error)
    return st
