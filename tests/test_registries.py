"""The registries, found rather than hand-listed: every module that should register something
does, and every registry's "unknown name" message names a real way to list its entries."""

import gc
import pkgutil

import pytest

import ssl_eval.backbones.catalog  # noqa: F401  (imports every family)
import ssl_eval.data.datasets  # noqa: F401
import ssl_eval.protocols  # noqa: F401
import ssl_eval.train.methods as methods
from ssl_eval.cli import build_parser
from ssl_eval.core.errors import UserError
from ssl_eval.core.registry import Registry


def _registries() -> list[Registry]:
    from ssl_eval.backbones.catalog import list_backbones

    list_backbones()  # load every family
    return [o for o in gc.get_objects() if type(o) is Registry]


def _list_choices() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    lst = sub.choices["list"]
    return set(next(a for a in lst._actions if a.dest == "what").choices)


def test_registries_are_found():
    kinds = {r.kind for r in _registries()}
    assert {"backbone", "dataset", "protocol type", "feature kind", "training method"} <= kinds


@pytest.mark.parametrize("registry", _registries(), ids=lambda r: r.kind)
def test_unknown_name_hint_names_only_lists_that_exist(registry):
    with pytest.raises(UserError) as e:
        registry.get("zz-no-such-entry-zz")
    msg = str(e.value)
    assert "\n" not in msg
    if "ssl-eval list" in msg:
        what = msg.split("ssl-eval list ", 1)[1].split("`", 1)[0]
        assert what in _list_choices(), msg
    else:
        assert "Known:" in msg


def test_every_method_module_registers_a_method():
    mods = [
        m.name
        for m in pkgutil.iter_modules(methods.__path__)
        if m.name != "base" and not m.name.startswith("_")
    ]
    assert sorted(mods) == sorted(methods.METHODS.names())


def test_every_protocol_module_registers_a_protocol_type():
    import ssl_eval.protocols as protocols

    mods = [
        m.name
        for m in pkgutil.iter_modules(protocols.__path__)
        if not m.ispkg
        and m.name not in ("base", "cards", "published")
        and not m.name.startswith("_")
    ]
    from ssl_eval.protocols import PROTOCOL_TYPES

    owners = {e.obj.run.__module__.rpartition(".")[2] for e in PROTOCOL_TYPES.entries()}
    assert sorted(owners) == sorted(mods)
