import pytest

from ssl_eval.protocols.cards import load_card, shipped_cards
from ssl_eval.data.datasets import DATASETS
from ssl_eval.errors import UserError


def test_every_shipped_card_validates():
    assert {"knn", "linear"} <= set(shipped_cards())
    for name in shipped_cards():
        card = load_card(name)
        assert card.version >= 1 and card.selection_split == "val"


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


@pytest.mark.parametrize("override,message", [("min_steps=-1", "min_steps at least 0"),
                                              ("lrs=[]", "at least one value"),
                                              ("epochs=0", "at least 1")])
def test_bad_linear_params_fail_when_the_card_loads(override, message):
    with pytest.raises(UserError, match=message):
        load_card("linear", [override])
