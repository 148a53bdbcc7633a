"""Distillation terms: hand-computed values, invariants, gradchecks, config errors, and MixACM's
loss built from a list of terms."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixacm.config import ConfigError, load_run_config
from mixacm.distill import (
    TERMS, arch_feature_names, at_loss, attention_map, bind_terms, check_term, check_terms, evaluate_term,
    hint_loss, match_spatial, resolve_blocks, sp_loss,
)
from mixacm.losses import acm_distance, activated_channel_map, kd_kl
from mixacm.methods import METHODS, build_method
from mixacm.models import build_model


def feats(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_registry_has_the_issue_terms():
    assert set(TERMS.names()) == {"acm", "sp", "at", "fitnet", "kd"}


def test_sp_hand_computed():
    # Student: orthogonal examples -> G = I. Teacher: identical examples -> every row (1, 1)/sqrt 2.
    f_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1)
    f_t = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 2, 1, 1)
    # ||I - J/sqrt2||_F^2 / 4 = (2 (1 - 1/sqrt2)^2 + 2 / 2) / 4 = 1 - 1/sqrt2
    assert sp_loss(f_s, f_t).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    assert sp_loss(f_s, f_s).item() == 0.0


def test_sp_compares_batch_similarities_so_widths_may_differ():
    f_s, f_t = feats(4, 3, 5, 5), feats(4, 7, 2, 2, seed=1)
    assert sp_loss(f_s, f_t).item() > 0
    # Scaling the features changes no similarity.
    assert sp_loss(3.0 * f_s, f_s).item() == pytest.approx(0.0, abs=1e-7)


def test_at_hand_computed():
    f_s = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)  # attention (1, 0)
    f_t = torch.tensor([0.0, -2.0]).reshape(1, 1, 1, 2)  # |A|^2 = (0, 4) -> (0, 1)
    assert attention_map(f_t).tolist() == [[0.0, 1.0]]
    assert at_loss(f_s, f_t).item() == pytest.approx(1.0)  # mean((1, -1)^2)
    assert at_loss(f_s, 5 * f_s).item() == 0.0


def test_hint_and_spatial_matching():
    f_s, f_t = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 2, 2)
    a, b = match_spatial(f_s, f_t)
    assert a.shape == b.shape == (2, 3, 2, 2)
    assert hint_loss(a, b).item() == 1.0
    with pytest.raises(ValueError, match="fitnet"):
        hint_loss(f_s, f_t)


@pytest.mark.parametrize("fn", [sp_loss, at_loss, hint_loss])
def test_gradcheck_float64(fn):
    f_s = feats(3, 2, 3, 3).double().requires_grad_(True)
    f_t = feats(3, 2, 3, 3, seed=1).double()
    assert torch.autograd.gradcheck(lambda s: fn(s, f_t), (f_s,))


def test_registered_acm_and_kd_terms_equal_the_loss_functions():
    f_s, f_t = feats(4, 6, 3, 3), feats(4, 6, 3, 3, seed=1)
    acm = check_term({"term": "acm", "activation": "relu"})
    expected = acm_distance(activated_channel_map(f_s), activated_channel_map(f_t))
    assert TERMS.get("acm").loss(f_s, f_t, nn.Identity(), acm).item() == pytest.approx(expected.item())
    s, t = feats(4, 10), feats(4, 10, seed=1)
    kd = check_term({"term": "kd", "T": 4})
    assert TERMS.get("kd").loss(s, t, nn.Identity(), kd).item() == pytest.approx(kd_kl(s, t, T=4).item())


@pytest.mark.parametrize(
    ("spec", "key", "word"),
    [
        ({"term": "crd"}, "terms[0].term", "valid: acm, at, fitnet, kd, sp"),
        ({"term": "acm", "gamma": 1}, "terms[0].gamma", "valid: term, weight, blocks, p"),
        ({"term": "kd", "blocks": "groups"}, "terms[0].blocks", "valid: term, weight, T"),
        ({"term": "acm", "weight": -1}, "terms[0].weight", ">= 0"),
        ({"term": "acm", "p": 3}, "terms[0].p", "[1, 2]"),
        ({"term": "at", "blocks": ["layer1"]}, "terms[0].blocks", "[student, teacher]"),
        ({"term": "kd", "T": 0}, "terms[0].T", "> 0"),
        ("acm", "terms[0]", "mapping"),
    ],
)
def test_bad_terms_name_the_key_and_the_valid_values(spec, key, word):
    with pytest.raises(ValueError) as err:
        check_terms([spec])
    assert key in str(err.value) and word in str(err.value)


def test_resolve_blocks_names_the_missing_feature_and_the_valid_ones():
    s, t = arch_feature_names("resnet2b"), arch_feature_names("resnet4b")
    assert s == ("stem", "layer1") and t == ("stem", "layer1", "layer2")
    assert resolve_blocks("groups", s, t) == [("layer1", "layer2")]
    assert resolve_blocks("groups+stem", s, t) == [("stem", "stem"), ("layer1", "layer2")]
    with pytest.raises(ValueError, match=r"the student has no feature\(s\) \['layer3'\]; valid: \['stem', 'layer1'\]"):
        resolve_blocks([["layer3", "layer2"]], s, t)


def test_fitnet_regressor_and_acm_transform_are_projectors_with_gradients():
    torch.manual_seed(0)
    student, teacher = build_model("tiny"), build_model("tiny", widths=(8, 16, 32))
    specs = check_terms([{"term": "fitnet", "blocks": [["layer3", "layer3"]]},
                         {"term": "acm", "blocks": [["layer2", "layer2"]], "weight": 2}])
    bound, proj = bind_terms(specs, student, teacher)
    assert set(proj) == {"fitnet0_layer3_to_layer3", "layer2_to_layer2"}
    assert isinstance(proj["fitnet0_layer3_to_layer3"], nn.Conv2d)
    assert proj["fitnet0_layer3_to_layer3"].in_channels == 64 and proj["fitnet0_layer3_to_layer3"].out_channels == 32
    x = torch.rand(2, 3, 32, 32)
    logits, sf = student(x, features=("layer2", "layer3"))
    with torch.no_grad():
        t_logits, tf = teacher(x, features=("layer2", "layer3"))
    total = sum(b.weight * evaluate_term(b, proj, logits, t_logits, sf, tf) for b in bound)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


# ----------------------------------------------------------------------------- MixACM from terms


def student():
    torch.manual_seed(0)
    return build_model("tiny")


def teacher():
    torch.manual_seed(1)
    return build_model("tiny", widths=(8, 16, 32))


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def mixacm_loss(**knobs):
    method = build_method("mixacm", student(), teacher(), **knobs)
    method.model.train()
    torch.manual_seed(5)  # the same mixup draw for every call
    loss, metrics = method.loss(*batch())
    return method, loss, {k: v.item() for k, v in metrics.items()}  # device tensors, read back here


def test_paper_default_equals_its_explicit_term_list():
    _, loss, m = mixacm_loss()
    paper = [{"term": "acm", "weight": 50, "blocks": "groups"}, {"term": "kd", "weight": 1.0, "T": 1.0}]
    method, loss2, m2 = mixacm_loss(terms=paper)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    assert m2["acm"] == pytest.approx(m["acm"], rel=1e-6) and m2["kd"] == pytest.approx(m["kd"], rel=1e-6)
    knobs = method.resolved_knobs()
    assert knobs["ablation"] == "custom" and knobs["acm"] and knobs["kd"] and knobs["mixup"]
    assert build_method("mixacm", student(), teacher(), **knobs).resolved_knobs() == knobs


def test_any_term_list_sums_weighted_terms():
    terms = [{"term": "sp", "weight": 2.0}, {"term": "at", "weight": 3.0, "blocks": "groups+stem"},
             {"term": "fitnet", "weight": 0.5, "blocks": [["layer3", "layer3"]]}, {"term": "kd", "weight": 1.5, "T": 2},
             {"term": "sp", "weight": 1.0, "blocks": [["layer1", "layer1"]]}]
    method, loss, m = mixacm_loss(terms=terms, mixup=False)
    assert set(m) == {"loss", "ce", "lam", "acm", "kd", "sp", "at", "fitnet", "sp_2",
                      "term_ce", "term_sp", "term_at", "term_fitnet", "term_kd", "term_sp_2"}
    assert m["acm"] == 0.0 and m["lam"] == 1.0
    expected = m["ce"] + 2 * m["sp"] + 3 * m["at"] + 0.5 * m["fitnet"] + 1.5 * m["kd"] + m["sp_2"]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    x, y = batch()
    with torch.no_grad():
        logits = method.model(x)
        t_logits = method.teacher(x)
    assert m["kd"] == pytest.approx(kd_kl(logits, t_logits, T=2).item(), rel=1e-5)
    assert m["ce"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


@pytest.mark.parametrize(
    ("knobs", "word"),
    [
        ({"terms": [{"term": "crd"}]}, "knob 'terms' of method 'mixacm'[0].term: unknown distillation term 'crd'"),
        ({"terms": [{"term": "kd"}], "ablation": "acm"}, "cannot be combined"),
        ({"terms": [{"term": "kd"}], "acm": True}, "contradicts knob 'terms'"),
        ({"terms": []}, "non-empty list"),
    ],
)
def test_bad_term_knobs_are_errors_without_networks(knobs, word):
    with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("(", r"\(")):
        METHODS.get("mixacm").resolve(knobs)


def test_missing_block_is_an_error_before_training(tmp_path):
    from mixacm.checkpoint import model_spec, save_model_file

    net = build_model("resnet4b")
    path = save_model_file(net, model_spec("resnet4b"), tmp_path / "teacher.pt", {})
    base = {"model": {"name": "resnet2b"}, "teacher": str(path), "dataset": {"name": "cifar10"}}
    load_run_config({**base, "method": {"name": "mixacm", "terms": [{"term": "at", "blocks": [["layer1", "layer2"]]}]}})
    with pytest.raises(ConfigError, match=r"method: knob 'terms' of method 'mixacm'\[0\]\.blocks: the teacher has no "
                                          r"feature\(s\) \['layer3'\]; valid: \['stem', 'layer1', 'layer2'\]"):
        load_run_config({**base, "method": {"name": "mixacm", "terms": [{"term": "at", "blocks": [["layer1", "layer3"]]}]}})
    with pytest.raises(ConfigError, match=r"knob 'blocks' of method 'mixacm': the student has no feature\(s\) \['layer2'\]"):
        load_run_config({**base, "method": {"name": "mixacm", "blocks": [["layer2", "layer2"]]}})
