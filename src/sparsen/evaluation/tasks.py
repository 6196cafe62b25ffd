"""A seeded long-context task suite, generated locally, for a small instruct model.

Five tasks after RULER / Sparse Frontier: ``passkey``, ``niah`` (a key among key-value distractors), ``vt``
(variable tracking), ``cwe`` (common-word extraction) and ``story`` (retrieval from a templated story). Every
sample has one template, a trailing question after the context (``query_start`` marks it) and an answer prefix
that starts the assistant turn, since a 135M model cannot follow a free answer format. ``generate_suite`` grows
each sample's filler until prompt plus answer budget fill 90-100% of the asked token length.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from sparsen.errors import SparsenError

METRICS = ("exact", "contains_all")

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
ADJECTIVES = """
quiet bright silent golden silver hidden gentle brave calm clever crimson dusty early empty famous frozen green
happy heavy hollow humble icy jolly lazy lively lonely lucky misty narrow noble odd pale plain proud purple rapid
rough royal rusty sandy shiny shy simple sleepy smooth soft solid spicy steady stormy strange sunny swift tall
tiny warm wild windy wise wooden young yellow
""".split()
NOUNS = """
river mountain forest garden window candle basket bottle bridge castle cloud desert dragon engine feather finger
flower forge fountain glove hammer harbor helmet island jacket kettle ladder lantern lemon meadow mirror needle
ocean orchard paper pencil pepper pillow planet pocket puzzle rabbit ribbon rocket saddle school shadow shell
signal spoon spring square stable star station stone storm street sugar summer table temple thread tiger
tower train tunnel turtle valley village violin wagon wallet water whistle winter wolf yard zebra anchor apple
arrow badge banner barrel beacon bell blanket board bonnet branch bread brick brush bucket button cabin cable
camera canal canvas carpet carrot cart cave chain chair chalk cheese cherry chimney circle clock coat coin comet
compass copper cotton cradle crown crystal cup curtain cushion dagger daisy diamond drum eagle falcon fence field
flag flute fork fox frog gate glass goat grape harp hat hawk hill honey horn horse house jar jewel kite knife lake
lamp leaf letter lily lion lock map marble market meadowlark medal melon mill moon moss mouse nest net oak olive
onion orange owl paddle palace parrot path peach pearl pebble piano pigeon pine pipe plate plum pond pony potato
pump quill rain raven reed ring road robin roof rope rose sail salmon sand scarf seed sheep ship shoe shovel
sparrow spider sponge stamp statue stove swan sword tent thistle thorn ticket timber toast tomato torch tractor
tray trumpet tulip umbrella vase vessel wheel whale wheat willow wind wire wren bean beetle berry boot bowl box
brook canoe card cliff cobweb dove dune ember fern fiddle glacier gravel hammock hedge hive ivy kayak kernel
lagoon lark mast mitten mule nutmeg oar otter oyster pasture peanut pickle plank plow prairie quartz quilt
radish reef saucer shutter sleigh slipper snail spruce squirrel thimble toad trout twig walnut wigwam yarn
""".split()
WORDS = tuple(dict.fromkeys(ADJECTIVES + NOUNS))  # the common-word-extraction vocabulary, without repeats
TOWNS = """
Ashford Brookfield Millbrook Riverton Oakham Fairhaven Greenwood Stonebridge Westmoor Eastwick Northbury Southport
Redcliff Kingsley Larkspur Marlow Elmstead Hollowell Ironwood Kettering Lindale Moorfield Newhaven Oldcastle
Pinehurst Queensbury Rosedale Silverlake Thornbury Underhill Valewood Willowby Yarrow Amberley Clearwater Dunmore
Foxley Glenrock Hartwell Bramblewick
""".split()
PEOPLE = """
Clara Tobias Mira Felix Elena Oscar Hannah Jonas Lucy Marcus Nora Peter Rosa Samuel Tessa Victor Wendy Adam Bella
Colin Daisy Edgar Fiona Gregory Helen Isaac Julia Kevin Laura Martin Nina Owen Paula Quentin Ruth Simon Tara Walter
Yvonne Zara
""".split()
ITEMS = ("lantern", "copper kettle", "wool blanket", "silver bell", "leather saddle", "wooden flute", "glass jar",
         "iron key", "straw hat", "clay pot", "brass compass", "linen shirt", "oak chest", "fishing net", "music box",
         "silk scarf", "walking stick", "bread basket", "tin whistle", "wax candle", "old map", "small telescope",
         "violin", "teapot", "hammer", "coil of rope", "umbrella", "hand mirror", "wall clock", "quilt", "lute",
         "chess set", "ink bottle", "paintbrush", "hunting bow", "round shield", "necklace", "gold ring",
         "pair of boots", "sack of flour")
ROLES = ("a baker", "a fisherman", "a blacksmith", "a weaver", "a potter", "a farmer", "a carpenter", "a tailor",
         "a merchant", "a shepherd", "a miller", "a sailor", "an innkeeper", "a candle maker", "a glassblower",
         "a bookseller", "a gardener", "a cook", "a jeweller", "a healer")
STORY_FILLER = ("The road was long and quiet.", "Birds sang in the tall trees.", "A cold wind came down from the hills.",
                "Arion walked on as the sun rose.", "Clouds moved slowly across the sky.",
                "The river ran clear over the stones.", "He rested for a while under an old oak.",
                "Children played near the well.", "Night fell and the stars came out.",
                "The fields were green after the rain.", "A dog barked somewhere far away.",
                "Arion thought about his home.", "Smoke rose from the chimneys.", "The path climbed over a low hill.",
                "He drank cold water from a spring.", "The evening was warm and still.",
                "A cart rolled past him on the road.", "Rain fell softly for an hour.",
                "He sang an old song to himself.", "The morning air smelled of pine.")


@dataclass
class Difficulty:
    """The knobs that set how hard each task is; tune them so the dense model is neither at 0% nor at 100%."""

    passkey_digits: int = 5
    """Digits in the pass key."""
    niah_keys: int | None = 4
    """Key-value statements in the haystack, the asked one included, placed in the passkey filler prose; None fills
    the whole haystack with them (SmolLM2-135M at 1K: 4 keys 75%, 8 keys 56%, all ~17%)."""
    vt_hops: int = 1
    """Assignments after the first in the asked chain: the answer has vt_hops + 1 variables."""
    vt_chains: int = 1
    """Chains in the text, the asked one included; the others carry other values."""
    cwe_words: int = 1
    """Common words the question asks for (N)."""
    cwe_rare_max: int = 2
    """Most times another word appears (each appears 1..this many times); raised automatically when the embedded
    vocabulary is too small for the length (meta records the value used)."""
    cwe_ratio: int = 40
    """A common word appears cwe_ratio times as often as the most frequent other word."""
    story_chapters: int = 2
    """Chapters in the story, each with its own town, person and item; one is asked about."""
    question_first: bool = False
    """Also state the question before the context (it is always stated after it)."""

    def __post_init__(self):
        lowest = {"passkey_digits": 1, "niah_keys": 1, "vt_hops": 0, "vt_chains": 1, "cwe_words": 1,
                  "cwe_rare_max": 1, "cwe_ratio": 2, "story_chapters": 1}
        for name, lo in lowest.items():
            v = getattr(self, name)
            if v is None and name == "niah_keys":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SparsenError(f"difficulty knob {name}={v!r} is out of range: use a whole number >= {lo}")
        if self.story_chapters > min(len(TOWNS), len(PEOPLE), len(ITEMS)):
            raise SparsenError(f"story_chapters={self.story_chapters} is more than the {len(PEOPLE)} embedded "
                               "names: use fewer chapters")
        if self.cwe_words > len(WORDS) // 2:
            raise SparsenError(f"cwe_words={self.cwe_words} is too many: use at most {len(WORDS) // 2}")


@dataclass
class TaskSample:
    id: str
    task: str
    prompt: str  # the user message
    answers: list[str]
    metric: str  # "exact" | "contains_all"
    answer_prefix: str = ""  # starts the assistant turn
    max_new_tokens: int = 16
    query_start: int | None = None  # character offset in `prompt` where the trailing question begins
    meta: dict = field(default_factory=dict)


def normalise(s: str) -> str:
    """Lowercase, every non-alphanumeric character a space, runs of spaces collapsed, stripped."""
    return re.sub(r"[\W_]+", " ", s.lower()).strip()


def score(sample: TaskSample, continuation: str) -> float:
    """1.0 or 0.0: ``exact`` if the continuation starts with an answer, ``contains_all`` if it holds every answer
    (both on normalised text and at word boundaries, so "12" matches neither "123" nor "a123")."""
    text = normalise(continuation)
    answers = [normalise(a) for a in sample.answers]
    if sample.metric == "exact":
        return float(any(text == a or text.startswith(a + " ") for a in answers))
    if sample.metric == "contains_all":
        return float(all(f" {a} " in f" {text} " for a in answers))
    raise SparsenError(f"sample '{sample.id}' has metric '{sample.metric}': use one of {', '.join(METRICS)}")


_REQUIRED = ("id", "task", "prompt", "answers", "metric")


def _check(d: dict) -> str | None:
    """What is wrong with one decoded line, or None."""
    for k in _REQUIRED:
        if k not in d:
            return f"missing field '{k}': each line needs {', '.join(_REQUIRED)}"
    for k in ("id", "task", "prompt", "answer_prefix"):
        if k in d and not isinstance(d[k], str):
            return f"field '{k}' must be a string"
    if not (isinstance(d["answers"], list) and d["answers"] and all(isinstance(a, str) for a in d["answers"])):
        return "field 'answers' must be a non-empty list of strings"
    if d["metric"] not in METRICS:
        return f"metric {d['metric']!r} is unknown: use one of {', '.join(METRICS)}"
    m = d.get("max_new_tokens", 16)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        return "field 'max_new_tokens' must be a whole number >= 1"
    q = d.get("query_start")
    if q is not None and (isinstance(q, bool) or not isinstance(q, int) or not 0 <= q <= len(d["prompt"])):
        return f"field 'query_start' must be null or a whole number in [0, {len(d['prompt'])}] (the prompt's length)"
    if not isinstance(d.get("meta", {}), dict):
        return "field 'meta' must be an object"
    return None


def load_tasks(path) -> list[TaskSample]:
    """Samples from a JSONL file, one object a line (blank lines skipped, unknown keys ignored)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SparsenError(f"task file '{path}' not found: pass a JSONL file written by save_tasks") from None
    except UnicodeDecodeError:
        raise SparsenError(f"task file '{path}' is not UTF-8 text: pass a JSONL file written by save_tasks") from None
    out, seen = [], {}
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SparsenError(f"{path} line {no}: not JSON ({e.msg}): write one JSON object per line") from None
        problem = "not a JSON object: write one object per line" if not isinstance(d, dict) else _check(d)
        if problem is None and d["id"] in seen:
            problem = f"duplicate id '{d['id']}' (first on line {seen[d['id']]}): give every sample its own id"
        if problem:
            raise SparsenError(f"{path} line {no}: {problem}")
        seen[d["id"]] = no
        out.append(TaskSample(**{f.name: d[f.name] for f in fields(TaskSample) if f.name in d}))
    if not out:
        raise SparsenError(f"task file '{path}' holds no samples: pass a JSONL file with one sample per line")
    return out


def save_tasks(samples, path) -> Path:
    """Write samples as JSONL (one object a line) that ``load_tasks`` reads back identically."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(s)) + "\n" for s in samples), encoding="utf-8")
    return path


def prompt_tokens(tokenizer, sample: TaskSample) -> tuple[list[int], int]:
    """Ids of the model input (user turn, generation prompt, answer prefix) and the index of the first token of
    the trailing question (len(ids) when the sample has none). A tokenizer without a chat template (the tiny test
    models) gets the prompt, a blank line and the answer prefix."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}], tokenize=False,
                                                 add_generation_prompt=True)
    else:
        rendered = sample.prompt + "\n\n"
    at = rendered.find(sample.prompt)
    if at < 0:
        raise SparsenError(f"the chat template changed the text of sample '{sample.id}': use a tokenizer whose "
                           "template keeps the user message verbatim")
    enc = tokenizer(rendered + sample.answer_prefix, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if sample.query_start is None:
        return ids, len(ids)
    q = at + sample.query_start
    # Offsets of byte-level BPE tokens include a leading space, so the question must follow a newline to start
    # exactly on a token; the generators always put it after "\n\n".
    return ids, next((i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= q), len(ids))


# ---- generators: each builds one sample from a freshly seeded rng and a filler size `units` (sentences, statements
# or list items). Draws are made in a fixed order, filler last, so that more units only lengthens the filler: the
# token count then grows almost monotonically with `units`, which `generate_suite` searches.

def _scatter(filler: list[str], inserts: list[tuple[float, str]]) -> tuple[str, list[int]]:
    """Join filler sentences with each insert placed at its depth fraction (ties keep insert order); returns the
    text and each insert's character offset."""
    n = len(filler)
    at: dict[int, list[int]] = {}
    for i, (depth, _) in enumerate(inserts):
        at.setdefault(min(n, round(depth * n)), []).append(i)
    pieces, starts, pos = [], [0] * len(inserts), 0
    for p in range(n + 1):
        for i in at.get(p, []):
            starts[i] = pos
            pieces.append(inserts[i][1])
            pos += len(inserts[i][1]) + 1
        if p < n:
            pieces.append(filler[p])
            pos += len(filler[p]) + 1
    return " ".join(pieces), starts


def _sample(task, intro, context, question, answers, metric, prefix, d, max_new=16, **meta) -> TaskSample:
    head = f"{intro}\n\n" + (f"{question}\n\n" if d.question_first else "")
    prompt = f"{head}{context}\n\n{question}"
    return TaskSample("", task, prompt, answers, metric, prefix, max_new, len(prompt) - len(question),
                      {"question": question, **meta})


def _filler(units: int) -> list[str]:
    return [FILLER[i % len(FILLER)] for i in range(units)]


def passkey(rng: random.Random, units: int, d: Difficulty) -> TaskSample:
    """A pass key at a random depth in repeated filler prose (knob: passkey_digits)."""
    key = str(rng.randint(10 ** (d.passkey_digits - 1), 10 ** d.passkey_digits - 1))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    context, (start,) = _scatter(_filler(units), [(rng.random(), needle)])
    intro = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
             "memorize it. I will quiz you about it afterwards.")
    return _sample("passkey", intro, context, "What is the pass key?", [key], "exact", "The pass key is", d,
                   depth=start / len(context))


def niah(rng: random.Random, units: int, d: Difficulty) -> TaskSample:
    """One asked key among key-value distractor statements (knob: niah_keys)."""
    used = set()  # keys and values, so that only the needle answers the question

    def statement():
        while (key := f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}") in used:
            pass
        digits = rng.choice((6, 7))
        while (value := str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))) in used:
            pass
        used.update((key, value))
        return key, value, f"The special magic number for {key} is: {value}."

    key, value, needle = statement()
    depth = rng.random()
    if d.niah_keys is None:  # the haystack is all statements: `units` distractors
        context, (start,) = _scatter([statement()[2] for _ in range(units)], [(depth, needle)])
    else:  # niah_keys statements at random depths in filler prose
        others = [(rng.random(), statement()[2]) for _ in range(d.niah_keys - 1)]
        context, starts = _scatter(_filler(units), [(depth, needle)] + others)
        start = starts[0]
    intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the numbers afterwards.")
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    prefix = f"The special magic number for {key} mentioned in the provided text is"
    return _sample("niah", intro, context, question, [value], "exact", prefix, d, key=key, depth=start / len(context))


def vt(rng: random.Random, units: int, d: Difficulty) -> TaskSample:
    """Chains of variable assignments among noise sentences; list the asked chain's variables (knobs: vt_hops,
    vt_chains)."""
    names, values, inserts = set(), [], []
    chains = []
    for _ in range(d.vt_chains):
        while (value := str(rng.randint(10000, 99999))) in values:
            pass
        values.append(value)
        chain = []
        while len(chain) < d.vt_hops + 1:
            if (name := "".join(rng.choice(string.ascii_uppercase) for _ in range(5))) not in names:
                names.add(name)
                chain.append(name)
        chains.append(chain)
        lines = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        inserts += zip(sorted(rng.random() for _ in lines), lines)  # sorted: a chain reads in order
    context, starts = _scatter(_filler(units), inserts)
    intro = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    question = f"Find all variables that are assigned the value {values[0]}."
    # RULER's "... are:" makes a 135M model start a new paragraph of filler; ending on "VAR" makes it list names
    prefix = f"Answer: The variables assigned the value {values[0]} are VAR"
    return _sample("vt", intro, context, question, chains[0], "contains_all", prefix, d,
                   max_new=6 * len(chains[0]) + 6, depths=[s / len(context) for s in starts[:d.vt_hops + 1]])


def cwe(rng: random.Random, units: int, d: Difficulty) -> TaskSample:
    """A numbered word list where cwe_words words are frequent and `units` items are rarer words (knobs:
    cwe_words, cwe_rare_max, cwe_ratio)."""
    words = list(WORDS)
    rng.shuffle(words)
    common, rest = words[:d.cwe_words], words[d.cwe_words:]
    rare_max = d.cwe_rare_max
    while True:  # the first rare_max whose counts cover `units` items with the vocabulary at hand
        counts, total = [], 0
        for w in rest:
            if total >= units:
                break
            counts.append((w, min(rng.randint(1, rare_max), units - total)))
            total += counts[-1][1]
        if total >= units:
            break
        rare_max += 1
    each = d.cwe_ratio * rare_max
    items = [w for w in common for _ in range(each)] + [w for w, k in counts for _ in range(k)]
    rng.shuffle(items)
    context = " ".join(f"{i}. {w}" for i, w in enumerate(items, 1))
    intro = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.")
    n = d.cwe_words
    question = "What is the most common word in the above list?" if n == 1 else \
        f"What are the {n} most common words in the above list?"
    prefix = "The most common word in the list is" if n == 1 else f"The {n} most common words in the list are"
    return _sample("cwe", intro, context, question, common, "contains_all", prefix, d,
                   max_new=max(16, 5 * n + 6), common_count=each, rare_max=rare_max, items=len(items))


def story(rng: random.Random, units: int, d: Difficulty) -> TaskSample:
    """Chapters, each with its own town, person and item, padded with story filler; asks where an item was bought
    (knob: story_chapters)."""
    c = d.story_chapters
    towns, people, items = rng.sample(TOWNS, c), rng.sample(PEOPLE, c), rng.sample(ITEMS, c)
    roles = [rng.choice(ROLES) for _ in range(c)]
    asked = rng.randrange(c)
    filler = [rng.choice(STORY_FILLER) for _ in range(units)]
    chapters = []
    for j in range(c):
        head = (f"Chapter {j + 1}. In the town of {towns[j]}, Arion met {people[j]}, who was {roles[j]}. "
                f"Arion bought the {items[j]} from {people[j]}.")
        chapters.append(" ".join([head] + filler[j * units // c:(j + 1) * units // c]))
    context = "\n\n".join(chapters)
    start = sum(len(ch) + 2 for ch in chapters[:asked])
    intro = "Read the following story about the travels of Arion. I will ask you a question about it afterwards."
    item = items[asked]
    return _sample("story", intro, context, f"In which town did Arion buy the {item}?", [towns[asked]], "exact",
                   f"Answer: Arion bought the {item} in the town of", d, item=item, chapter=asked + 1,
                   depth=start / len(context))


TASKS = {"passkey": passkey, "niah": niah, "vt": vt, "cwe": cwe, "story": story}


def _fit(count, length: int, what: str) -> int:
    """A filler size whose token count lies in [0.9, 1.0] of `length`: secant steps inside a shrinking bracket."""
    low, target = 0.9 * length, 0.95 * length
    lo, t_lo = 0, count(0)
    if t_lo > length:
        raise SparsenError(f"length {length} is too short for {what} ({t_lo} tokens with no filler): "
                           "ask a longer length or easier knobs")
    if t_lo >= low:
        return 0
    hi = t_hi = None
    m = 16
    for _ in range(64):
        t = count(m)
        if low <= t <= length:
            return m
        if t < low:
            lo, t_lo = m, t
        else:
            hi, t_hi = m, t
        if hi is not None and hi - lo <= 1:
            break
        if hi is None:
            slope = (t_lo - count(0)) / lo if lo else 0
            m = lo + math.ceil((target - t_lo) / slope) if slope > 0 else 2 * m
        else:
            m = min(hi - 1, max(lo + 1, lo + round((target - t_lo) * (hi - lo) / (t_hi - t_lo))))
    raise SparsenError(f"no filler size puts {what} within 90-100% of {length} tokens: ask a longer length")


def generate_suite(tokenizer, lengths=(1024, 2048, 4096, 8192), n=50, seed=0, tasks=None,
                   difficulty: Difficulty | None = None, **knobs) -> list[TaskSample]:
    """``n`` samples per (task, length), ids like ``niah-1024-007``; prompt tokens plus ``max_new_tokens`` fill 90-100%
    of the length. ``knobs`` override fields of ``difficulty`` (see ``Difficulty``). Same arguments, same samples."""
    known = [f.name for f in fields(Difficulty)]
    if unknown := sorted(set(knobs) - set(known)):
        raise SparsenError(f"unknown difficulty knob(s) {', '.join(unknown)}: use {', '.join(known)}")
    d = replace(difficulty or Difficulty(), **knobs)
    tasks = list(TASKS) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    if bad := [t for t in tasks if t not in TASKS]:
        raise SparsenError(f"unknown task(s) {', '.join(bad)}: use {', '.join(TASKS)}")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in [n, *lengths]):
        raise SparsenError(f"n={n!r}, lengths={tuple(lengths)!r}: use whole numbers >= 1")
    width = max(3, len(str(n - 1)))
    out = []
    for task in tasks:
        knob_meta = {k: v for k, v in asdict(d).items() if k.startswith(task + "_") or k == "question_first"}
        for length in lengths:
            for i in range(n):
                seeded = f"{seed}-{task}-{length}-{i}"
                built: dict[int, tuple[TaskSample, int]] = {}

                def count(units):
                    if units not in built:
                        s = TASKS[task](random.Random(seeded), units, d)
                        built[units] = s, len(prompt_tokens(tokenizer, s)[0])
                    s, tokens = built[units]
                    return tokens + s.max_new_tokens

                sample, tokens = built[_fit(count, length, f"task '{task}'")]
                sample.id = f"{task}-{length}-{i:0{width}d}"
                sample.meta = {"length": length, "tokens": tokens, "knobs": dict(knob_meta), **sample.meta}
                out.append(sample)
    return out
