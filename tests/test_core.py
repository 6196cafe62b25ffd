import pytest
import torch

from sparsen.core import Sparsifier, ThresholdRule, TopKRule


def test_masked_forward_equals_hand_computed_masked_linear(tiny_llama):
    lin = tiny_llama.adapter.blocks[1].linears["down"]
    x = torch.randn(2, 7, lin.in_features)
    expected = torch.nn.functional.linear(torch.where(x.abs() > 0.5, x, torch.zeros_like(x)), lin.weight)
    with Sparsifier(tiny_llama.adapter, {"layers.1.down": ThresholdRule(0.5)}):
        got = lin(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))  # detached


def test_dense_prefix_leaves_prompt_untouched(tiny_llama):
    lin = tiny_llama.adapter.blocks[0].linears["q"]
    x = torch.randn(1, 10, lin.in_features)
    sp = Sparsifier(tiny_llama.adapter, {"layers.0.q": ThresholdRule(1e9)}, dense_prefix=6)
    with sp:
        y = lin(x)
    assert torch.allclose(y[:, :6], torch.nn.functional.linear(x[:, :6], lin.weight), atol=1e-5)
    assert torch.all(y[:, 6:] == 0)
    assert sp.entries["layers.0.q"] == 4 * lin.in_features and sp.zeros["layers.0.q"] == 4 * lin.in_features


def test_achieved_sparsity_is_parameter_weighted(tiny_llama):
    ad = tiny_llama.adapter
    sp = Sparsifier(ad, {"layers.0.gate": ThresholdRule(1e9)})
    with sp:
        ad.blocks[0].linears["gate"](torch.randn(3, ad.hidden_size))
    a = sp.achieved()
    params = sp.params
    assert a["per_site"]["layers.0.gate"] == 1.0
    assert a["overall"] == pytest.approx(params["layers.0.gate"] / sum(params.values()))
    assert a["per_linear"]["gate"] == pytest.approx(1 / ad.n_layers)
    assert a["per_layer"][1] == 0.0


def test_topk_rule_keeps_the_largest_entries_per_token():
    x = torch.tensor([[0.1, -3.0, 0.5, 2.0], [4.0, 0.0, -0.2, 1.0]])
    assert torch.equal(TopKRule(0.5)(x), torch.tensor([[0.0, -3.0, 0.0, 2.0], [4.0, 0.0, 0.0, 1.0]]))
    assert torch.equal(TopKRule(0.0)(x), x)
    y = TopKRule(0.7)(torch.randn(5, 100))
    assert torch.equal((y == 0).sum(-1), torch.full((5,), 70))


def test_accounting_reports_each_site_kind_and_charges_added_weights(tiny_llama):
    ad = tiny_llama.adapter
    sp = Sparsifier(ad, {"layers.0.down": ThresholdRule(1e9)}, added_params=100)
    with sp:
        ad.blocks[0].linears["down"](torch.randn(2, ad.intermediate_size))
    a = sp.achieved()
    total = sum(sp.params.values())
    assert a["by_kind"]["linear_input"]["params"] == total
    assert a["by_kind"]["linear_input"]["skipped"] == pytest.approx(sp.params["layers.0.down"] / total)
    assert a["skipped"] - a["overall"] == pytest.approx(100 / total)


def test_a_sparsifier_attached_before_a_with_block_stays_attached(tiny_llama):
    lin = tiny_llama.adapter.blocks[0].linears["q"]
    x = torch.randn(3, lin.in_features)
    sp = Sparsifier(tiny_llama.adapter, {"layers.0.q": ThresholdRule(1e9)}).attach()
    with sp:
        pass
    assert torch.all(lin(x) == 0)  # still masked
    sp.detach()
    assert not torch.all(lin(x) == 0)


def test_rule_kinds_cover_every_plan_entry_kind():
    from sparsen.core.rules import ENTRY_KINDS, RuleKind, rule_from_entry

    assert set(ENTRY_KINDS.values()) == set(RuleKind)
    tensors = {"t": torch.ones(4), "e.expert_of": torch.arange(4) % 2, "e.router": torch.ones(2, 3)}
    for name, kind in ENTRY_KINDS.items():
        entry = {"rule": name, "threshold": 0.5, "sparsity": 0.5, "k": 1, "experts": "e",
                 **({"tensor": "t"} if name == "channel_threshold" else {})}
        rule = rule_from_entry(entry, tensors)
        assert (rule is None) == (kind == RuleKind.DENSE) and (rule is None or rule.kind == kind), name


def test_kl_sum_equals_torch_kl_div_and_is_zero_on_itself():
    from sparsen.core.divergence import kl_per_position, kl_sum
    g = torch.Generator().manual_seed(0)
    dense = torch.log_softmax(torch.randn(7, 50, generator=g), -1)
    sparse = torch.log_softmax(torch.randn(7, 50, generator=g), -1)
    want = torch.nn.functional.kl_div(sparse, dense, log_target=True, reduction="sum")
    assert torch.allclose(kl_sum(dense, sparse), want, atol=1e-5)
    assert float(kl_sum(dense, dense)) == 0.0
    rows = torch.nn.functional.kl_div(sparse, dense, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_per_position(dense, sparse), rows, atol=1e-5)
