"""Sparse attention on the long-context task suite: every configuration answers every sample, dense beside it.

Decode methods run as a user meets them (``sparse_from='question'``, the default): the context up to the
sample's trailing question is prefilled dense (once per sample, shared by every configuration), then the question
and the answer are decoded through the sparse path, greedy, up to the sample's ``max_new_tokens`` or an EOS. With
``sparse_from='answer'`` the whole prompt is prefilled dense and only the answer is sparse (a short answer alone
tests little). Prefill methods (block-sparse prefill, ``config.kind == 'prefill'``) prefill the whole prompt
(context, question, answer prefix) with their pattern, once per sample and configuration, and the answer is
decoded dense after it; ``sparse_from`` does not apply to them. Accuracy per (configuration, task, length) with a
95% Wilson interval, and the attention density achieved: of the keys the sparse tokens read (decode methods), or
of the prompt's causal (query, key) entries computed (prefill methods, with the estimate's share of the dense
QK^T FLOPs).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparsen.core.attention import capturing_prefix_mass, prime
from sparsen.errors import SparsenError
from sparsen.evaluation.tasks import TaskSample, prompt_tokens, score
from sparsen.models.kv import cache_of, with_cache
from sparsen.models.loading import stop_ids

SPARSE_FROM = ("question", "answer")


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


@dataclass
class _Run:
    label: str
    sparsifier: object | None  # None: dense

    @property
    def prefill(self) -> bool:
        """A block-sparse prefill method: its own sparse prefill of the whole prompt, then dense decoding."""
        return self.sparsifier is not None and bool(self.sparsifier.prefill_rules)


def _growing_copy(cache, extra: int):
    """A copy of a prompt's DynamicCache whose full-attention layers append into preallocated room for ``extra``
    more positions (HF's DynamicLayer concatenates, copying the whole cache of every layer at every step: at 4K that
    is most of a decode step). Other layer kinds (sliding windows) are deep-copied as they are."""
    from transformers.cache_utils import DynamicLayer

    class _Growing(DynamicLayer):
        def __init__(self, layer):
            super().__init__()
            k, v = layer.keys, layer.values
            self.n = k.shape[-2]
            self.kbuf = k.new_empty(*k.shape[:-2], self.n + extra, k.shape[-1])
            self.vbuf = v.new_empty(*v.shape[:-2], self.n + extra, v.shape[-1])
            self.kbuf[..., : self.n, :] = k
            self.vbuf[..., : self.n, :] = v
            self.keys, self.values = self.kbuf[..., : self.n, :], self.vbuf[..., : self.n, :]
            self.device, self.is_initialized = k.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            m = key_states.shape[-2]
            if self.n + m > self.kbuf.shape[-2]:  # more than the room asked for: grow as HF would
                self.kbuf = torch.cat([self.kbuf[..., : self.n, :], key_states], dim=-2)
                self.vbuf = torch.cat([self.vbuf[..., : self.n, :], value_states], dim=-2)
            else:
                self.kbuf[..., self.n: self.n + m, :] = key_states
                self.vbuf[..., self.n: self.n + m, :] = value_states
            self.n += m
            self.keys, self.values = self.kbuf[..., : self.n, :], self.vbuf[..., : self.n, :]
            return self.keys, self.values

        def get_seq_length(self):
            return self.n

    out = copy.copy(cache)
    out.layers = [_Growing(la) if type(la) is DynamicLayer and la.is_initialized else copy.deepcopy(la)
                  for la in cache.layers]
    return out


def _greedy(lm, tail: list[int], cache, first_logits, max_new: int, stop: set[int]) -> list[int]:
    """Decode greedily after feeding ``tail`` (the question, sparse) on top of ``cache``."""
    model = lm.model
    logits = (model(torch.tensor([tail]), **with_cache(model, cache), logits_to_keep=1).logits[0, -1] if tail
              else first_logits)
    out: list[int] = []
    for i in range(max_new):
        tok = int(logits.argmax())
        out.append(tok)
        if tok in stop or i + 1 == max_new:
            break
        logits = model(torch.tensor([[tok]]), **with_cache(model, cache)).logits[0, -1]
    return out


def load_checkpoint(path) -> dict:
    """{sample id: row} from a checkpoint file of ``run_tasks`` (a torn last line, from an interrupted write, is
    dropped)."""
    rows = {}
    if path is not None and Path(path).exists():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["id"]] = row
    return rows


@torch.no_grad()
def run_tasks(lm, samples: list[TaskSample], plans: dict, sparse_from: str = "question",
              progress: bool = True, checkpoint=None) -> dict:
    """Score ``plans`` ({label: attention Plan}) and dense on ``samples``; returns per-sample and grouped results.

    ``checkpoint``: a JSONL file that receives every finished sample's row; a row already there for the same sample
    (same id, text and sparse_from) keeps its results, and only the configurations it lacks run (an interrupted run
    resumes; a grid grows without re-running what it has)."""
    if sparse_from not in SPARSE_FROM:
        raise SparsenError(f"sparse_from '{sparse_from}': use one of {', '.join(SPARSE_FROM)}")
    runs = [_Run("dense", None)]
    for label, plan in plans.items():
        runs.append(_Run(label, plan.build_sparsifier(lm)))
    for r in runs[1:]:
        if r.sparsifier is not None and not r.sparsifier.attention_rules:
            raise SparsenError(f"configuration '{r.label}' has no attention method")
    budgets = {r.label: r.sparsifier for r in runs[1:]}
    wants_mass = any(sel.needs_prefix_mass for r in runs[1:] for sel in r.sparsifier.attention_rules.values())
    stop = stop_ids(lm)
    tok = lm.tokenizer
    rows = []
    done = load_checkpoint(checkpoint)
    t0 = time.perf_counter()
    for s in tqdm(samples, desc="attn-eval", unit="sample", disable=not progress):
        ids, split = prompt_tokens(tok, s)
        if sparse_from == "answer" or split >= len(ids):
            split = len(ids)
        _check_budgets(budgets, len(ids) + s.max_new_tokens, s.id)
        digest = hashlib.sha1(json.dumps([s.prompt, s.answer_prefix, s.answers, s.max_new_tokens]).encode()).hexdigest()
        row = {"id": s.id, "task": s.task, "length": s.meta.get("length"), "tokens": len(ids),
               "sparse_tokens": len(ids) - split, "answers": s.answers, "sparse_from": sparse_from, "sha1": digest,
               "results": {}}
        old = done.get(s.id)
        if old is not None and all(old.get(k) == row[k] for k in ("sha1", "tokens", "sparse_tokens", "sparse_from")):
            row["results"] = {k: v for k, v in old["results"].items() if k in budgets or k == "dense"}
        todo = [r for r in runs if r.label not in row["results"]]
        out = mass = None
        if any(not r.prefill for r in todo):
            mass = {}
            prefix = torch.tensor([ids[:split]])
            if wants_mass:
                with capturing_prefix_mass(lm.adapter, mass):
                    out = lm.model(prefix, use_cache=True, logits_to_keep=1)
            else:
                out = lm.model(prefix, use_cache=True, logits_to_keep=1)
        for r in todo:
            sp = r.sparsifier
            if r.prefill:
                sp.reset_stats()
                with sp:  # a forward from position 0: the whole prompt through the method's pattern; then dense
                    pre = lm.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
                    gen = _greedy(lm, [], cache_of(pre), pre.logits[0, -1], s.max_new_tokens, stop)
                att = sp.achieved()["attention"]
                text = tok.decode(gen, skip_special_tokens=True)
                row["results"][r.label] = {"text": text, "score": score(s, text), "density": att["prefill_density"],
                                           "estimate_share": att["prefill_estimate_share"]}
                continue
            cache = _growing_copy(cache_of(out), len(ids) - split + s.max_new_tokens)
            if sp is None:
                gen = _greedy(lm, ids[split:], cache, out.logits[0, -1], s.max_new_tokens, stop)
                density = None
            else:
                sp.reset_stats()
                sp.dense_prefix = 0  # every query of this pass and the next is sparse
                prime(sp, mass)
                with sp:
                    gen = _greedy(lm, ids[split:], cache, out.logits[0, -1], s.max_new_tokens, stop)
                density = sp.achieved()["attention"]
            text = tok.decode(gen, skip_special_tokens=True)
            row["results"][r.label] = {"text": text, "score": score(s, text),
                                       **({"density": density["density"], "read_density": density["read_density"]}
                                          if density and density["density"] is not None else {})}
        row["results"] = {r.label: row["results"][r.label] for r in runs}  # in the runs' order
        rows.append(row)
        if checkpoint is not None and todo:
            Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
            with open(checkpoint, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    return {"model": lm.spec, "sparse_from": sparse_from, "labels": [r.label for r in runs],
            "configs": {label: plan.attention for label, plan in plans.items()},
            "kinds": {r.label: "prefill" if r.prefill else "decode" for r in runs[1:]},
            "groups": group_results(rows, [r.label for r in runs]), "samples": rows,
            "seconds": time.perf_counter() - t0}


def _check_budgets(sparsifiers: dict, context: int, sample_id: str) -> None:
    for label, sp in sparsifiers.items():
        tokens = sp.attention_config.get("tokens")
        if tokens is not None and tokens > context:
            raise SparsenError(f"'{label}' asks for {tokens} keys but sample {sample_id} has {context} tokens: give a "
                               "budget no larger than the context, or a density")


def _by_task_and_length(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["length"]), []).append(row)
    return groups


def group_results(rows: list[dict], labels: list[str]) -> list[dict]:
    """Accuracy per (label, task, length) with a 95% Wilson interval, and the mean density of the sparse tokens.
    The length is the generated suite's (a user's samples without ``meta.length`` group as one, length None)."""
    out = []
    for (task, length), rs in sorted(_by_task_and_length(rows).items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        for label in labels:
            scores = [r["results"][label]["score"] for r in rs]
            dens = [r["results"][label]["density"] for r in rs if "density" in r["results"][label]]
            lo, hi = wilson(sum(scores), len(scores))
            out.append({"label": label, "task": task, "length": length, "n": len(scores),
                        "accuracy": sum(scores) / len(scores), "ci95": [lo, hi],
                        "density": sum(dens) / len(dens) if dens else None})
    return out


def markdown_table(result: dict) -> str:
    """Rows (length, task) and a mean-over-tasks row per length; a column per configuration: accuracy % [CI]."""
    labels = result["labels"]
    lines = ["| length | task | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    by = {(g["length"], g["task"], g["label"]): g for g in result["groups"]}
    lengths = sorted({g["length"] for g in result["groups"]}, key=lambda x: x or 0)
    tasks = sorted({g["task"] for g in result["groups"]})
    for length in lengths:
        for task in tasks:
            cells = []
            for label in labels:
                g = by.get((length, task, label))
                cells.append("" if g is None else f"{100 * g['accuracy']:.0f} [{100 * g['ci95'][0]:.0f}, "
                                                  f"{100 * g['ci95'][1]:.0f}]")
            if any(cells):
                lines.append(f"| {length or 'any'} | {task} | " + " | ".join(cells) + " |")
        means = []
        for label in labels:
            accs = [by[(length, t, label)]["accuracy"] for t in tasks if (length, t, label) in by]
            dens = [by[(length, t, label)]["density"] for t in tasks
                    if (length, t, label) in by and by[(length, t, label)]["density"] is not None]
            d = f" (density {sum(dens) / len(dens):.3f})" if dens else ""
            means.append(f"**{100 * sum(accs) / len(accs):.1f}**{d}")
        lines.append(f"| {length or 'any'} | mean | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (McNemar's exact test on the discordant pairs): the p-value of ``wins`` against
    ``losses`` when either is equally likely."""
    n = wins + losses
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_table(result: dict, reference: str = "dense") -> str:
    """Each configuration against ``reference`` on the same samples: per (length, task) ``+w -l``, the samples it
    scores above the reference and below it, then the pooled counts and their sign-test p-value. Intervals on two
    accuracies overlap long before a paired difference stops being noise; this is the test for "above dense"."""
    rows, labels = result["samples"], [x for x in result["labels"] if x != reference]
    if reference not in result["labels"] or not labels:
        return ""
    groups = _by_task_and_length(rows)
    tasks = sorted({task for task, _ in groups})
    lengths = sorted({length for _, length in groups}, key=lambda x: x or 0)
    lines = ["", f"Against {reference} on the same samples: how many each configuration scores above {reference} (+) and "
             "below it (-):", "", "| configuration | length | " + " | ".join(tasks) + " | all | p (sign test) |",
             "|---|---|" + "---|" * (len(tasks) + 2)]
    for label in labels:
        for length in lengths:
            cells, total = [], [0, 0]
            for task in tasks:
                diffs = [r["results"][label]["score"] - r["results"][reference]["score"]
                         for r in groups.get((task, length), [])]
                wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
                total[0] += wins
                total[1] += losses
                cells.append(f"+{wins} -{losses}" if diffs else "")
            p = sign_test(*total)
            lines.append(f"| {label} | {length or 'any'} | " + " | ".join(cells)
                         + f" | +{total[0]} -{total[1]} | {p:.2g} |")
    return "\n".join(lines) + "\n"
