import pytest

from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DATASETS
from ssl_eval.protocols import PROTOCOL_TYPES
from ssl_eval.protocols.cards import load_card, load_suite, shipped_cards, shipped_suites


def test_shipped_cards_cover_every_protocol_type():
    assert {load_card(n).type for n in shipped_cards()} == set(PROTOCOL_TYPES.names())


@pytest.mark.parametrize("name", shipped_cards())
def test_every_shipped_card_validates(name):
    card = load_card(name)
    assert card.version >= 1 and card.selection_split == "val"
    assert card.protocol is PROTOCOL_TYPES.get(card.type)  # resolved once, kept on the card
    assert isinstance(card.params, card.protocol.params)
    # the card's YAML round-trips: its params rebuilt from their record give the same params
    assert (
        load_card(name, [f"{k}={v}" for k, v in card.params_dict().items()]).params == card.params
    )


@pytest.mark.parametrize("suite", shipped_suites())
def test_every_shipped_suite_names_shipped_cards(suite):
    assert set(load_suite(suite).protocols) <= set(shipped_cards())


def test_unknown_key_in_card_is_named(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("name: mine\nversion: 1\ntype: linear\nparams:\n  epochz: 3\n")
    with pytest.raises(UserError, match="epochz.*did you mean 'epochs'"):
        load_card(str(p))


def test_wrong_type_is_named(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("name: mine\nversion: 1\ntype: linear\nparams:\n  epochs: many\n")
    with pytest.raises(UserError, match="epochs"):
        load_card(str(p))


def test_set_override_is_applied_and_recorded():
    card = load_card("linear", ["epochs=3", "lrs=[0.1, 1]"])
    assert card.params.epochs == 3 and card.params.lrs == (0.1, 1.0)
    assert card.to_record()["overrides"] == {"epochs": 3, "lrs": [0.1, 1]}


def test_unknown_protocol_suggests():
    with pytest.raises(UserError, match="Did you mean 'linear'"):
        load_card("lineer")


def test_unknown_dataset_suggests():
    with pytest.raises(UserError, match="Did you mean 'digits'"):
        DATASETS.get("digts")


@pytest.mark.parametrize(
    "override,message",
    [
        ("min_steps=-1", "min_steps at least 0"),
        ("lrs=[]", "at least one value"),
        ("epochs=0", "at least 1"),
    ],
)
def test_bad_linear_params_fail_when_the_card_loads(override, message):
    with pytest.raises(UserError, match=message):
        load_card("linear", [override])


@pytest.mark.parametrize(
    "card,override,message",
    [
        ("linear", "lrs=[0.1, -1]", "lr must be > 0"),
        ("linear", "momentum=1.5", "momentum"),
        ("fewshot", "seeds=0", "at least 1"),
        ("fewshot", "shots=[1, 0]", "at least 1"),
        ("fewshot", "headline=logreg@3", "names no classifier@K"),
        ("fewshot", "classifiers=[svm]", "unknown few-shot classifier"),
        ("fewshot", "on_small_class=drop", "on_small_class"),
        ("fewshot", "logreg_c=0", "logreg_c"),
        ("fewshot_episodic", "ways=1", "ways >= 2"),
        ("fewshot_episodic", "headline=svm", "names no classifier"),
        ("fewshot_episodic", "classifiers=[knn]", "names no classifier"),
        ("finetune", "lr=0", "lr must be > 0"),
        ("finetune", "epochs=0", "at least 1"),
        ("finetune", "layer_decay=1.5", "layer_decay"),
        ("finetune", "crop_scale=[0.9, 0.1]", "crop_scale"),
        ("finetune", "label_smoothing=1", "label_smoothing"),
    ],
)
def test_out_of_range_params_fail_when_the_card_loads(card, override, message):
    """Each protocol's params class refuses a bad value when the card loads, before any
    feature is extracted."""
    with pytest.raises(UserError, match=message):
        load_card(card, [override])


def test_a_yaml_mapping_loads_into_nested_dataclasses():
    from dataclasses import dataclass, field

    from ssl_eval.core.config import from_mapping

    @dataclass
    class Inner:
        size: int = 1
        scale: tuple[float, float] = (0.1, 1.0)

    @dataclass
    class Outer:
        name: str | None = None
        inner: Inner = field(default_factory=Inner)
        views: list[Inner] = field(default_factory=list)

    out = from_mapping(
        Outer, {"name": None, "inner": {"scale": [0, 2]}, "views": [{"size": 3}]}, "cfg"
    )
    assert out == Outer(None, Inner(1, (0.0, 2.0)), [Inner(3)])
    with pytest.raises(UserError, match=r"cfg\.inner\.scale: expected 2 values"):
        from_mapping(Outer, {"inner": {"scale": [1]}}, "cfg")
    with pytest.raises(
        UserError, match=r"cfg\.views\[0\]: unknown key 'sise'.*did you mean 'size'"
    ):
        from_mapping(Outer, {"views": [{"sise": 3}]}, "cfg")
    with pytest.raises(UserError, match=r"cfg\.inner\.size: expected int"):
        from_mapping(Outer, {"inner": {"size": True}}, "cfg")


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: x\nversion: 1\ntype: linear\nparams: [1, 2]\n", "params must be a mapping"),
        ("name: x\nversion: 1\ntype: linear\nparams: abc\n", "params must be a mapping"),
        ("name: x\nversion: 1\ntype: linear\nparams: true\n", "params must be a mapping"),
        ("name: x\nversion: 1\ntype: linear\nparams: {epochs: [\n", "invalid YAML"),
        ("name: x\nversion: 1\ntype: linear\nselection_split: test\n", "selection_split is 'test'"),
        ("- just\n- a list\n", "must be a YAML mapping"),
    ],
)
def test_malformed_cards_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "card.yaml"
    p.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_card(str(p))
    assert "\n" not in str(e.value)


def test_card_that_is_not_utf8_is_one_line(tmp_path):
    p = tmp_path / "card.yaml"
    p.write_bytes(b"name: caf\xe9\nversion: 1\ntype: linear\n")
    with pytest.raises(UserError, match="not UTF-8") as e:
        load_card(str(p))
    assert "\n" not in str(e.value)


def test_set_value_that_is_not_yaml_is_one_line():
    with pytest.raises(UserError, match="not valid YAML") as e:
        load_card("linear", ["lrs=[0.1, 0.2"])
    assert "\n" not in str(e.value)


def test_a_float_in_exponent_notation_without_a_dot_is_a_float():
    # PyYAML reads 1e-6 as a string (YAML 1.1); Python writes small floats that way (1e-06)
    card = load_card("finetune", ["min_lr=1e-6", "lr=2E-3"])
    assert (card.params.min_lr, card.params.lr) == (1e-6, 2e-3)
    with pytest.raises(UserError, match="expected float"):
        load_card("finetune", ["lr=1e"])
