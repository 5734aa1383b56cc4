import pytest
import torch

from dxray.objectives import Objective, class_ce, class_logit, neuron


@pytest.fixture
def acts():
    g = torch.Generator().manual_seed(0)
    return {"logits": torch.randn(3, 5, generator=g), "penultimate": torch.randn(3, 7, generator=g),
            "layer4": torch.randn(3, 4, 2, 2, generator=g)}


def test_eq5_is_eq3_minus_feature_term(acts):
    eq3 = class_ce(2)
    eq5 = class_ce(2) - neuron("penultimate", 4)
    torch.testing.assert_close(eq5(acts), eq3(acts) - acts["penultimate"][:, 4])
    assert eq5.description == "class_ce(2) - neuron('penultimate', 4)"
    assert eq5.layers == {"logits", "penultimate"}


def test_class_ce_matches_cross_entropy(acts):
    expected = -acts["logits"].log_softmax(-1)[:, 2]
    torch.testing.assert_close(class_ce(2)(acts), expected)


def test_arithmetic_and_descriptions(acts):
    lam = 0.5
    obj = class_ce(1) - lam * neuron("penultimate", 3)
    torch.testing.assert_close(obj(acts), class_ce(1)(acts) - 0.5 * acts["penultimate"][:, 3])
    assert obj.description == "class_ce(1) - 0.5 * neuron('penultimate', 3)"
    total = 2 * (class_logit(0) + class_logit(1))
    torch.testing.assert_close(total(acts), 2 * (acts["logits"][:, 0] + acts["logits"][:, 1]))
    assert total.description == "2 * (class_logit(0) + class_logit(1))"
    nested = class_ce(0) - (class_ce(1) - class_ce(2))
    assert nested.description == "class_ce(0) - (class_ce(1) - class_ce(2))"
    torch.testing.assert_close(nested(acts), class_ce(0)(acts) - class_ce(1)(acts) + class_ce(2)(acts))
    eq4 = -neuron("penultimate", 0)
    assert eq4.description == "-neuron('penultimate', 0)"
    torch.testing.assert_close(eq4(acts), -acts["penultimate"][:, 0])


def test_neuron_on_feature_map_is_channel_mean(acts):
    torch.testing.assert_close(neuron("layer4", 1)(acts), acts["layer4"][:, 1].mean(dim=(1, 2)))


def test_objective_needs_only_a_mapping():
    obj = Objective(lambda a: a["x"].sum(1), "sum(x)", frozenset({"x"}))
    assert (obj * 3)({"x": torch.ones(2, 4)}).tolist() == [12.0, 12.0]
    with pytest.raises(TypeError):
        obj * "3"


def test_built_objectives_pickle_by_reference_and_compute_the_same():
    """A task spec goes to a Ray actor per batch: its objective must pickle as the builder calls that made it
    (plain pickle cannot pickle the closures inside), not as closures by value."""
    import pickle

    eq5 = class_ce(3) - 0.5 * neuron("penultimate", 2) + (-class_logit(1))
    copy = pickle.loads(pickle.dumps(eq5))
    acts = {"logits": torch.randn(4, 5), "penultimate": torch.randn(4, 6)}
    assert copy.description == eq5.description and copy.layers == eq5.layers
    assert torch.equal(copy(acts), eq5(acts))
    assert len(pickle.dumps(eq5)) < 600
