"""sparsen.nn: each module against its dense equivalent, a hand computation or the transformers module it mirrors;
gradients against finite differences."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsen.errors import SparsenError
from sparsen.nn import (
    Attention,
    AttentionConfig,
    BlockFFN,
    BlockFFNConfig,
    DenseMLP,
    MLPConfig,
    PredictorFFN,
    PredictorFFNConfig,
    StatTopKMLP,
    StatTopKMLPConfig,
    TopKMLP,
    TopKMLPConfig,
    chunk_sparsity,
    exact_topk,
    statistical_threshold,
    statistical_topk,
)


def _copy(dst, src):
    dst.load_state_dict(src.state_dict(), strict=True)


# --- top-k functions -----------------------------------------------------------------------------------------------------
def test_exact_topk_keeps_the_k_largest_of_each_row():
    x = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    y = exact_topk(x, 5)
    for row, out in zip(x, y):
        top = set(row.sort(descending=True).indices[:5].tolist())
        assert set(out.nonzero().squeeze(1).tolist()) == top
        assert torch.equal(out[list(top)], row[list(top)])


def test_statistical_threshold_is_mean_plus_population_std_times_the_normal_quantile():
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3 + 1
    k = 30
    by_hand = x.mean(-1, keepdim=True) + x.var(-1, unbiased=False, keepdim=True).sqrt() * 1.2815515655446004  # Phi^-1(.9)
    assert torch.allclose(statistical_threshold(x, k), by_hand, atol=1e-5)
    soft = statistical_topk(x, k)
    assert torch.allclose(soft, torch.relu(x - by_hand), atol=1e-5)
    hard = statistical_topk(x, k, soft=False)
    assert torch.equal(hard != 0, x > statistical_threshold(x, k)) and torch.equal(hard[hard != 0], x[hard != 0])
    assert torch.equal(statistical_topk(x, 300), x)  # k = d keeps everything


@pytest.mark.parametrize("d", [512, 1024, 4096])
def test_statistical_topk_recalls_95_percent_of_the_exact_top_k_on_gaussian_rows(d):
    x = torch.randn(2000, d, generator=torch.Generator().manual_seed(d))
    for share in (0.08, 0.25, 0.5):
        k = round(share * d)
        exact = exact_topk(x, k) != 0
        kept = statistical_topk(x, k, soft=False) != 0
        recall = float((kept & exact).sum(-1).float().mean() / k)
        assert recall >= 0.95, (d, share, recall)
        assert abs(float(kept.sum(-1).float().mean()) / k - 1) < 0.05  # the count is k on average


def test_statistical_topk_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: statistical_topk(z, 8), (x,))
    assert torch.autograd.gradcheck(lambda z: statistical_topk(z, 8, soft=False), (x,))
    assert torch.autograd.gradcheck(lambda z: exact_topk(z, 8), (x,))


@pytest.mark.parametrize("bad", [0, 65, -1, 2.5])
def test_k_outside_the_width_is_a_one_line_error(bad):
    with pytest.raises(SparsenError, match="must be an integer in 1..64"):
        TopKMLPConfig(d_model=16, d_ff=64, k=bad)
    with pytest.raises(SparsenError, match="1..64"):
        exact_topk(torch.randn(2, 64), bad)


@pytest.mark.parametrize("r", [-1, 16, 20])
def test_predictor_r_outside_the_model_width_is_a_one_line_error(r):
    with pytest.raises(SparsenError, match="r must be an integer in 0..15"):
        PredictorFFNConfig(d_model=16, d_ff=64, r=r, k=8)


# --- MLPs ----------------------------------------------------------------------------------------------------------------
def test_topk_mlp_with_k_equal_to_d_ff_is_the_dense_mlp():
    for gated, act in ((False, "relu"), (True, "silu")):
        torch.manual_seed(0)
        dense = DenseMLP(MLPConfig(d_model=32, d_ff=96, activation=act, gated=gated))
        sparse = TopKMLP(TopKMLPConfig(d_model=32, d_ff=96, activation=act, gated=gated, k=96))
        _copy(sparse, dense)
        x = torch.randn(2, 5, 32)
        assert torch.equal(sparse(x), dense(x))


def test_topk_mlp_keeps_k_hidden_units_and_equals_the_masked_hand_computation():
    torch.manual_seed(1)
    m = TopKMLP(TopKMLPConfig(d_model=16, d_ff=64, k=5))
    x = torch.randn(9, 16)
    h = torch.relu(x @ m.up.weight.T)
    keep = torch.zeros_like(h, dtype=torch.bool).scatter_(1, h.topk(5, -1).indices, True)
    assert torch.allclose(m(x), (h * keep) @ m.down.weight.T, atol=1e-6)
    assert (m.hidden(x) != 0).sum(-1).le(5).all()


def test_gated_silu_topk_mlp_with_k_equal_to_d_ff_equals_transformers_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu")
    torch.manual_seed(2)
    hf = LlamaMLP(cfg)
    ours = TopKMLP(TopKMLPConfig(d_model=32, d_ff=80, activation="silu", gated=True, k=80))
    ours.load_state_dict({"gate.weight": hf.gate_proj.weight, "up.weight": hf.up_proj.weight,
                          "down.weight": hf.down_proj.weight})
    x = torch.randn(3, 7, 32)
    assert torch.allclose(ours(x), hf(x), atol=1e-6)


def test_stat_topk_mlp_in_gemma3n_form_equals_transformers_gemma3n_mlp():
    from transformers import Gemma3nTextConfig
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP

    cfg = Gemma3nTextConfig(hidden_size=32, intermediate_size=[128, 128], num_hidden_layers=2,
                            activation_sparsity_pattern=[0.95, 0.0], hidden_activation="gelu_pytorch_tanh")
    torch.manual_seed(3)
    hf = Gemma3nTextMLP(cfg, layer_idx=0)
    ours = StatTopKMLP(StatTopKMLPConfig(d_model=32, d_ff=128, activation="gelu_tanh", gated=True, k=None,
                                         sparsity=0.95))
    ours.load_state_dict({"gate.weight": hf.gate_proj.weight, "up.weight": hf.up_proj.weight,
                          "down.weight": hf.down_proj.weight})
    x = torch.randn(2, 6, 32)
    assert torch.allclose(ours(x), hf(x), atol=1e-6)
    assert float((ours.hidden(x) != 0).float().mean()) < 0.15  # about 5% of the gate survives


def test_predictor_ffn_with_r_0_and_k_d_ff_is_the_dense_mlp():
    torch.manual_seed(4)
    dense = DenseMLP(MLPConfig(d_model=24, d_ff=48, activation="gelu_tanh"))
    for selection in ("exact", "statistical"):
        pred = PredictorFFN(PredictorFFNConfig(d_model=24, d_ff=48, r=0, k=48, selection=selection))
        _copy(pred, dense)
        x = torch.randn(4, 24)
        assert torch.equal(pred(x), dense(x))


def test_predictor_ffn_equals_its_formula_and_its_selected_only_path():
    torch.manual_seed(5)
    cfg = PredictorFFNConfig(d_model=24, d_ff=48, r=8, k=48, activation="gelu_tanh")
    m = PredictorFFN(cfg)
    x = torch.randn(6, 24)
    act = lambda z: F.gelu(z, approximate="tanh")
    by_hand = (act(x[:, :8] @ m.predictor.weight.T) * (x[:, 8:] @ m.up.weight.T)) @ m.down.weight.T
    assert torch.allclose(m(x), by_hand, atol=1e-6)
    for selection in ("exact", "statistical"):
        sparse = PredictorFFN(PredictorFFNConfig(d_model=24, d_ff=48, r=8, k=6, selection=selection))
        _copy(sparse, m)
        assert torch.allclose(sparse.forward_selected(x), sparse(x), atol=1e-6)
        if selection == "exact":
            assert ((sparse.hidden(x) != 0).sum(-1) <= 6).all()


def test_blockffn_equals_its_per_expert_loop_and_measures_chunk_sparsity():
    torch.manual_seed(6)
    m = BlockFFN(BlockFFNConfig(d_model=16, d_ff=64, experts=4))
    x = torch.randn(5, 16)
    r = torch.relu(x @ m.router.weight.T)
    r = r / torch.sqrt((r ** 2).mean(-1, keepdim=True) + 1e-6) * m.router_norm.weight
    out = sum(r[:, e:e + 1] * (F.silu(x @ m.w_up[e].T) @ m.w_down[e].T) for e in range(4))
    assert torch.allclose(m(x), out, atol=1e-5)
    active = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]], dtype=torch.bool)  # 1 batch, 4 tokens, 3 units
    assert chunk_sparsity(active, 2) == pytest.approx(1 - (2 / 3 + 0) / 2)
    assert chunk_sparsity(active, 1) == pytest.approx(1 - 2 / 12)


@pytest.mark.parametrize("module", ["topk", "stat", "predictor", "blockffn", "attn-topk", "attn-local"])
def test_module_gradients_match_finite_differences(module):
    torch.manual_seed(7)
    m = {"topk": lambda: TopKMLP(TopKMLPConfig(d_model=6, d_ff=12, k=4)),
         "stat": lambda: StatTopKMLP(StatTopKMLPConfig(d_model=6, d_ff=12, k=4)),
         "predictor": lambda: PredictorFFN(PredictorFFNConfig(d_model=6, d_ff=12, r=2, k=4)),
         "blockffn": lambda: BlockFFN(BlockFFNConfig(d_model=6, d_ff=12, experts=3)),
         "attn-topk": lambda: Attention(AttentionConfig(d_model=8, n_heads=2, pattern="topk", k=2)),
         "attn-local": lambda: Attention(AttentionConfig(d_model=8, n_heads=2, pattern="local-dilated", window=2,
                                                         stride=3))}[module]().double()
    d = 8 if module.startswith("attn") else 6
    x = torch.randn(1, 5, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    names = [n for n, _ in m.named_parameters()][:2]  # and the weights' gradients
    weights = tuple(dict(m.named_parameters())[n].detach().clone().requires_grad_(True) for n in names)
    call = lambda *ws: torch.func.functional_call(m, dict(zip(names, ws)), (x.detach(),))
    assert torch.autograd.gradcheck(call, weights)


# --- attention -----------------------------------------------------------------------------------------------------------
def _rot(z: torch.Tensor, hd: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE by hand (rotate-half) over z's positions [.., t, hd]."""
    inv = 1 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(z.shape[-2]).float()[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return z * cos + torch.cat([-z[..., hd // 2:], z[..., :hd // 2]], -1) * sin


def _attention_by_heads(m: Attention, x: torch.Tensor, allowed_per_head: list) -> torch.Tensor:
    c = m.cfg
    hd = c.head_dim
    outs = []
    for h in range(c.n_heads):
        kvh = h // (c.n_heads // c.kv_heads)
        q = _rot(x @ m.q.weight[h * hd:(h + 1) * hd].T, hd)
        k = _rot(x @ m.k.weight[kvh * hd:(kvh + 1) * hd].T, hd)
        v = x @ m.v.weight[kvh * hd:(kvh + 1) * hd].T
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        outs.append(torch.softmax(s.masked_fill(~allowed_per_head[h], float("-inf")), -1) @ v)
    return torch.cat(outs, -1) @ m.o.weight.T


def _attention_by_hand(m: Attention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return _attention_by_heads(m, x, [allowed] * m.cfg.n_heads)


def test_dense_attention_equals_the_hand_computation_and_transformers_llama_attention():
    torch.manual_seed(8)
    m = Attention(AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2))
    x = torch.randn(2, 9, 32)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.allclose(m(x), _attention_by_hand(m, x, causal), atol=1e-5)

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                      attn_implementation="eager")
    hf = LlamaAttention(cfg, layer_idx=0)
    hf.load_state_dict({"q_proj.weight": m.q.weight, "k_proj.weight": m.k.weight, "v_proj.weight": m.v.weight,
                        "o_proj.weight": m.o.weight})
    pos = LlamaRotaryEmbedding(cfg)(x, torch.arange(9)[None])
    mask = torch.zeros(9, 9).masked_fill(~causal, float("-inf"))[None, None]
    assert torch.allclose(m(x), hf(x, position_embeddings=pos, attention_mask=mask)[0], atol=1e-5)


def test_sparse_attention_with_every_key_kept_is_dense_and_keeps_k_keys_otherwise():
    torch.manual_seed(9)
    dense = Attention(AttentionConfig(d_model=16, n_heads=2))
    x = torch.randn(1, 12, 16)
    for cfg in (AttentionConfig(d_model=16, n_heads=2, pattern="topk", k=12),
                AttentionConfig(d_model=16, n_heads=2, pattern="local-dilated", window=12, stride=5)):
        m = Attention(cfg)
        _copy(m, dense)
        assert torch.allclose(m(x), dense(x), atol=1e-5)
        assert m.attended_fraction == 1.0
    m = Attention(AttentionConfig(d_model=16, n_heads=2, pattern="topk", k=3))
    _copy(m, dense)
    y = m(x)
    assert m.attended_fraction < 0.5
    # by hand, head by head: each query's 3 best causal keys (the allowed set differs per head)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    per_head = []
    for h in range(2):
        hd = 8
        q = _rot(x @ m.q.weight[h * hd:(h + 1) * hd].T, hd)
        k = _rot(x @ m.k.weight[h * hd:(h + 1) * hd].T, hd)
        s = (q @ k.transpose(-1, -2)).masked_fill(~causal, float("-inf"))[0]
        keep = torch.zeros(12, 12, dtype=torch.bool)
        for i in range(12):
            keep[i, s[i].topk(min(3, i + 1)).indices] = True
        per_head.append(keep)
    assert torch.allclose(y, _attention_by_heads(m, x, per_head), atol=1e-5)
    local = Attention(AttentionConfig(d_model=16, n_heads=2, pattern="local-dilated", window=3, stride=4))
    _copy(local, dense)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None]
    allowed = (j <= i) & (((i - j) < 3) | ((i - j) % 4 == 0))
    assert torch.allclose(local(x), _attention_by_hand(local, x, allowed), atol=1e-5)


def test_the_soft_thresholds_closed_form_gradient_equals_autograd_through_std_mean():
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    g = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    a = x.clone().requires_grad_(True)
    statistical_topk(a, 10).backward(g)
    b = x.clone().requires_grad_(True)
    torch.relu(b - statistical_threshold(b, 10)).backward(g)
    assert torch.allclose(a.grad, b.grad, atol=1e-12)
