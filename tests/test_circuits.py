"""Circuit discovery with discrete codes: the AUC machinery against hand computations, the ground-truth sets, the
patching and ablation hooks (identities they must satisfy), the codes' determinism, a planted circuit recovered end to
end on a tiny model, the task generators, and the CLI's files and one-line errors."""

import argparse
import json

import numpy as np
import pytest
import torch

import sparsen
from sparsen.circuits import CircuitConfig, run_circuits, summary_markdown
from sparsen.circuits.codes import code_run, flip_scores, node_scores, pair_counts, pair_scores, tv_scores
from sparsen.circuits.heads import OUTPUT_MODES, Heads, Recorded
from sparsen.circuits.run import average_ranks, permutation_null, roc_auc
from sparsen.circuits.tasks import GENERATORS, TASKS, Task, build_task, pad_batch
from sparsen.circuits.truth import (
    Patching,
    attribution_patching,
    bootstrap_threshold,
    cover_set,
    halves,
    jaccard,
    mean_ablation,
    patch_heads,
    template_means,
    threshold_set,
)
from sparsen.cli_circuits import OUTPUT_MODES as CLI_OUTPUT_MODES
from sparsen.cli_circuits import TASK_NAMES, add_parsers, cmd_circuits
from sparsen.errors import SparsenError

PLANTED = [1, 6, 8, 11]  # L0H1, L1H2, L2H0, L2H3 of tiny-llama's 3 x 4 heads


def synthetic_task(lm, n=24, length=12, seed=0, identical=False) -> Task:
    """Random byte prompts; the negative redraws the first half (or is the positive itself). The metric is the logit
    difference between the positive's and the negative's top tokens at the last position, so the model "solves" it."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 256, (n, length), generator=g)
    lengths = torch.randint(length - 3, length + 1, (n,), generator=g)  # ragged: right padding is exercised
    neg = pos.clone()
    if not identical:
        neg[:, : length // 2] = torch.randint(0, 256, (n, length // 2), generator=g)
    pos_ids = [p[:k].tolist() for p, k in zip(pos, lengths)]
    neg_ids = [q[:k].tolist() for q, k in zip(neg, lengths)]
    heads = Heads(lm)
    lp, ln = heads.logits(pos_ids), heads.logits(neg_ids)
    a, b = lp.argmax(-1), ln.argmax(-1)
    same = a == b
    b[same] = lp[same].argsort(-1, descending=True)[:, 1]
    weights = torch.tensor([[1.0, -1.0]]).repeat(n, 1)
    return Task("synthetic", pos_ids, neg_ids, torch.stack([a, b], 1), weights, "logit_diff",
                groups=lengths.tolist())  # prompts of one length form a "template" (for the mean-ablation values)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards gain nothing from a second thread, and on a busy machine its spin-waits cost 5-40x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted():
    """tiny-llama with every head's W_O columns zeroed except PLANTED: the metric depends on exactly those heads."""
    lm = sparsen.load_model("tiny-llama")
    hd, nh = lm.adapter.head_dim, lm.adapter.n_heads
    with torch.no_grad():
        for layer, block in enumerate(lm.adapter.blocks):
            for h in range(nh):
                if layer * nh + h not in PLANTED:
                    block.linears["o"].weight[:, h * hd:(h + 1) * hd] = 0
    return lm


# --- AUC, sets, scores: hand computations ----------------------------------------------------------------------------
def test_roc_auc_matches_hand_computed_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ordered
    assert roc_auc([1, 1, 0], [1, 0, 0]) == pytest.approx(0.75)  # a tie counts half: (1 + 0.5) / 2
    assert roc_auc([3, 2, 1], [1, 1, 0]) == 1.0 and roc_auc([1, 2, 3], [1, 1, 0]) == 0.0
    assert roc_auc([5, 5, 5, 5], [1, 0, 1, 0]) == 0.5
    assert np.isnan(roc_auc([1, 2], [1, 1]))
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    rng = np.random.default_rng(0)  # against the brute-force pair count on random ties
    s, y = rng.integers(0, 4, 40).astype(float), rng.random(40) < 0.3
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert roc_auc(s, y) == pytest.approx(brute)


def test_permutation_null_is_centred_on_one_half():
    rng = np.random.default_rng(1)
    labels = np.zeros(100, dtype=bool)
    labels[:10] = True
    scores = rng.random((3, 100))
    null = permutation_null(scores, labels, permutations=500, seed=0)
    assert null.shape == (500,) and abs(null.mean() - 0.5) < 0.03
    perfect = np.where(labels, 1.0, 0.0)[None]
    assert roc_auc(perfect[0], labels) == 1.0 > np.quantile(permutation_null(perfect, labels, 200), 0.95)


def test_ground_truth_sets_and_jaccard():
    effect = np.array([0.5, -0.3, 0.1, 0.1, 0.0, 0.02])
    assert threshold_set(effect, 0.03) == [0, 1, 2, 3]
    assert cover_set(effect, 0.8) == [0, 1, 2]  # 0.5 + 0.3 = 0.8 < 0.8 * 1.02: a third head (the first of the tie)
    assert cover_set(np.array([0.5, 0.3, 0.1, 0.1]), 0.8) == [0, 1]  # exactly 80%
    assert cover_set(np.array([0.5, 0.3, 0.1, 0.1]), 0.81) == [0, 1, 2]
    assert cover_set(np.zeros(4)) == []
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5 and jaccard([], []) == 1.0 and jaccard([1], []) == 0.0
    a, b = halves(7)
    assert a == [0, 2, 4, 6] and b == [1, 3, 5] and not set(a) & set(b)


def test_bootstrap_of_the_threshold_set_against_a_loop():
    rng = np.random.default_rng(3)
    p, h = 12, 6
    m_clean, m_neg = rng.normal(3, 0.5, p), rng.normal(0, 0.5, p)
    num = rng.normal(0, 0.05, (p, h)) * (m_clean - m_neg)[:, None]
    num[:, 0] = 0.5 * (m_clean - m_neg)  # always in
    num[:, 1] = 0.0  # never in
    patched = Patching(num=num, m_clean=m_clean, m_neg=m_neg)
    boot = bootstrap_threshold(patched, threshold=0.03, n=200, seed=7)
    draws = np.random.default_rng(7).integers(0, p, (200, p))  # the same resamples, one at a time
    sizes, member = [], np.zeros(h)
    for d in draws:
        s = threshold_set(Patching(num=num[d], m_clean=m_clean[d], m_neg=m_neg[d]).effect(), 0.03)
        sizes.append(len(s))
        member[s] += 1 / 200
    np.testing.assert_allclose(boot["p_in_set"], member)
    assert boot["p_in_set"][0] == 1.0 and boot["p_in_set"][1] == 0.0
    assert boot["size_quantiles"]["p50"] == np.quantile(sizes, 0.5)
    assert boot["size_in_gate"] == np.mean([5 <= n <= 40 for n in sizes])


def test_node_and_pair_scores_by_hand():
    # 3 heads; head 0 sees code 5 only on positives, head 1 the same codes on both, head 2 codes 1 and 2 only on positives
    pos = np.array([[5, 0, 1], [4, 0, 2]])
    neg = np.array([[4, 0, 3], [4, 0, 3]])
    assert node_scores(pos, neg, 8).tolist() == [1.0, 0.0, 2.0]
    assert flip_scores(pos, neg).tolist() == [0.5, 0.0, 1.0]  # pair 0: 5 vs 4, 0 vs 0, 1 vs 3; pair 1: 4 vs 4, ...
    with pytest.raises(ValueError, match="paired"):
        flip_scores(pos, neg[:1])
    # tv: head 0 P(pos) = {5: .5, 4: .5}, P(neg) = {4: 1} -> 0.5; head 1 the same -> 0; head 2 disjoint -> 1
    assert tv_scores(pos, neg, 8).tolist() == [0.5, 0.0, 1.0]
    assert tv_scores(pos, neg).tolist() == [0.5, 0.0, 1.0]  # k from the codes
    c = pair_counts(pos, neg, 8)
    # pairs (0,1): (5,0) new, (4,0) seen -> 1; (0,2): (5,1), (4,2) -> 2; (1,2): (0,1), (0,2) -> 2; symmetric
    assert c.tolist() == [[0, 1, 2], [1, 0, 2], [2, 2, 0]]
    # top 9 // 4 = 2 ordered pairs: the 4 ordered pairs with count 2 tie, each credited 2/4
    assert pair_scores(c).tolist() == pytest.approx([1.0, 1.0, 2.0])
    assert pair_scores(c, top=4).tolist() == pytest.approx([2.0, 2.0, 4.0])
    rng = np.random.default_rng(1)  # against set arithmetic on random codes
    cp, cn = rng.integers(0, 5, (9, 7)), rng.integers(0, 5, (9, 7))
    brute = [[0 if a == b else len(set(zip(cp[:, a], cp[:, b])) - set(zip(cn[:, a], cn[:, b]))) for b in range(7)]
             for a in range(7)]
    assert pair_counts(cp, cn, 5).tolist() == brute
    assert node_scores(cp, cn, 5).tolist() == [len(set(cp[:, a]) - set(cn[:, a])) for a in range(7)]


# --- heads: outputs, patching, ablation ------------------------------------------------------------------------------
def test_resumed_runs_match_the_whole_forward(tiny_llama):
    heads = Heads(tiny_llama)
    task = synthetic_task(tiny_llama, n=5)
    ids, lengths = pad_batch(task.pos_ids)
    ref = torch.stack([tiny_llama.model(torch.tensor([s])).logits[0, -1] for s in task.pos_ids])
    rec = Recorded(heads, ids, lengths)
    assert torch.allclose(rec.logits, ref, atol=1e-5)
    for start in range(heads.n_layers):
        assert torch.allclose(heads.resume(rec, start, k=3), ref.repeat(3, 1), atol=1e-5), start


def test_head_outputs_sum_to_the_attention_output(tiny_llama):
    heads = Heads(tiny_llama)
    seqs = synthetic_task(tiny_llama, n=4).pos_ids
    mean, last = heads.outputs(seqs, "mean"), heads.outputs(seqs, "last")
    assert mean.shape == (4, heads.n, tiny_llama.adapter.hidden_size)
    ids, lengths = pad_batch(seqs)
    z = heads.z(ids)
    for layer in range(heads.n_layers):
        o = tiny_llama.adapter.blocks[layer].linears["o"]
        attn = o(z[layer])  # [B, T, hidden]
        rows = slice(layer * heads.n_heads, (layer + 1) * heads.n_heads)
        want_last = attn[torch.arange(4), lengths - 1]
        want_mean = torch.stack([attn[i, : lengths[i]].mean(0) for i in range(4)])
        assert torch.allclose(last[:, rows].sum(1), want_last, atol=1e-5)
        assert torch.allclose(mean[:, rows].sum(1), want_mean, atol=1e-5)


def test_tail_outputs_average_from_each_pairs_first_difference(tiny_llama):
    heads = Heads(tiny_llama)
    task = synthetic_task(tiny_llama, n=4)
    task.neg_ids[1] = list(task.pos_ids[1])  # an identical pair: its tail is the last position
    task.neg_ids[2] = task.pos_ids[2][:-1] + [(task.pos_ids[2][-1] + 1) % 256]
    starts = task.first_differences()
    assert starts == [0, len(task.pos_ids[1]) - 1, len(task.pos_ids[2]) - 1, 0]
    tail = heads.outputs(task.pos_ids, "tail", starts=starts)
    ids, lengths = pad_batch(task.pos_ids)
    z = heads.z(ids)
    for layer in range(heads.n_layers):
        attn = tiny_llama.adapter.blocks[layer].linears["o"](z[layer])
        want = torch.stack([attn[i, starts[i]: lengths[i]].mean(0) for i in range(4)])
        rows = slice(layer * heads.n_heads, (layer + 1) * heads.n_heads)
        assert torch.allclose(tail[:, rows].sum(1), want, atol=1e-5)
    assert torch.equal(heads.outputs(task.pos_ids, "tail", starts=[0] * 4), heads.outputs(task.pos_ids, "mean"))
    with pytest.raises(ValueError, match="one start per prompt"):
        heads.outputs(task.pos_ids, "tail")
    with pytest.raises(ValueError, match="before the prompt's end"):
        heads.outputs(task.pos_ids, "tail", starts=[len(q) for q in task.pos_ids])


def test_patching_from_an_identical_prompt_changes_nothing(tiny_llama):
    heads = Heads(tiny_llama, max_rows=20)
    task = synthetic_task(tiny_llama, n=6, identical=True)
    p = patch_heads(heads, task)
    assert np.abs(p.num).max() < 1e-4
    assert np.allclose(p.m_clean, p.m_neg, atol=1e-5)
    assert np.abs(attribution_patching(heads, task)).max() < 1e-6


def test_patching_every_head_gives_the_negatives_metric(tiny_llama):
    """The last position's residual stream is its token's embedding plus what attention writes there, and the MLPs
    of it: with every head's z from the negative (same last token), the last position is the negative's."""
    heads = Heads(tiny_llama)
    task = synthetic_task(tiny_llama, n=6)
    ids, lengths = pad_batch(task.pos_ids)
    ids_neg, _ = pad_batch(task.neg_ids)
    z_neg = heads.z(ids_neg)
    edits = {layer: (lambda z, layer=layer: z_neg[layer]) for layer in range(heads.n_layers)}
    with torch.no_grad():
        patched = task.metric(heads.forward(ids, lengths, edits))
        resumed = task.metric(heads.resume(Recorded(heads, ids, lengths), 0, 1, edits))
        neg = task.metric(heads.forward(ids_neg, lengths))
        clean = task.metric(heads.forward(ids, lengths))
    assert torch.allclose(patched, neg, atol=1e-4) and torch.allclose(resumed, neg, atol=1e-4)
    assert not torch.allclose(clean, neg, atol=1e-2)


def test_batched_patching_equals_one_head_at_a_time(tiny_llama):
    task = synthetic_task(tiny_llama, n=5)
    many = patch_heads(Heads(tiny_llama, max_rows=64), task)  # 12 heads x 5 pairs in one or two forwards
    one = patch_heads(Heads(tiny_llama, max_rows=5), task, nodes=[3, 7])  # one head per forward
    assert np.allclose(many.num[:, [3, 7]], one.num[:, [3, 7]], atol=1e-4)
    assert np.isnan(one.num[:, 0]).all()


def test_mean_ablation_hooks_restore_the_model_exactly(tiny_llama):
    heads = Heads(tiny_llama)
    task = synthetic_task(tiny_llama, n=6)
    ids, lengths = pad_batch(task.pos_ids)
    with torch.no_grad():
        clean = heads.forward(ids, lengths)
        means = heads.mean_z(task.pos_ids)
        assert means[0].shape == (ids.shape[1], heads.n_heads * heads.head_dim)
        ablated = heads.forward(ids, lengths, heads.ablate_edits(means, set()))
        kept = heads.forward(ids, lengths, heads.ablate_edits(means, set(range(heads.n))))  # keep all: no edit
        after = heads.forward(ids, lengths)
    assert not torch.allclose(ablated, clean, atol=1e-3)
    assert torch.equal(kept, clean) and torch.equal(after, clean)
    res = mean_ablation(heads, task, template_means(heads, task), {"all": list(range(heads.n)), "none": []})
    assert res["all"]["retained"] == pytest.approx(1.0) and res["none"]["m"] == pytest.approx(res["m_all_ablated"])
    # one prompt alone in its template: its mean is itself, so ablating every head changes nothing
    solo = task.subset([0])
    solo.groups = [0]
    res = mean_ablation(heads, solo, template_means(heads, solo), {})
    assert res["m_all_ablated"] == pytest.approx(res["m_clean"], abs=1e-4)


# --- codes ------------------------------------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_codes():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(12, 6, 16, generator=g), torch.randn(12, 6, 16, generator=g) + 0.5
    a = code_run(pos, neg, seed=3, d_sae=20, steps=30)
    b = code_run(pos, neg, seed=3, d_sae=20, steps=30)
    c = code_run(pos, neg, seed=4, d_sae=20, steps=30)
    assert np.array_equal(a["codes_pos"], b["codes_pos"]) and np.array_equal(a["codes_neg"], b["codes_neg"])
    assert np.array_equal(a["node"], b["node"]) and np.array_equal(a["pair"], b["pair"])
    assert not (np.array_equal(a["codes_pos"], c["codes_pos"]) and a["train_prompts"] == c["train_prompts"])


def test_a_null_code_marks_rows_with_no_active_latent_and_leaves_the_rest():
    from sparsen.circuits.codes import codes_of, train_code_sae

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 8, generator=g) * 5
    x[:, 0] *= 0.002  # head 0 writes almost nothing
    sae, scale = train_code_sae(x.reshape(-1, 8), d_sae=6, l1=0.5, steps=20, seed=0)
    with torch.no_grad():  # a threshold of 1 on every latent: head 0's rows encode to nothing
        sae.b_dec.zero_()
        sae.b_enc.fill_(-1.0)
    plain, null = codes_of(sae, scale, x), codes_of(sae, scale, x, null_code=True)
    f = sae.encode(x.reshape(-1, 8)).reshape(5, 4, 6)
    quiet = (f.max(-1).values <= 0).numpy()
    assert quiet[:, 0].all() and not quiet.all()
    assert (null[quiet] == 6).all() and np.array_equal(null[~quiet], plain[~quiet])
    assert np.array_equal(plain[quiet], f.argmax(-1).numpy()[quiet])
    run = code_run(x, x.flip(0), seed=0, d_sae=6, steps=20, null_code=True)
    assert run["codes_pos"].max() <= 6 and run["node"].shape == (4,)


# --- the pipeline end to end ------------------------------------------------------------------------------------------
def test_a_planted_circuit_is_recovered(planted):
    task = synthetic_task(planted, n=24)
    # a threshold below the planted heads' smallest effect (one is ~0.02 here): the ground truth is the planted set
    config = CircuitConfig(task="ioi", seeds=3, steps=100, pairs=16, permutations=200, threshold=1e-3)
    res = run_circuits(planted, config, progress=False, task=task)
    json.dumps(res, allow_nan=False)
    names = res["heads"]["names"]
    effect = np.array(res["truth"]["effect"])
    outside = [i for i in range(len(names)) if i not in PLANTED]
    assert np.abs(effect[outside]).max() < 1e-5  # heads that write nothing have no effect
    assert res["truth"]["sets"]["threshold"] == [names[i] for i in PLANTED]
    assert res["truth"]["mean_ablation"]["threshold"]["retained"] > 0.9
    labels = np.zeros(len(names), dtype=bool)
    labels[PLANTED] = True
    node = np.array(res["scores"]["node"])
    assert np.mean([roc_auc(s, labels) for s in node]) >= 0.95
    assert res["auc"]["threshold"]["flip"]["mean"] >= 0.95 and res["auc"]["threshold"]["tv"]["mean"] >= 0.95
    assert res["auc"]["threshold"]["node"]["mean"] >= 0.95 and res["auc"]["threshold"]["node"]["above_null"]
    assert np.abs(np.array(res["scores"]["attribution"])[outside]).max() < 1e-6
    assert set(res["runtime_seconds"]) >= {"prompts", "behaviour", "outputs", "truth_patching", "codes", "auc"}
    assert "## Acceptance" in summary_markdown(res)


# --- tasks --------------------------------------------------------------------------------------------------------------
def word_tokenizer():
    """A word-level tokenizer (digits split one per token, as SmolLM2's): enough to build every task."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparsen.circuits import tasks as T

    words = set(T.NAMES) | set(T.DOC_WORDS) | set(T.DOC_FUNCS) | set(T.GT_NOUNS) | set("0123456789")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(sorted(words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("name", TASKS)
def test_task_pairs_align_and_are_seeded(name):
    tok = word_tokenizer()
    t = build_task(name, tok, 12, seed=1)
    assert len(t) == 12 and t.targets.shape[0] == 12
    for p, q in zip(t.pos_ids, t.neg_ids):
        assert len(p) == len(q) and p != q and p[-1] == q[-1]
    if name != "greater-than":  # the answer and its competitors are in the positive prompt
        assert all(int(x) in p for p, row in zip(t.pos_ids, t.targets) for x in row)
    again = build_task(name, tok, 12, seed=1)
    assert again.pos_text == t.pos_text and build_task(name, tok, 12, seed=2).pos_text != t.pos_text
    logits = torch.randn(12, tok.vocab_size + 1, requires_grad=True)
    m = t.metric(logits)
    m.sum().backward()  # the metric is differentiable (attribution patching needs it)
    assert m.shape == (12,) and logits.grad is not None
    assert set(TASK_NAMES) == set(TASKS) == set(GENERATORS)
    assert CLI_OUTPUT_MODES == OUTPUT_MODES


def test_tasks_refuse_a_byte_tokenizer_and_unknown_names(tiny_llama):
    for name in ("ioi", "docstring"):  # a byte tokenizer has no single-token names or words
        with pytest.raises(SparsenError, match="single-token") as err:
            build_task(name, tiny_llama.tokenizer, 8, model="tiny-llama")
        assert "\n" not in str(err.value) and "tiny-llama has 0" in str(err.value)
    assert len(build_task("greater-than", tiny_llama.tokenizer, 8)) == 8  # but has single-digit tokens
    with pytest.raises(SparsenError, match="unknown task 'nope'"):
        build_task("nope", tiny_llama.tokenizer, 8)
    with pytest.raises(SparsenError, match="unknown task"):
        CircuitConfig(task="nope")
    with pytest.raises(SparsenError, match="pairs must be at least 2"):
        CircuitConfig(task="ioi", pairs=1)
    with pytest.raises(SparsenError, match="'mean', 'last' or 'tail'"):
        CircuitConfig(task="ioi", mode="first")


# --- CLI ----------------------------------------------------------------------------------------------------------------
def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_parsers(sub, lambda p: p.add_argument("--model", default="smollm2"), int)
    return parser.parse_args(argv)


def test_cli_writes_json_and_markdown(tmp_path, monkeypatch, capsys, planted):
    import sparsen.circuits.run as run_mod

    monkeypatch.setattr(run_mod, "build_task", lambda *a, **k: synthetic_task(planted, n=16))
    monkeypatch.setattr("sparsen.models.load_model", lambda spec: planted)
    out = tmp_path / "c"
    cmd_circuits(_parse(["circuits", "--task", "ioi", "--model", "tiny-llama", "--pairs", "8", "--seeds", "2",
                         "--out", str(out), "--quiet"]))
    res = json.loads((out / "circuits.json").read_text())
    assert res["config"]["pairs"] == 8 and len(res["scores"]["node"]) == 2
    boot = res["truth"]["bootstrap"]
    assert boot["resamples"] == 1000 and 0 <= boot["size_in_gate"] <= 1
    assert all(name in res["heads"]["names"] and 0 < p <= 1 for name, p in boot["p_in_set"].items())
    md = (out / "circuits.md").read_text()
    assert md.startswith("# Circuits") and "bootstrap over the 8 pairs (1000 resamples)" in md
    printed = capsys.readouterr().out
    assert "node AUC" in printed and "of bootstrap resamples within 5-40" in printed


def test_cli_bad_input_is_one_line(tmp_path):
    with pytest.raises(SparsenError, match="unknown task 'nope'") as err:
        cmd_circuits(_parse(["circuits", "--task", "nope", "--out", str(tmp_path / "x")]))
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    with pytest.raises(SparsenError, match="single-token names") as err:
        cmd_circuits(_parse(["circuits", "--task", "ioi", "--model", "tiny-llama", "--out", str(tmp_path / "y"),
                             "--quiet"]))
    assert "\n" not in str(err.value)


# --- SmolLM2 (slow) -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", TASKS)
def test_smollm2_solves_the_tasks(smollm2, name):
    """Behaviour gates on 24 prompts (the full run uses 100): the positives are solved, the negatives are not."""
    task = build_task(name, smollm2.tokenizer, 24, seed=0, model="smollm2")
    heads = Heads(smollm2, max_rows=24)
    mp, mn = task.metric(heads.logits(task.pos_ids)), task.metric(heads.logits(task.neg_ids))
    gate = {"ioi": 0.75}.get(name, 0.9)
    assert (mp > 0).float().mean() >= gate
    assert (mn > 0).float().mean() <= task.chance_accuracy + 0.1
