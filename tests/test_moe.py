"""sparsen.nn.moe: the top-k MoE layer against transformers' Mixtral and Qwen2-MoE sparse blocks and
load_balancing_loss_func, capacity dropping by hand, one-line errors."""

import pytest
import torch

from sparsen.errors import SparsenError
from sparsen.nn import MoE, MoEConfig, load_balancing_loss, z_loss
from sparsen.nn.moe import keep_within_capacity


def _mixtral(e=6, k=2, d=16, f=12):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k, hidden_act="silu")
    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return hf.eval()


def test_moe_equals_transformers_mixtral_sparse_block_and_its_router_logits():
    hf = _mixtral()
    ours = MoE(MoEConfig(d_model=16, d_ff=12, experts=6, k=2))
    ours.load_state_dict({"router.weight": hf.gate.weight, "gate_up": hf.experts.gate_up_proj,
                          "down": hf.experts.down_proj})
    x = torch.randn(3, 7, 16)
    assert torch.allclose(ours(x), hf(x), atol=1e-5)
    assert torch.allclose(ours.router_logits, hf.gate(x.view(-1, 16))[0], atol=1e-6)


def test_moe_equals_transformers_qwen2_moe_block_with_its_shared_expert():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=8, shared_expert_intermediate_size=20, num_experts=8,
                         num_experts_per_tok=3, norm_topk_prob=False, hidden_act="silu")
    torch.manual_seed(1)
    hf = Qwen2MoeSparseMoeBlock(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoE(MoEConfig(d_model=16, d_ff=8, experts=8, k=3, normalize_topk=False, shared_d_ff=20))
    ours.load_state_dict({"router.weight": hf.gate.weight, "gate_up": hf.experts.gate_up_proj,
                          "down": hf.experts.down_proj, "shared_gate.weight": hf.shared_expert.gate_proj.weight,
                          "shared_up.weight": hf.shared_expert.up_proj.weight,
                          "shared_down.weight": hf.shared_expert.down_proj.weight,
                          "shared_expert_gate.weight": hf.shared_expert_gate.weight})
    x = torch.randn(2, 5, 16)
    assert torch.allclose(ours(x), hf(x), atol=1e-5)
    assert torch.allclose(ours.router_logits, hf.gate(x.view(-1, 16))[0], atol=1e-6)


def test_the_load_balancing_loss_equals_transformers_and_is_k_at_perfect_balance():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(2)
    layers = tuple(torch.randn(40, 8, generator=g) * 2 for _ in range(3))
    for k in (1, 2, 4):
        assert torch.allclose(load_balancing_loss(layers, 8, k), load_balancing_loss_func(layers, 8, k), atol=1e-6)
    assert float(load_balancing_loss(torch.zeros(8, 4), 4, 2)) == pytest.approx(2.0, abs=0.6)  # ties: topk picks 2
    logits = torch.log(torch.tensor([[4.0, 3, 2, 1]]))
    assert float(z_loss(logits)) == pytest.approx(float(torch.log(torch.tensor(10.0))) ** 2)


def test_capacity_keeps_first_choices_first_then_token_order():
    # 4 tokens, k = 2, 3 experts, capacity 2: expert 0 is everyone's first choice
    chosen = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 1]])
    keep = keep_within_capacity(chosen, 3, 2)
    # expert 0 takes tokens 0 and 1 (first choices, token order); expert 1 takes tokens 0 and 2 (second choices);
    # expert 2 takes token 1
    assert keep.tolist() == [[True, True], [True, True], [False, True], [False, False]]
    m = MoE(MoEConfig(d_model=4, d_ff=4, experts=3, k=2, capacity_factor=2 * 3 / (4 * 2)))  # capacity 2 for 4 tokens
    assert m.cfg.capacity_factor and m(torch.randn(1, 4, 4)).shape == (1, 4, 4)


def test_dropped_assignments_add_nothing_and_dropless_drops_none():
    torch.manual_seed(3)
    dropless = MoE(MoEConfig(d_model=8, d_ff=8, experts=4, k=2))
    capped = MoE(MoEConfig(d_model=8, d_ff=8, experts=4, k=2, capacity_factor=0.25))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(16, 8)
    full = dropless(x)
    assert dropless.dropped == 0
    y = capped(x)
    assert capped.dropped > 0
    logits, w, chosen = capped.route(x)
    keep = keep_within_capacity(chosen, 4, 2)  # ceil(0.25 * 16 * 2 / 4) = 2
    by_hand = torch.stack([sum((capped.expert(int(e), x[i:i + 1])[0] * w[i, j] for j, e in enumerate(chosen[i])
                                if keep[i, j]), torch.zeros(8)) for i in range(16)])
    assert torch.allclose(y, by_hand, atol=1e-6)
    assert not torch.allclose(y, full)


def test_temperature_and_tanh_gates_weigh_experts_by_hand():
    torch.manual_seed(5)
    x = torch.randn(6, 8)
    for kw, f in (({"temperature": 0.5}, lambda z: z / 0.5), ({"gate": "activation"}, torch.tanh)):
        for normalize in (True, False):
            m = MoE(MoEConfig(d_model=8, d_ff=4, experts=5, k=2, normalize_topk=normalize, **kw))
            logits, w, chosen = m.route(x)
            probs = torch.softmax(f(x @ m.router.weight.T), -1)
            top = probs.topk(2, -1)
            expect = top.values / top.values.sum(-1, keepdim=True) if normalize else top.values
            assert torch.equal(chosen, top.indices) and torch.allclose(w, expect, atol=1e-6)
            m(x)  # the balance loss reads the same distribution
            m2 = MoE(MoEConfig(d_model=8, d_ff=4, experts=5, k=2, aux_coefficient=1.0, **kw))
            m2.load_state_dict(m.state_dict())
            m2(x)
            assert torch.allclose(m2.aux_loss, load_balancing_loss(f(logits), 5, 2))


def test_temperature_one_is_the_plain_softmax_and_the_activation_gate_routes():
    torch.manual_seed(4)
    a = MoE(MoEConfig(d_model=8, d_ff=4, experts=4, k=1))
    b = MoE(MoEConfig(d_model=8, d_ff=4, experts=4, k=1, gate="activation"))
    b.load_state_dict(a.state_dict())
    x = torch.randn(10, 8)
    _, _, ca = a.route(x)
    _, _, cb = b.route(x)
    assert torch.equal(ca, cb)  # tanh is monotone: the same argmax
    assert torch.autograd.gradcheck(lambda z: b.double()(z), (torch.randn(3, 8, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("kw, message", [({"k": 9}, "k must be an integer in 1..8"),
                                          ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
                                          ({"capacity_factor": -1.0}, "capacity_factor must be > 0"),
                                          ({"gate": "sigmoid"}, "gate must be one of")])
def test_bad_moe_configs_are_one_line_errors(kw, message):
    with pytest.raises(SparsenError, match=message):
        MoEConfig(experts=8, **kw)
