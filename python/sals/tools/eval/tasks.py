"""RULER-style synthetic tasks (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", 2024), generated offline from a seed.

Tasks (``TASKS``), each scored by the fraction of the expected strings found in the answer
(RULER's ``string_match_all``), times 100:

- ``niah_single``: one 7-digit "special magic number" for a key, hidden in the filler;
- ``niah_multikey``: the same with three distractor needles for other keys;
- ``niah_multivalue``: four numbers for the same key, all asked for;
- ``niah_multiquery``: four needles for four keys, two keys asked for;
- ``vt`` (variable tracking): a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of four hops
  spread through the filler; every variable that holds the value is asked for;
- ``fwe`` (frequent-word extraction): a text of synthetic words drawn from a Zipf
  distribution (no filler); the three most frequent are asked for.

Fillers (``FILLERS``): ``prose`` (natural paragraphs, :func:`sals.hf.corpus.prose_text`, a
seeded starting point) and ``repeat`` (RULER's "The grass is green. The sky is blue. ..."
noise). ``fwe`` ignores the filler.

A prompt is sized to the context: filler is added until the whole prompt (chat template,
question and answer prefix included) reaches the requested number of tokens. Instruct models
(a tokenizer with a chat template) get the text as one user turn and the answer prefix as the
start of the assistant's turn; base models a plain "... Question: ... Answer: prefix".
"""

from __future__ import annotations

import dataclasses
import random

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "fwe")
FILLERS = ("prose", "repeat")

REPEAT_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                 "There and back again.")

#: words for needle keys (RULER draws its keys from a word list the same way)
KEY_WORDS = (
    "amber", "anchor", "apple", "arrow", "autumn", "badge", "bamboo", "banner", "barrel",
    "beacon", "birch", "blossom", "bottle", "breeze", "bridge", "bronze", "bucket", "butter",
    "cabin", "camel", "candle", "canyon", "carbon", "carpet", "castle", "cedar", "cherry",
    "cinder", "circle", "clover", "cobalt", "comet", "copper", "coral", "cotton", "crater",
    "crystal", "dagger", "desert", "dolphin", "dragon", "ember", "falcon", "feather", "fern",
    "fiddle", "forest", "fossil", "garden", "garnet", "glacier", "granite", "harbor", "hazel",
    "helmet", "honey", "island", "ivory", "jacket", "jasmine", "jungle", "kettle", "lantern",
    "lemon", "lilac", "linen", "lizard", "magnet", "maple", "marble", "meadow", "mirror",
    "monkey", "mosaic", "needle", "nickel", "oasis", "olive", "orchid", "otter", "paddle",
    "pepper", "pebble", "pencil", "pillow", "pirate", "planet", "pocket", "quartz", "rabbit",
    "raven", "ribbon", "river", "rocket", "saddle", "salmon", "silver", "spider", "spruce",
    "summit", "tiger", "timber", "topaz", "tunnel", "velvet", "violet", "walnut", "willow",
    "window", "winter", "yellow", "zephyr",
)

ANSWER_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48,
                 "niah_multiquery": 32, "vt": 32, "fwe": 24}


@dataclasses.dataclass
class Prompt:
    """One generated prompt: ``input_ids`` ``[1, n]``, the strings the answer must contain,
    and how many tokens to generate."""

    task: str
    filler: str
    context: int
    seed: int
    input_ids: object          # torch.LongTensor [1, n]
    answers: list[str]
    max_new_tokens: int

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def score(text: str, answers: list[str]) -> float:
    """RULER's string_match_all: 100 * the fraction of ``answers`` in ``text`` (case-blind)."""
    low = text.lower()
    return 100.0 * sum(a.lower() in low for a in answers) / len(answers)


class _Filler:
    """Sentences to fill a haystack with, and their token counts."""

    def __init__(self, tokenizer, kind: str, prose: str | None):
        if kind == "repeat":
            units = [s.strip() + "." for s in REPEAT_FILLER.split(".") if s.strip()]
        elif kind == "prose":
            import re

            units = [u.strip() for u in re.split(r"(?<=[.!?])\s+", prose or "") if
                     len(u.strip()) > 3]
        else:
            raise ValueError(kind)
        self.kind = kind
        self.units = units
        counts = tokenizer([" " + u for u in units], add_special_tokens=False)["input_ids"]
        self.counts = [len(c) for c in counts]

    def take(self, n_tokens: int, rng: random.Random) -> list[tuple[str, int]]:
        """Consecutive (sentence, tokens) pairs (from a seeded start for prose) holding about
        n_tokens."""
        start = 0 if self.kind == "repeat" else rng.randrange(len(self.units))
        out, total, i = [], 0, start
        while total < n_tokens:
            out.append((self.units[i % len(self.units)], self.counts[i % len(self.units)]))
            total += self.counts[i % len(self.units)]
            i += 1
        return out


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _keys(rng: random.Random, n: int) -> list[str]:
    words = rng.sample(KEY_WORDS, 2 * n)
    return [f"{words[2 * i]}-{words[2 * i + 1]}" for i in range(n)]


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _var(rng: random.Random, n: int) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names = set()
    while len(names) < n:
        names.add("".join(rng.choice(letters) for _ in range(5)))
    return sorted(names, key=lambda _: rng.random())


def _content(task: str, rng: random.Random):
    """(needles, question, answer prefix, answers) of a haystack task."""
    if task == "niah_single":
        key, value = _keys(rng, 1)[0], _number(rng)
        return ([_needle(key, value)],
                f"What is the special magic number for {key} mentioned in the provided text?",
                f"The special magic number for {key} mentioned in the provided text is", [value])
    if task == "niah_multikey":
        keys = _keys(rng, 4)
        values = [_number(rng) for _ in keys]
        return ([_needle(k, v) for k, v in zip(keys, values)],
                (f"What is the special magic number for {keys[0]} mentioned in the provided "
                f"text?"),
                f"The special magic number for {keys[0]} mentioned in the provided text is",
                [values[0]])
    if task == "niah_multivalue":
        key = _keys(rng, 1)[0]
        values = [_number(rng) for _ in range(4)]
        return ([_needle(key, v) for v in values],
                (f"What are all the special magic numbers for {key} mentioned in the provided "
                f"text?"),
                f"The special magic numbers for {key} mentioned in the provided text are",
                values)
    if task == "niah_multiquery":
        keys = _keys(rng, 4)
        values = [_number(rng) for _ in keys]
        asked = [0, 2]
        names = " and ".join(keys[i] for i in asked)
        return ([_needle(k, v) for k, v in zip(keys, values)],
                (f"What are the special magic numbers for {names} mentioned in the provided "
                f"text?"),
                f"The special magic numbers for {names} mentioned in the provided text are",
                [values[i] for i in asked])
    if task == "vt":
        names = _var(rng, 5)
        value = str(rng.randrange(10000, 100000))
        chain = [f"VAR {names[0]} = {value}."]
        chain += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        return (chain,
                f"Find all variables that are assigned the value {value} in the text above.",
                (f"Answer: According to the chain(s) of variable assignment in the text above, "
                f"{len(names)} variables are assigned the value {value}, they are:"), names)
    raise ValueError(task)


def _fwe_words(rng: random.Random, n_tokens: int, tokenizer) -> tuple[str, list[str]]:
    """RULER's frequent-word extraction: synthetic words with Zipf(alpha=2) frequencies."""
    vocab = set()
    while len(vocab) < 400:
        vocab.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)))
    vocab = sorted(vocab)
    rng.shuffle(vocab)
    per_word = len(tokenizer(" " + " ".join(vocab[:50]), add_special_tokens=False)["input_ids"])
    n = max(30, int(n_tokens * 50 / per_word))
    weights = [1.0 / (i + 1) ** 2 for i in range(len(vocab))]
    words = rng.choices(vocab, weights=weights, k=n)
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: (-counts[w], w))[:3]
    return " ".join(words), top


def _render(tokenizer, body: str, question: str, prefix: str):
    """input_ids [1, n] of the whole prompt."""
    import torch

    if getattr(tokenizer, "chat_template", None) is not None:
        messages = [{"role": "user", "content": body + "\n\n" + question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text + prefix, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(f"{body}\n\nQuestion: {question}\nAnswer: {prefix}")["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


_INSTRUCTION = {
    "niah": ("Some special magic numbers are hidden within the following text. Make sure to "
             "memorize them. I will quiz you about the numbers afterwards."),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following "
           "text."),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find "
            "the three most frequently appeared coded words."),
}


class TaskSet:
    """Generates prompts for one tokenizer; fillers are tokenised once."""

    def __init__(self, tokenizer, prose: str | None = None):
        self.tokenizer = tokenizer
        self._prose = prose
        self._fillers: dict[str, _Filler] = {}

    def _filler(self, kind: str) -> _Filler:
        if kind not in self._fillers:
            if kind == "prose" and self._prose is None:
                from ...hf.corpus import prose_text

                self._prose = prose_text()[0]
            self._fillers[kind] = _Filler(self.tokenizer, kind, self._prose)
        return self._fillers[kind]

    def prompt(self, task: str, filler: str, context: int, seed: int) -> Prompt:
        """One prompt of about ``context`` tokens (never more)."""
        if task not in TASKS:
            raise ValueError(f"task: unknown task {task!r}; expected one of {TASKS}")
        if filler not in FILLERS:
            raise ValueError(f"filler: unknown filler {filler!r}; expected one of {FILLERS}")
        rng = random.Random(f"{task}/{filler}/{context}/{seed}")
        if task == "fwe":
            target = context
            for _ in range(4):  # shrink until the whole prompt fits
                rng_words = random.Random(f"{task}/{context}/{seed}")
                text, top = _fwe_words(rng_words, target, self.tokenizer)
                body = _INSTRUCTION["fwe"] + "\n\n" + text
                ids = _render(self.tokenizer, body,
                              "What are the three most frequently appeared words in the above "
                              "coded text?",
                              "Answer: According to the coded text above, the three most "
                              "frequently appeared words are:")
                if ids.shape[1] <= context:
                    break
                target -= ids.shape[1] - context + 16
            return Prompt(task, "none", context, seed, ids, top,
                          ANSWER_TOKENS[task])
        needles, question, prefix, answers = _content(task, rng)
        instruction = _INSTRUCTION["vt" if task == "vt" else "niah"]
        overhead = _render(self.tokenizer, instruction + "\n\n" + " ".join(needles), question,
                           prefix).shape[1]
        units = self._filler(filler).take(max(0, context - overhead), rng)
        if task != "vt":  # the variable chain stays in order
            rng.shuffle(needles)
        while True:
            places = sorted(rng.randrange(len(units) + 1) for _ in needles)
            parts = [u for u, _ in units]
            for offset, (place, needle) in enumerate(zip(places, needles)):
                parts.insert(place + offset, needle)
            ids = _render(self.tokenizer, instruction + "\n\n" + " ".join(parts), question, prefix)
            if ids.shape[1] <= context or not units:
                break
            excess = ids.shape[1] - context
            while units and excess > 0:  # drop sentences from the end worth the excess
                excess -= units.pop()[1]
        return Prompt(task, filler, context, seed, ids, answers, ANSWER_TOKENS[task])
