"""The three circuit tasks of O'Neill & Bui, built for a model's own tokenizer: seeded, paired prompts.

Each task gives positive prompts (the model can predict the answer) and, pair by pair, a negative of exactly the
same token length that differs only where the task's information is destroyed, so the two align position by
position and a head's activations can be patched from one into the other:

    ioi           "When Mary and John went to the store, John gave a drink to" -> " Mary"
                  negative: the second John becomes a third name (no indirect object is determined)
                  M = logit(IO) - logit(S)
    greater-than  "The war lasted from the year 1747 to the year 17" -> a tens digit >= 4
                  negative: the start year ends in "01" (SmolLM2 writes one digit per token)
                  M = sum_{d > t} P(d) - sum_{d < t} P(d) over the ten digit tokens, t = the start year's tens digit
    docstring     "def port(self, load, size, files, last):\\n    \\"\\"\\"...\\n    :param load: ...\\n    :param" -> " files"
                  negative (random_random): every def parameter and documented parameter replaced by fresh words
                  M = logit(right parameter) - max logit(the other def parameters)

A negative is scored with its positive's answer tokens (M_neg is the patching baseline). Names, parameters and
digits must be single tokens of the model's tokenizer; a tokenizer without enough of them is refused in one line.
The chat template is not used: plain text prompts (SmolLM2-135M-Instruct solves all three without it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from sparsen.errors import SparsenError

TASKS = ("ioi", "greater-than", "docstring")

NAMES = """
Aaron Adam Alan Alex Alice Amy Andrew Anna Anne Arthur Ben Beth Bill Bob Brian Carl Carol Charles Charlie Chris
Claire Daniel Dan Dave David Diana Edward Ellen Emily Emma Eric Frank Fred George Grace Greg Hannah Harry Helen
Henry Jack Jacob James Jane Jason Jeff Jennifer Jessica Jim Joe John Jonathan Joseph Joshua Julia Kate Kelly Kevin
Laura Leo Linda Lisa Lucy Luke Mark Martin Mary Matt Max Michael Mike Nancy Nick Paul Peter Rachel Richard Robert
Roger Rose Ruth Ryan Sam Sara Sarah Scott Simon Sophie Steve Susan Thomas Tim Tom Tony Victoria William
""".split()

IOI_PLACES = "store garden restaurant school hospital office house station market park beach library".split()
IOI_OBJECTS = "ring kiss bone basketball computer necklace drink snack book letter bottle gift".split()
# {N1} and {N2} are the two names introduced (subject first: BABA; indirect object first: ABBA), {S2} the subject's
# second mention (a third name in the negative); the prompt ends before the answer, the indirect object.
IOI_TEMPLATES = (
    "Then, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a lot of fun at the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} were working at the {PLACE}. {S2} decided to give a {OBJECT} to",
    "Then, {N1} and {N2} were thinking about going to the {PLACE}. {S2} wanted to give a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument, and afterwards {S2} said to",
    "After {N1} and {N2} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "When {N1} and {N2} got a {OBJECT} at the {PLACE}, {S2} decided to give the {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "While {N1} and {N2} were commuting to the {PLACE}, {S2} gave a {OBJECT} to",
    "After the lunch, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Afterwards, {N1} and {N2} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {N1} and {N2} had a long argument. Afterwards {S2} said to",
    "Friends {N1} and {N2} found a {OBJECT} at the {PLACE}. {S2} gave it to",
)

GT_NOUNS = """
war expedition siege reign dynasty project campaign pilgrimage voyage marriage occupation drought strike plague
famine journey conflict rebellion crusade tour partnership alliance empire struggle
""".split()
GT_CENTURIES = tuple(range(11, 18))

DOC_WORDS = """
load size files last name value data text line path mode file key item node page port state user word color count
index level limit list order range score shape space speed start step style table time title type unit view width
image input label model month object output point price query rate result role rule sample scale server source
status stream target token total tree version window year action address amount answer area base block body book
box cache call case cell channel child city class code config content context date day depth device domain entry
error event field filter flag format frame group handle header height host id info kind layer length link local
match message method number offset option owner parent part pattern position prefix process record region request
response round row section seed sequence service session setting signal slot sort status store string style task
test thread update url weight
""".split()
DOC_FUNCS = """
port load check parse build run update create fetch handle process render save send read write get set apply merge
""".split()


@dataclass
class Task:
    """Paired prompts of one task, tokenized, with what the metric reads from the last position's logits."""

    name: str
    pos_ids: list[list[int]]
    neg_ids: list[list[int]]
    """pair i: the same length as pos_ids[i]"""
    targets: torch.Tensor
    """[N, K] token ids the metric reads for pair i (the same for its positive and its negative)"""
    weights: torch.Tensor
    """[N, K] float: the metric's signs or weights on those tokens (see ``kind``)"""
    kind: str
    """logit_diff: sum_k w_k logit_k;  logit_vs_max: logit_0 - max_{k>0} logit_k;  prob_diff: sum_k w_k P_k"""
    pos_text: list[str] = field(default_factory=list)
    neg_text: list[str] = field(default_factory=list)
    chance: float = 0.0
    """the metric a model without the task's information would score (IOI 0, greater-than 0, docstring 0)"""
    chance_accuracy: float = 0.5
    """the accuracy (fraction with M > 0) of a model without the task's information"""
    groups: list[int] = field(default_factory=list)
    """per pair, its template (prompts of one template align position by position; empty: one template)"""

    def __len__(self) -> int:
        return len(self.pos_ids)

    def subset(self, rows) -> Task:
        rows = list(rows)
        return Task(self.name, [self.pos_ids[i] for i in rows], [self.neg_ids[i] for i in rows], self.targets[rows],
                    self.weights[rows], self.kind, [self.pos_text[i] for i in rows] if self.pos_text else [],
                    [self.neg_text[i] for i in rows] if self.neg_text else [], self.chance, self.chance_accuracy,
                    [self.groups[i] for i in rows] if self.groups else [])

    def first_differences(self) -> list[int]:
        """Per pair, the first position where its prompts differ (before it, a causal model computes the same for
        both); the last position for a pair of identical prompts."""
        return [next((j for j, (a, b) in enumerate(zip(p, n)) if a != b), len(p) - 1)
                for p, n in zip(self.pos_ids, self.neg_ids)]

    def group_of(self, i: int) -> int:
        return self.groups[i] if self.groups else 0

    def metric(self, logits: torch.Tensor, rows=None) -> torch.Tensor:
        """M per prompt from last-position logits [n, V] of prompts ``rows`` (default all, in order); differentiable."""
        tg = self.targets if rows is None else self.targets[rows]
        w = self.weights if rows is None else self.weights[rows]
        if self.kind == "prob_diff":
            vals = torch.softmax(logits.float(), -1).gather(-1, tg)
            return (vals * w).sum(-1)
        vals = logits.float().gather(-1, tg)
        if self.kind == "logit_diff":
            return (vals * w).sum(-1)
        if self.kind == "logit_vs_max":
            return vals[:, 0] - vals[:, 1:].max(-1).values
        raise SparsenError(f"unknown metric kind '{self.kind}'")  # pragma: no cover


# --- tokenizer helpers -------------------------------------------------------------------------------------------
def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def single_tokens(tok, words, prefix: str = " ") -> dict[str, int]:
    """{word: id} for the words that ``prefix + word`` encodes as exactly one token."""
    out = {}
    for w in words:
        ids = _encode(tok, prefix + w)
        if len(ids) == 1:
            out[w] = ids[0]
    return out


def _need(task: str, what: str, have: int, need: int, model: str) -> None:
    if have < need:
        raise SparsenError(f"task '{task}' needs at least {need} single-token {what} in the model's tokenizer; "
                           f"{model or 'this model'} has {have}: use a model with a word-level tokenizer (e.g. smollm2)")


# --- the generators ------------------------------------------------------------------------------------------------
def _ioi(tok, n: int, rng: random.Random, model: str) -> Task:
    names = single_tokens(tok, NAMES)
    _need("ioi", "names", len(names), 10, model)
    pool = sorted(names)
    pos, neg, tg, pt, nt, groups = [], [], [], [], [], []
    tries = 0
    while len(pos) < n:
        tries += 1
        if tries > 50 * n:
            raise SparsenError(f"task 'ioi': could not build {n} length-matched prompt pairs with this tokenizer")
        g = rng.randrange(len(IOI_TEMPLATES))
        tpl = IOI_TEMPLATES[g]
        io, s, c = rng.sample(pool, 3)
        n1, n2 = (io, s) if rng.random() < 0.5 else (s, io)
        fill = dict(PLACE=rng.choice(IOI_PLACES), OBJECT=rng.choice(IOI_OBJECTS), N1=n1, N2=n2)
        p, q = tpl.format(S2=s, **fill), tpl.format(S2=c, **fill)
        pi, qi = _encode(tok, p), _encode(tok, q)
        if len(pi) != len(qi) or names[io] not in pi or names[s] not in pi:
            continue
        pos.append(pi), neg.append(qi), pt.append(p), nt.append(q)
        tg.append([names[io], names[s]])
        groups.append(g)
    targets = torch.tensor(tg)
    weights = torch.tensor([[1.0, -1.0]]).expand(len(tg), 2).clone()
    return Task("ioi", pos, neg, targets, weights, "logit_diff", pt, nt, chance=0.0, chance_accuracy=0.5, groups=groups)


def _greater_than(tok, n: int, rng: random.Random, model: str) -> Task:
    digits = single_tokens(tok, [str(d) for d in range(10)], prefix="")
    _need("greater-than", "digits", len(digits), 10, model)
    digit_ids = [digits[str(d)] for d in range(10)]
    pos, neg, w, pt, nt = [], [], [], [], []
    tries = 0
    while len(pos) < n:
        tries += 1
        if tries > 50 * n:
            raise SparsenError(f"task 'greater-than': could not build {n} length-matched prompt pairs with this tokenizer")
        noun, xx = rng.choice(GT_NOUNS), rng.choice(GT_CENTURIES)
        yy = rng.randint(12, 89)  # tens digit 1..8: both sides of t exist
        p = f"The {noun} lasted from the year {xx}{yy:02d} to the year {xx}"
        q = f"The {noun} lasted from the year {xx}01 to the year {xx}"
        pi, qi = _encode(tok, p), _encode(tok, q)
        # the century must end the prompt as its own digit tokens, so the next token is the tens digit
        if len(pi) != len(qi) or pi[-1] != digit_ids[xx % 10]:
            continue
        t = yy // 10
        pos.append(pi), neg.append(qi), pt.append(p), nt.append(q)
        w.append([1.0 if d > t else -1.0 if d < t else 0.0 for d in range(10)])
    targets = torch.tensor([digit_ids] * len(pos))
    return Task("greater-than", pos, neg, targets, torch.tensor(w), "prob_diff", pt, nt, chance=0.0,
                chance_accuracy=0.5)


DOC_TEMPLATE = ('def {f}(self, {a}, {b}, {c}, {d}):\n    """{w1} {w2} {w3}\n\n    :param {da}: {w4} {w5}\n'
                '    :param {db}: {w6} {w7}\n    :param')


def _docstring(tok, n: int, rng: random.Random, model: str) -> Task:
    words = single_tokens(tok, sorted(set(DOC_WORDS)))
    _need("docstring", "parameter words", len(words), 30, model)
    pool = sorted(words)
    pos, neg, tg, pt, nt = [], [], [], [], []
    tries = 0
    while len(pos) < n:
        tries += 1
        if tries > 50 * n:
            raise SparsenError(f"task 'docstring': could not build {n} length-matched prompt pairs with this tokenizer")
        params = rng.sample(pool, 10)
        a, b, c, d = params[:4]
        ra, rb, rc, rd, rda, rdb = params[4:]  # random_random: fresh def parameters and fresh documented ones
        rest = [w for w in pool if w not in params]  # description words never name a parameter of either prompt
        desc = {f"w{i}": rng.choice(rest) for i in range(1, 8)}
        f = rng.choice(DOC_FUNCS)
        p = DOC_TEMPLATE.format(f=f, a=a, b=b, c=c, d=d, da=a, db=b, **desc)
        q = DOC_TEMPLATE.format(f=f, a=ra, b=rb, c=rc, d=rd, da=rda, db=rdb, **desc)
        pi, qi = _encode(tok, p), _encode(tok, q)
        if len(pi) != len(qi) or any(words[x] not in pi for x in (a, b, c, d)):
            continue
        pos.append(pi), neg.append(qi), pt.append(p), nt.append(q)
        tg.append([words[c], words[a], words[b], words[d]])
    targets = torch.tensor(tg)
    weights = torch.ones(len(tg), 4)
    return Task("docstring", pos, neg, targets, weights, "logit_vs_max", pt, nt, chance=0.0, chance_accuracy=0.25)


GENERATORS = {"ioi": _ioi, "greater-than": _greater_than, "docstring": _docstring}


def check_task(name: str) -> str:
    if name not in GENERATORS:
        raise SparsenError(f"unknown task '{name}': use one of {', '.join(TASKS)}")
    return name


def build_task(name: str, tokenizer, n: int, seed: int = 0, model: str = "") -> Task:
    """``n`` seeded prompt pairs of task ``name`` for this tokenizer (the same seed gives the same prompts)."""
    check_task(name)
    if n < 1:
        raise SparsenError(f"the number of prompts must be at least 1, not {n}")
    rng = random.Random(f"{name}:{seed}")
    return GENERATORS[name](tokenizer, n, rng, model)


def pad_batch(seqs: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] ids and [B] lengths. A causal model's real positions never see the padding after them,
    so no attention mask is needed: the logits and activations at real positions are those of the unpadded prompt."""
    lengths = torch.tensor([len(s) for s in seqs])
    out = torch.full((len(seqs), int(lengths.max())), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out, lengths
