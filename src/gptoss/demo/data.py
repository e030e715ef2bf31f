"""Synthetic Harmony conversations that teach the demo model its three skills.

    python -m gptoss.demo.data --out DIR --seed 0 --n 60000      # DIR/train.jsonl (+ DIR/vocab.json)

1. Arithmetic worked by hand, step by step in `analysis`, the answer in `final`. Scope (what a ~1M-parameter
   model trained for an hour on 2 CPU cores can honestly get right): addition and subtraction of whole
   numbers of up to 4 digits (negative results included), and multiplication of a number of up to 4 digits
   by a 1-digit number. o200k writes digit runs in chunks of up to 3 digits ("4821" → "482", "1"), so the
   work first spells the numbers out one digit per token, right-aligned, then goes column by column from
   the right with one fixed-format line per column (`8+9+0=17`: digit, digit, incoming carry, total — every
   number below 100 is one token), then spells the answer's digits before writing it. The reasoning effort
   in the system message sets how much is written: low keeps only the column lines, high names every column.
2. Function tools: when the developer message declares `calculator`, every arithmetic question (of any
   size, division included) is answered by a call `{"expression": "A op B"}` in `commentary`, then the
   answer quotes the tool's result; `convert_units` gets `{"value": V, "from": U, "to": U}`.
3. Everything else gets a short "I don't know" that says what the model can do: general questions,
   arithmetic beyond the scope above when no calculator is declared, conversions without the tool.

Two versions, chosen by `data_version` in the recipe TOML (version 1 draws exactly the random numbers it always
did, so the shipped model stays reproducible): version 1 is the shipped model's data; version 2 (issue 23)
phrases the questions from the training family of gptoss.demo.phrasing (the held-out family is never used for
training), puts filler words outside the vocabulary around 30 % of the questions with numbers, restates the
operands in the analysis at every effort, writes each subtraction column's borrow decision before the column
(`2-1<6, 12-6-1=5`), and draws carry/borrow-heavy 4-digit pairs for 30 % of additions and subtractions.
Version 3 is version 2 with one change: the analysis of every question that states numbers begins by restating
the request in one canonical line (`5622 - 2769`, `71 * 3885`, `9 / 980`, `5 km to mi`: digits without
separators, the operator as an ASCII symbol, the question's order), and only then decides what to do (work it,
call a tool, or decline). In version 2 the first analysis token already decided (`Use`, `This`, `Not` or a
digit), before the model had copied anything, and on phrasings it had not seen it declined a third of the
questions it could answer (experiments/demo/RESULTS.md, run 3); with the restated line first, the decision can
rest on the numbers and the operator, the same whatever the frame around them. Version 4 adds one kind to
version 3, "json" (issue 21: structured outputs): an in-scope arithmetic question whose developer message
declares a response format (Harmony's "# Response Formats": a JSON schema with an integer field for the result,
names and fields varied), worked in the analysis as usual, answered in `final` as that JSON object.
Version 5 is version 4 with noise words (run 4 read the operator wrong and answered general questions with
arithmetic as soon as the words around a question were new): 35 % of training questions get runs of common
o200k words around them (gptoss.demo.phrasing.noise_words, none a word of any held-out question), half in the
vocabulary and half outside it; 40 % of the general questions are training frames with words for operands
(`What is tree plus void?`: no numbers, so refused); and general questions weigh 15 instead of 10.
Version 6 is version 5 with three changes, each aimed at one set of run 5's held-out misses: 35 % of numbers
≥ 1000 carry thousands separators (10 % before), and the analysis copies such a request as typed and spells each
separated number before restating it without separators (`restated`; run 5 got 4 of 56 such questions right);
the training family uses Title Case as well (gptoss.demo.phrasing.TRAIN_V6), whose words are other o200k tokens
(run 5: 75 % of Title Case questions right, 92 % of the rest); and JSON answers write "×" as itself, not as the
escape `\u00d7` (run 5: 27 of 52 JSON multiplications with an expression field right).
Version 7 is version 6 with two changes aimed at run 6's held-out misses: every subtraction first compares its
operands in the open (`compare`: the digit counts, or the digits from the left up to the first that differs),
so that the sign of the result rests on a checkable line (run 6 wrote `548 - 743 = 205` and `93 - 94 = 19`,
never noticing a < b when both have as many digits); and the training family knows the inflected operator words
a held-out question can use (gptoss.demo.phrasing.TRAIN_V7: "subtracted from", "multiplied with"), which run 6
read as the unknown token (`subtracted` is ` sub` + `tracted`): it answered 10 of the 12 held-out "b subtracted
from a" questions in its eval with an addition or a multiplication. Run 7 (trained on it) fixed both and was not
shipped: it lost the held-out spacing `a +b` (experiments/demo/RESULTS.md).
Version 8 is version 7 with one change: 15 % of training questions type their operands in brackets or quotes
(`779 + (55)`, `[9,228]-[4615]`, gptoss.demo.phrasing.TRAIN_V8), the analysis restating them plain. o200k never
joins a space to digits, so in version 7 the second operand's digits only ever followed ` `, a bare operator or a
comma; the held-out `779 +55` puts them right after ` +`, which run 7 misread. No held-out question types a
number in brackets or quotes.
Version 9 is version 8 with one change: the comparison before a subtraction writes both digits (or both digit
counts) before their sign, `from the left 6 vs 2: 6>2`, and the numbers' relation last (`compare`). Version 7's
`6<2` decided the sign before the second digit was written; run 7 did so wrongly in several held-out questions
(`from the left 6<2, so 621 < 201`, then -580).
Version 10 is version 9 with follow-up questions about the previous answer (`followup_example`, 8 % of the
conversations: `Add 5 to that.` after `1234 - 987 = 247`); the analysis names the previous answer first. Until
now every question stated all its numbers, and the shipped model answered `now add 5 to that` with `5 + 5 = 10`.
The same questions with no answer to refer to (the first message, or after a declined question or a greeting) are
declined (`NO_EARLIER`, 1.6 %).
Version 11 is version 10 with its follow-ups read more widely (gptoss.demo.phrasing.TRAIN_V11): training frames
of its own with "the answer" and "then" (run 10: 24 of 56 held-out follow-ups with those words right, 99 of 114
of the rest), suffixes with an "it" or "that" that refers to nothing (run 10 declined 8 single questions ending
"I Need It For Homework." as follow-ups), and twice as many follow-ups with nothing to refer to (3.2 %; run 10
declined 73 % of the held-out ones). And its recipe trains only the current turn (`to_document`'s
current_turn_only): earlier turns' answers, which end with <|end|> in the history, had taught final answers
that end with <|end|> (run 10: 12 of 1700 held-out answers, every one a reply of a kind earlier turns hold).
Version 12 is version 11 with longer conversations: 30 % have 1 to 4 earlier turns (`earlier_turns`: arithmetic,
general questions, greetings, declined out-of-scope questions), where until now 10 % had one; a follow-up may
have turns before the one it refers to. Run 11 got 231 of 240 held-out questions right after one earlier turn
and 146 of 160 after three (experiments/demo/long_history.py), and garbled a subtraction after a declined question.
Version 13 is version 11 (not 12: run 12 did worse than run 11) with results that start with zeros restated
without them before the answer (`digits: 0 0 7 6`, `without leading zeros: 7 6`, `so 4050 - 3974 = 76`), and a
fifth of training subtractions drawn as close pairs (`close_pair`: the result shorter than the first number).
Half of run 11's held-out arithmetic misses were such results written wrong (0 6 9 1 -> 619, 0 0 7 6 -> 756).
Version 14 is version 13 with more follow-ups, read more widely: 16 in the weight table where 10 were (12 % of
conversations), twice as many whose previous answer is the second operand (`sub_from`: `1234 minus that`), and
training frames of its own in new sentence shapes (gptoss.demo.phrasing.TRAIN_V14). Three draws of version-11-like
data gave 153, 129 and 108 of 170 held-out follow-ups right, and `what is {n} minus that` was missed 15, 17 and 26
times of 26 (the previous answer copied wrong into the second operand).
Version 15 is version 14's training frames with version 13's shares (`more_followups`): runs 16 and 17 on
version 14 missed `{n} minus that` less (7 and 12 of 26) but copied the operands of held-out arithmetic wrong
far more often (467 and 485 of 510 right, against 498 to 504 for three draws of versions 11 and 13).
Version 17 asks version 11's questions (the same conversations for the same seed) and words its fixed replies and
the thoughts before them anew (`REPLIES_V17`, `SHORT_THOUGHTS_V17`): without the held-out family's words that
no training question has and no in-scope answer uses (" up", " there", " Give", " have", " turn", " which").
The model had only ever written them, in one kind of reply each, so a held-out question containing one read as
a cue for that reply (`add up 9398 and 4883` declined, `Hi there,` answered "there is no earlier answer").
Runs 24 and 25 on version 17 did worse than their version-11 twins (all held-out items 2636 -> 2560 and
2611 -> 2524, dangling follow-ups declined less often, in-scope declines not fewer): not used since.
Version 18 draws version 11's numbers, kinds and reasoning with training frames of its own that put a comma right
after the first operand (`Take 5,427, subtract 2829.`: gptoss.demo.phrasing.TRAIN_V18), in words version 11's
data has, so that a model trained on version 11 can continue on it (`[demo] init_from`).
Version 19 is version 18 with version 16's frames that begin with "From" and "Product" (words version 11's
vocabulary lacks: a model trained on version 11 continues on it with its vocabulary grown).
Version 20 is version 19 without the comma frames that say "then" or "it" (`Take {a}, then times {b}`), which
read like a follow-up on an earlier answer.
Version 21 asks version 11's questions with training frames of its own in the shapes where run 29's lineage
declines held-out in-scope questions: "with" between the operands, "Result"/"Answer" beginning a self-contained
question, follow-ups that put the earlier answer second in a question frame (gptoss.demo.phrasing.TRAIN_V21).
Version 22 is version 21 with version 20's frames (a comma after the first operand; "From", "Product" first).
Version 23 is version 22 with a short word or "So ..." right before the expression (`Ok {e}`, `So what's {e}?`)
and follow-up frames in the shapes run 43 still misread (`Now minus {n}.`, `Then subtract it from {n}.`).

A conversation is a list of message dicts {role, content, channel?, recipient?, content_type?} (the
format `gptoss.train` reads from JSONL `messages`); `to_document` renders one for training, keeping the
current turn's analysis (the reasoning the model must learn to write) and flagging only assistant tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import harmony
from ..tokenizer import Tokenizer, get_tokenizer
from .phrasing import HELDOUT as HELDOUT_PHRASING
from .phrasing import TRAIN as TRAIN_PHRASING
from .phrasing import (NUMBER, OPERATORS, compose, followup, noise_words, phrase, question_version, training_family,
                       with_noise)

EFFORTS = ("low", "medium", "high")
MAX_DIGITS = 4  # by hand: + and − up to 4 digits, × by one digit
PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands")

CALCULATOR_DEF = {"name": "calculator", "description": "Evaluate an arithmetic expression and return the exact result.",
                  "parameters": {"type": "object", "properties": {"expression": {
                      "type": "string", "description": "e.g. 1234 * 5678 or sqrt(2) + 1"}}, "required": ["expression"]}}
CONVERT_DEF = {"name": "convert_units", "description": "Convert a value between units of length, mass, volume or temperature.",
               "parameters": {"type": "object", "properties": {
                   "value": {"type": "number"},
                   "from": {"type": "string", "description": "unit symbol: km, mi, m, ft, cm, in, kg, lb, l, gal, C, F"},
                   "to": {"type": "string", "description": "unit symbol"}}, "required": ["value", "from", "to"]}}
TOOL_DEFS = {"calculator": CALCULATOR_DEF, "convert_units": CONVERT_DEF}

SKILLS_LINE = ("I can add and subtract whole numbers of up to 4 digits, multiply them by a 1-digit number, "
               "and use the tools I am given.")
DONT_KNOW = "I don't know. " + SKILLS_LINE
TOO_BIG = ("I can't work that out reliably by hand: " + SKILLS_LINE[2:].replace(", and use the tools I am given", "")
           + " Give me a calculator tool and I will use it.")
TOO_BIG_V2 = ("I can't work that out reliably by hand: " + SKILLS_LINE.replace(", and use the tools I am given", "")
              + " Give me a calculator tool and I will use it.")  # version 1's text lost its "I"
NO_CONVERTER = "I don't know: I have no unit converter tool. " + SKILLS_LINE
GREETING = "Hello! I am a tiny GPT-oss demo model. " + SKILLS_LINE
NO_EARLIER = "I don't know which number you mean: there is no earlier answer to work on. " + SKILLS_LINE
# The fixed final answers by data version: declines, the greeting, the no-earlier-answer reply.
REPLIES_V2 = {"dont_know": DONT_KNOW, "too_big": TOO_BIG_V2, "no_converter": NO_CONVERTER, "greeting": GREETING,
              "no_earlier": NO_EARLIER}
REPLIES_V1 = {**REPLIES_V2, "too_big": TOO_BIG}
# Version 17 (module docstring): the same replies without the held-out questions' words that no training question
# uses (` up`, ` there`, ...); runs 24 and 25 on it did worse (experiments/demo/RESULTS.md).
SKILLS_LINE_V17 = ("I can add and subtract whole numbers with at most 4 digits, multiply them by a 1-digit number, "
                   "and use the tools I am given.")
REPLIES_V17 = {
    "dont_know": "I don't know. " + SKILLS_LINE_V17,
    "too_big": ("I can't work that out reliably by hand: "
                + SKILLS_LINE_V17.replace(", and use the tools I am given", "")
                + " Declare a calculator tool and I will use it."),
    "no_converter": "I don't know: no unit converter tool is declared. " + SKILLS_LINE_V17,
    "greeting": "Hello! I am a tiny GPT-oss demo. " + SKILLS_LINE_V17,
    "no_earlier": "I don't know what number you mean: this conversation has no earlier answer. " + SKILLS_LINE_V17,
}


def replies(version: int) -> dict[str, str]:
    """The fixed final answers of data `version`: declines, the greeting, the no-earlier-answer reply."""
    return REPLIES_V17 if version == 17 else REPLIES_V1 if version == 1 else REPLIES_V2


@dataclass
class Example:
    """One conversation and what a correct model does with it (for the held-out evaluation)."""
    kind: str  # add | sub | mul | calc | convert | general | too_big | no_converter | greeting | json | followup
    effort: str
    tools: tuple[str, ...]
    question: str
    messages: list[dict[str, Any]]  # the whole conversation, system message first
    answer: str | None = None  # the expected final answer (a number as text) for arithmetic and tools
    call: dict[str, Any] | None = None  # {"name", "arguments"} expected for tool examples
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier turns kept in the prompt (no analysis)
    free: bool = False  # the question carries filler words that stay outside the vocabulary
    free_history: tuple[str, ...] = ()  # earlier turns' questions that are free text (kept out likewise)

    def prompt_messages(self) -> list[dict[str, Any]]:
        """system, developer, earlier turns, the user's question: what the model is given."""
        head = [m for m in self.messages if m["role"] in ("system", "developer")]
        return head + self.history + [{"role": "user", "content": self.question}]


# ---------------------------------------------------------------- the hand-worked arithmetic
def digits(n: int, width: int) -> list[int]:
    """Digits of n, most significant first, zero-padded to width."""
    return [int(c) for c in str(n).zfill(width)]


def spaced(ds: list[int]) -> str:
    return " ".join(map(str, ds))


def _carried_columns(columns: list[tuple[int, str]], effort: str) -> tuple[list[str], list[int]]:
    """Columns from the right, each (its sum before the carry, the text of that sum): one worked line per
    column with the carry added, the result digits (ones first), and a final carry digit if any."""
    lines, out, carry = [], [], 0
    for k, (value, text) in enumerate(columns):
        t = value + carry
        col = f"{text}+{carry}={t}"
        lines.append(f"{PLACES[k]}: {col}, write {t % 10}, carry {t // 10}" if effort == "high" else col)
        out.append(t % 10)
        carry = t // 10
    if carry:
        out.append(carry)
        if effort == "high":
            lines.append(f"{PLACES[len(columns)]}: write the carry {carry}")
    return lines, out


def work_add(a: int, b: int, effort: str, version: int = 1) -> tuple[str, int]:
    w = max(len(str(a)), len(str(b)))
    da, db = digits(a, w), digits(b, w)
    lines, out = _carried_columns([(x + y, f"{x}+{y}") for x, y in zip(da[::-1], db[::-1])], effort)
    return _assemble(f"{a} + {b}", da, db, lines, out[::-1], a + b, effort, "Add", version), a + b


def _sub_column(x: int, y: int, borrow: int, effort: str, k: int, version: int) -> tuple[str, int, int]:
    """One column of a − b: (its line, the digit written, the borrow it takes from the next column)."""
    need = x - borrow < y  # borrow ten from the next column
    top = x + 10 if need else x
    d = top - y - borrow
    col = f"{top}-{y}-{borrow}={d}"
    if version >= 2:  # the borrow decided in the open before the column is worked: x − borrow against y
        col = f"{x}-{borrow}{'<' if need else '>='}{y}, {col}"
    return (f"{PLACES[k]}: {col}, borrow {int(need)}" if effort == "high" else col), d, int(need)


def _sign(x, y) -> str:
    return "<" if x < y else ">" if x > y else "="


def _leading_digits(a: str, b: str) -> list[tuple[str, str]]:
    """The digit pairs of two equally long numbers from the left, up to and including the first that differs."""
    out = []
    for x, y in zip(a, b):
        out.append((x, y))
        if x != y:
            break
    return out


def compare(a: int, b: int, effort: str, version: int = 7) -> str:
    """Version 7: which of two whole numbers is larger, decided in the open: by their digit counts, or, with as
    many digits, digit by digit from the left up to the first that differs (`2=2, 1>0`).

    Version 9 writes both sides of every comparison before its sign (`6 vs 2: 6>2`, `3 digits vs 1 digit: 3>1`),
    and the relation of the numbers last: version 7's `6<2` puts the sign right after the first digit, so it is
    decided before the second is written, from a digit inside a multi-digit token of the question (run 7 wrote
    `from the left 6<2, so 621 < 201` and then answered -580)."""
    rel = _sign(a, b)
    la, lb = len(str(a)), len(str(b))
    leading = [] if la != lb else _leading_digits(str(a), str(b))
    if version >= 9:
        if la != lb:
            why = f"{la} digit{'s' * (la > 1)} vs {lb} digit{'s' * (lb > 1)}: {la}{rel}{lb}"
        else:
            why = "from the left " + "; ".join(f"{x} vs {y}: {x}{_sign(x, y)}{y}" for x, y in leading)
        if effort == "low":
            return f"{a} vs {b}: {why}, so {a}{rel}{b}"
        return f"Compare {a} and {b}: {why}, so {a} {rel} {b}."
    if la != lb:
        why = f"{la} digits {_sign(la, lb)} {lb} digits"
    else:
        why = ", ".join(f"{x}{_sign(x, y)}{y}" for x, y in leading)
    if effort == "low":
        return f"{a}{rel}{b} ({why})"
    if la != lb:
        return f"Compare {a} and {b}: {why}, so {a} {rel} {b}."
    return f"Compare {a} and {b}: from the left {why}, so {a} {rel} {b}."


def work_sub(a: int, b: int, effort: str, version: int = 1) -> tuple[str, int]:
    text, r = _columns_sub(a, b, effort, version)
    if version >= 7:  # the sign decided on a checkable line first, then the column work
        text = f"{compare(a, b, effort, version)}\n{text}"
    return text, r


def _columns_sub(a: int, b: int, effort: str, version: int) -> tuple[str, int]:
    if a < b:  # a − b = −(b − a)
        text, r = _columns_sub(b, a, effort, version)
        lead = {"low": f"{a}<{b}, negate {b}-{a}",
                "medium": f"{a} is less than {b}, so compute {b} - {a} and negate it.",
                "high": f"{a} is smaller than {b}, so the result is negative: compute {b} - {a} and negate it."}[effort]
        return f"{lead}\n{text}\nso {a} - {b} = {-r}", -r
    w = len(str(a))
    da, db = digits(a, w), digits(b, w)
    lines, out, borrow = [], [], 0
    for k in range(w):
        line, d, borrow = _sub_column(da[w - 1 - k], db[w - 1 - k], borrow, effort, k, version)
        lines.append(line)
        out.append(d)
    return _assemble(f"{a} - {b}", da, db, lines, out[::-1], a - b, effort, "Subtract", version), a - b


def work_mul(a: int, m: int, effort: str, version: int = 1) -> tuple[str, int]:
    """a (up to 4 digits) × m (one digit)."""
    da = digits(a, len(str(a)))
    lines, out = _carried_columns([(x * m, f"{x}*{m}={x * m}") for x in da[::-1]], effort)
    return _assemble(f"{a} * {m}", da, [m], lines, out[::-1], a * m, effort, "Multiply", version), a * m


def _assemble(problem: str, da: list[int], db: list[int], lines: list[str], out: list[int], result: int,
              effort: str, verb: str, version: int = 1) -> str:
    # version 13: a result with leading zeros (4050 - 3974: digits 0 0 7 6) is restated without them before the
    # answer; run 11 wrote such results wrong (0 0 7 6 -> 756, 0 6 9 1 -> 619, 0 2 8 5 -> 258)
    unpadded = []
    if question_version(version) >= 13 and len(out) > 1 and out[0] == 0:
        kept = out[next((i for i, d in enumerate(out) if d), len(out) - 1):]
        unpadded = [spaced(kept) if effort == "low" else f"without leading zeros: {spaced(kept)}"]
    if effort == "low":
        # version 2 restates the operands at every effort, so that copying them is checkable
        head = [problem, spaced(da), spaced(db)] if version >= 2 else []
        return "\n".join([*head, *lines, spaced(out), *unpadded])
    head = [f"{problem}, column by column from the right.", spaced(da), spaced(db)]
    if effort == "high":
        head = [f"We need {problem}. {verb} column by column from the right. The digits, aligned:", spaced(da),
                spaced(db)]
    return "\n".join([*head, *lines, f"digits: {spaced(out)}", *unpadded, f"so {problem} = {result}"])


def hard_pair(rng: random.Random, kind: str) -> tuple[int, int]:
    """Two 4-digit numbers whose columns mostly carry (add) or borrow (sub, a ≥ b): the cases that slip."""
    while True:
        da, db = [rng.randint(1, 9)], [rng.randint(0, 9)]
        for _ in range(3):
            x = rng.randint(0, 9)
            if kind == "add":  # x + y ≥ 9: a carry, or a 9 that passes an incoming carry on
                y = rng.randint(max(0, 9 - x), 9) if rng.random() < 0.75 else rng.randint(0, 9)
            else:  # y > x: a borrow (x = 0 under an incoming borrow as well)
                y = rng.randint(min(x + 1, 9), 9) if rng.random() < 0.75 else rng.randint(0, 9)
            da.append(x)
            db.append(y)
        a, b = int("".join(map(str, da))), int("".join(map(str, db)))
        if kind == "add" or a >= b:
            return a, b


CLOSE_SUB_P_V13 = 0.2  # version 13: the share of training subtractions whose result is shorter than a


def close_pair(rng: random.Random) -> tuple[int, int]:
    """Version 13: a − b ≥ 0 with fewer digits than a (1694 − 1003 = 691: digits 0 6 9 1), the result's length
    uniform below a's. In version 11's data about 10 % of subtractions have one leading zero and 0.5 % two or
    more; run 11 missed 4050 − 3974 = 76 and 1694 − 1003 = 691 among 8 held-out misses."""
    while True:
        a = number(rng)
        w = len(str(a))
        if w < 2:
            continue
        k = rng.randint(1, w - 1)
        b = a - rng.randint(0 if k == 1 else 10 ** (k - 1), 10 ** k - 1)
        if b >= 0:
            return a, b


# ---------------------------------------------------------------- question text
OPS = {"add": (["+", "+", "+", "plus"], "+"), "sub": (["-", "-", "-", "minus"], "-"),
       "mul": (["*", "×", "x", "times", "multiplied by"], "×")}
TEMPLATES = ["What is {a} {op} {b}?", "{a} {op} {b}", "{a}{op}{b}", "{a} {op} {b} = ?", "Compute {a} {op} {b}.",
             "what is {a} {op} {b}", "Calculate {a} {op} {b}", "How much is {a} {op} {b}?", "What's {a} {op} {b}?",
             "Please work out {a} {op} {b}.", "{a} {op} {b}?", "Can you compute {a} {op} {b}?"]
WORD_TEMPLATES = {"add": ["Add {a} and {b}.", "What is the sum of {a} and {b}?"],
                  "sub": ["Subtract {b} from {a}.", "What is {a} take away {b}?"],
                  "mul": ["Multiply {a} by {b}.", "What is the product of {a} and {b}?"]}


SEPARATORS_V6 = 0.35  # version 6: the share of training numbers ≥ 1000 typed with thousands separators (was 0.1)


def question(rng: random.Random, kind: str, a: int, b: int, phrasing: str | None = None, version: int = 1) -> str:
    """The question for a OP b. phrasing None: version 1's templates (the shipped model's data); "train" or
    "heldout": that family of gptoss.demo.phrasing (the training family as data `version` phrases it)."""
    if phrasing == "train" and version >= 6:
        return phrase(rng, training_family(version), kind, a, b, separators=SEPARATORS_V6)
    if phrasing is not None:
        return phrase(rng, phrasing, kind, a, b)
    if rng.random() < 0.15:
        return rng.choice(WORD_TEMPLATES[kind]).format(a=a, b=b)
    op = rng.choice(OPS[kind][0])
    t = rng.choice(TEMPLATES)
    if op.isalpha() or " " in op:
        t = t.replace("{a}{op}{b}", "{a} {op} {b}")
    return t.format(a=a, op=op, b=b)


def number(rng: random.Random, max_digits: int = MAX_DIGITS) -> int:
    """Uniform number of digits, then a uniform number of that many digits (small numbers are not rare)."""
    n = rng.randint(1, max_digits)
    return rng.randint(0 if n == 1 else 10 ** (n - 1), 10 ** n - 1)


# ---------------------------------------------------------------- general questions (refused)
SUBJECTS = ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Peru", "Egypt", "India", "Italy", "Spain",
            "Chile", "Ghana", "Poland", "Mexico", "Vietnam", "Turkey", "Iceland", "Nepal", "Morocco"]
THINGS = ["the moon", "cats", "the ocean", "music", "a robot", "autumn", "coffee", "the city", "friendship",
          "mountains", "rain", "a lighthouse", "old books", "trains", "the stars", "a garden", "winter", "bread",
          "bicycles", "dragons", "the internet", "chess", "volcanoes", "honey bees", "jazz"]
GENERAL = ["What is the capital of {s}?", "Who is the president of {s}?", "Write a poem about {t}.",
           "Tell me a joke about {t}.", "What is the weather like in {s} today?", "Translate 'good morning' into the language of {s}.",
           "How do I cook rice?", "Explain quantum physics.", "Who won the world cup?", "What is the meaning of life?",
           "Tell me a story about {t}.", "What should I eat for dinner?", "Summarize the history of {s}.",
           "Why is the sky blue?", "Describe {t} in three words.", "What time is it?", "Recommend a good movie.",
           "How far is {s} from here?", "Is {t} dangerous?", "What language do people speak in {s}?",
           "Who invented {t}?", "Can you help me write an email?", "What is the population of {s}?",
           "Give me a recipe with {t}.", "What is {t}?", "Why do people like {t}?", "hello world in python",
           "What is the square root of {t}?", "Spell {t} backwards.", "What rhymes with {t}?"]
# Held-out general questions use other templates and subjects: their training versions are few enough to be
# all seen in training, and the point is how the model treats questions it has never seen.
HELDOUT_SUBJECTS = ["Germany", "Australia", "Argentina", "Sweden", "Thailand", "Portugal", "Cuba", "Finland"]
HELDOUT_THINGS = ["penguins", "the desert", "a castle", "summer rain", "pirates", "the piano", "tea", "glaciers"]
HELDOUT_GENERAL = ["Where is {s} on the map?", "Write a song about {t}.", "What do you think about {t}?",
                   "Which sports are popular in {s}?", "Draw me {t}.", "Who was the first king of {s}?",
                   "What is the best way to learn about {t}?", "Compare {s} and {t}.", "What color is {t}?",
                   "How old is the oldest city in {s}?"]
GREETINGS = ["Hello", "Hi", "hi!", "Hello!", "Hey", "Who are you?", "What can you do?", "Good morning", "help",
             "What are you?"]


# ---------------------------------------------------------------- tools
# convert_units: symbol → (words a user may write, factor to the base unit or None for temperatures)
UNITS = {"km": (["km", "kilometers", "kilometres"], 1000.0), "mi": (["mi", "miles"], 1609.344),
         "m": (["m", "meters", "metres"], 1.0), "ft": (["ft", "feet"], 0.3048), "cm": (["cm", "centimeters"], 0.01),
         "in": (["in", "inches"], 0.0254), "kg": (["kg", "kilograms"], 1.0), "lb": (["lb", "pounds"], 0.45359237),
         "l": (["l", "liters", "litres"], 1.0), "gal": (["gal", "gallons"], 3.785411784),
         "C": (["C", "°C", "Celsius", "degrees Celsius"], None), "F": (["F", "°F", "Fahrenheit", "degrees Fahrenheit"], None)}
PAIRS = [("km", "mi"), ("mi", "km"), ("m", "ft"), ("ft", "m"), ("cm", "in"), ("in", "cm"), ("kg", "lb"), ("lb", "kg"),
         ("l", "gal"), ("gal", "l"), ("C", "F"), ("F", "C"), ("km", "m"), ("m", "cm")]
CONVERT_TEMPLATES = ["Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?", "{v} {f} in {t}?",
                     "convert {v} {f} to {t}", "Please convert {v} {f} into {t}."]


def convert(value: float, unit_from: str, unit_to: str) -> float:
    """The value in unit_to, rounded to 2 decimals (what the demo's convert_units tool answers)."""
    if unit_from not in UNITS or unit_to not in UNITS:
        raise ValueError(f"unknown unit {unit_from if unit_from not in UNITS else unit_to!r}")
    (_, f1), (_, f2) = UNITS[unit_from], UNITS[unit_to]
    if (f1 is None) != (f2 is None):
        raise ValueError(f"cannot convert {unit_from} to {unit_to}")
    if f1 is None:
        c = value if unit_from == "C" else (value - 32) * 5 / 9
        out = c if unit_to == "C" else c * 9 / 5 + 32
    else:
        out = value * f1 / f2
    return round(out, 2)


def fmt_number(x: float) -> str:
    """JSON's spelling of a number: 7.46, 12 (not 12.0)."""
    return json.dumps(int(x) if float(x).is_integer() else x)


def calculator_result(expression: str) -> str:
    from ..tools import BUILTIN_TOOLS, run_tool

    return run_tool(BUILTIN_TOOLS["calculator"], json.dumps({"expression": expression}))


def convert_result(value: float, unit_from: str, unit_to: str) -> str:
    return json.dumps({"result": json.loads(fmt_number(convert(value, unit_from, unit_to))), "unit": unit_to})


# ---------------------------------------------------------------- conversations
def system(effort: str) -> dict[str, Any]:
    return {"role": "system", "content": {"reasoning_effort": effort}}


def developer(tools: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"role": "developer", "content": {"tools": [TOOL_DEFS[t] for t in tools]}}] if tools else []


def analysis(text: str) -> dict[str, Any]:
    return {"role": "assistant", "channel": "analysis", "content": text}


def final(text: str) -> dict[str, Any]:
    return {"role": "assistant", "channel": "final", "content": text}


SHORT_THOUGHTS = {
    "general": {"low": "Not arithmetic.", "medium": "This is not an arithmetic question, so I cannot answer it.",
                "high": "The user asks something that is not arithmetic. I only know arithmetic and my tools, "
                        "so I should say I don't know instead of guessing."},
    "too_big": {"low": "Too big to do by hand.", "medium": "This is beyond what I can compute by hand, and I have no calculator.",
                "high": "This needs more than adding or subtracting numbers of up to 4 digits or multiplying by one "
                        "digit, and no calculator tool is declared, so I cannot answer it reliably."},
    "no_converter": {"low": "No converter tool.", "medium": "This is a unit conversion and I have no convert_units tool.",
                     "high": "The user wants a unit conversion. No convert_units tool is declared, so I cannot do it."},
    "followup_none": {"low": "No earlier answer.",
                      "medium": "The question refers to an earlier answer, and there is none.",
                      "high": "The user refers to a previous result ('that', 'it'), but no earlier turn has a number as "
                              "its answer, so I cannot tell which number is meant."},
    "greeting": {"low": "Greeting.", "medium": "The user greets me; I say what I can do.",
                 "high": "The user greets me or asks who I am. I introduce myself and say what I can do."},
}


# version 17: the same thoughts without "there", "turn", "which" and "I have" (see REPLIES_V17)
SHORT_THOUGHTS_V17 = {
    **SHORT_THOUGHTS,
    "too_big": {**SHORT_THOUGHTS["too_big"],
                "medium": "This is beyond what I can compute by hand, and no calculator is declared.",
                "high": "This needs more than adding or subtracting numbers with at most 4 digits or multiplying by "
                        "one digit, and no calculator tool is declared, so I cannot answer it reliably."},
    "no_converter": {**SHORT_THOUGHTS["no_converter"],
                     "medium": "This is a unit conversion and no convert_units tool is declared."},
    "followup_none": {"low": "No earlier answer.",
                      "medium": "The question refers to an earlier answer, and this conversation has none.",
                      "high": "The user refers to a previous result ('that', 'it'), but no earlier answer holds a "
                              "number, so I cannot tell what number is meant."},
}


def thoughts(version: int) -> dict[str, dict[str, str]]:
    """The short analyses before data `version`'s fixed replies, by kind and effort."""
    return SHORT_THOUGHTS_V17 if version == 17 else SHORT_THOUGHTS


def _tool_thought(effort: str, name: str, what: str) -> str:
    return {"low": f"Use {name}.", "medium": f"I will use the {name} tool for {what}.",
            "high": f"A {name} tool is declared, so I call it for {what} instead of working it out by hand, "
                    "then report its result."}[effort]


CONVERT_HELDOUT = ["I have {v} {f}, how many {t} is that?", "{v} {f} to {t} please", "Turn {v} {f} into {t}.",
                   "What does {v} {f} come to in {t}?", "Express {v} {f} in {t}", "{v} {f} equals how many {t}?"]
# Words a user may put around a question: in version-2 training many questions with numbers carry a few of them,
# left out of the vocabulary (read as the unknown token, like a general question's words), so that unknown words
# alone do not mean "refuse": what decides is whether the question states numbers and an operator in scope.
FILLER = ["honestly", "my teacher asked", "for my shop", "before lunch", "in my notebook", "for the recipe",
          "my friend says", "I think", "for the train ticket", "on the invoice", "at the market", "by tomorrow",
          "sorry to bother you", "my kid wants to know", "real quick", "for a spreadsheet", "be careful",
          "no calculator here", "double check it", "this is for work"]
FILLER_P = 0.3


def with_filler(rng: random.Random, q: str) -> str:
    """The question with one or two filler phrases before and/or after it."""
    before, after = rng.choice([(1, 0), (0, 1), (1, 1), (2, 0), (0, 2)])
    pick = lambda k: ", ".join(rng.sample(FILLER, k))  # noqa: E731
    return (pick(before) + ": " if before else "") + q + (" (" + pick(after) + ")" if after else "")


NOISE_P = 0.35  # version 5: the share of questions with noise words around them (besides FILLER_P's filler)


@functools.lru_cache(maxsize=None)
def noise_pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Version 5's noise words (gptoss.demo.phrasing.noise_words): none is a word of any held-out question."""
    return noise_words((*HELDOUT_GENERAL, *HELDOUT_SUBJECTS, *HELDOUT_THINGS, *CONVERT_HELDOUT))


def glue(rng: random.Random, q: str, phrasing: str | None, version: int) -> tuple[str, bool]:
    """A training question with extra words around it, and whether they stay outside the vocabulary: filler
    phrases (version 2 on), or from version 5 runs of noise words, half from the known pool (in the
    vocabulary) and half from the unknown one. Versions 2 to 4 draw exactly the random numbers they did."""
    if version < 2 or phrasing != "train":
        return q, False
    r = rng.random()
    if r < FILLER_P:
        return with_filler(rng, q), True
    if version >= 5 and r < FILLER_P + NOISE_P:
        unknown = rng.random() < 0.5
        return with_noise(rng, q, noise_pools()[unknown]), unknown
    return q, False


def numberless(rng: random.Random, version: int = 5) -> str:
    """Version 5: a question in a training frame whose operands are words, not numbers (`What is tree plus
    void?`, `Add class and set.`): it states no numbers, so it is not arithmetic, whatever its frame."""
    known = noise_pools()[0]
    a, b = rng.choice(known), rng.choice(known)
    op = rng.choice(["add", "sub", "mul", "div"])
    if rng.random() < 0.3:
        frame = rng.choice(TRAIN_PHRASING.words[op]).format(a=a, b=b)
    else:
        e = a if rng.random() < 0.3 else f"{a} {rng.choice(OPERATORS[op])} {b}"
        frame = rng.choice(TRAIN_PHRASING.expression).format(e=e)
    return compose(rng, training_family(version), frame)


def _phrased(rng: random.Random, phrasing: str | None, template: str, version: int = 1, **values: Any) -> str:
    """A non-arithmetic question: the template as is (version 1) or with its phrasing family's glue."""
    text = template.format(**values)
    if phrasing is None:
        return text
    return compose(rng, HELDOUT_PHRASING if phrasing == "heldout" else training_family(version), text)


def make_example(rng: random.Random, kind: str | None = None, heldout: bool = False, *,
                 phrasing: str | None = None, version: int = 1) -> Example:
    """One conversation of `kind` (default: drawn by WEIGHTS); heldout: general questions from the held-out pool.

    version 1 is the shipped model's data (its question templates, its reasoning format) and draws exactly the
    same random numbers as it always did; version 2 phrases questions from the training family of
    gptoss.demo.phrasing, restates the operands at every effort, shows each column's borrow decision, and
    draws carry/borrow-heavy pairs more often. phrasing: "train" or "heldout" (a family of
    gptoss.demo.phrasing); default None = version 1's templates, "train" in version 2."""
    if version >= 2 and phrasing is None:
        phrasing = "train"
    if not kind:
        kinds, weights = ((KINDS_V10, WEIGHTS_V14) if more_followups(version) else
                          (KINDS_V10, WEIGHTS_V11) if version >= 11 else (KINDS_V10, WEIGHTS_V10) if version >= 10 else
                          (KINDS_V4, WEIGHTS_V5) if version >= 5 else (KINDS_V4, WEIGHTS_V4) if version == 4 else
                          (KINDS, WEIGHTS if version == 1 else WEIGHTS_V2))
        kind = rng.choices(kinds, weights)[0]
    if kind == "json":
        return structured_example(rng, version, phrasing)
    effort = rng.choice(EFFORTS)
    free = False
    if kind in ("add", "sub", "mul"):
        tools: tuple[str, ...] = ("convert_units",) if rng.random() < 0.1 else ()
        if kind == "mul":
            big, small = number(rng), rng.randint(0, 9)
            a, b = (small, big) if rng.random() < 0.3 else (big, small)  # the question's order
            work, result = work_mul(big, small, effort, version)
            if (a, b) != (big, small):
                work = {"low": f"{a}*{b}={big}*{small}\n", "medium": f"{a} × {b} = {big} × {small}.\n",
                        "high": f"Multiplication is commutative: {a} × {b} = {big} × {small}.\n"}[effort] + work
        else:
            a, b = hard_pair(rng, kind) if version >= 2 and rng.random() < 0.3 else (number(rng), number(rng))
            close = question_version(version) >= 13 and kind == "sub" and phrasing != "heldout"
            if close and rng.random() < CLOSE_SUB_P_V13:
                a, b = close_pair(rng)
            if version >= 2 and kind == "sub" and rng.random() < 0.5 and a < b:
                a, b = b, a  # mostly non-negative results, still some negative ones
            work, result = (work_add if kind == "add" else work_sub)(a, b, effort, version)
        q = question(rng, kind, a, b, phrasing, version)
        q, free = glue(rng, q, phrasing, version)
        sym = OPS[kind][1]
        msgs = [analysis(work), final(f"{a} {sym} {b} = {result}")]
        return _example(kind, effort, tools, q, msgs, answer=str(result), rng=rng, free=free, version=version,
                        request=f"{a} {ASCII_OPS[kind]} {b}")
    if kind in ("followup", "followup_none"):
        return followup_example(rng, effort, phrasing, version, dangling=kind == "followup_none")
    if kind == "calc":
        tools = rng.choice([("calculator",), ("calculator",), ("calculator", "convert_units"), ("convert_units", "calculator")])
        op = rng.choice(["+", "-", "*", "/"])
        a, b = number(rng, 6), number(rng, 4 if op in "*/" else 6)
        if op == "/" and b == 0:
            b = rng.randint(1, 99)
        op_word = {"+": "add", "-": "sub", "*": "mul", "/": None}[op]
        if phrasing is not None:
            q = question(rng, op_word or "div", a, b, phrasing, version)
        else:
            q = question(rng, op_word, a, b) if op_word else rng.choice(
                ["What is {a} / {b}?", "{a} / {b}", "Divide {a} by {b}.", "What is {a} divided by {b}?"]).format(a=a, b=b)
        q, free = glue(rng, q, phrasing, version)
        expr = f"{a} {op} {b}"
        result = calculator_result(expr)
        value = json.loads(result)["result"]
        sym = {"*": "×", "/": "÷"}.get(op, op)
        msgs = [analysis(_tool_thought(effort, "calculator", expr)),
                {"role": "assistant", "channel": "commentary", "recipient": "functions.calculator",
                 "content_type": "json", "content": json.dumps({"expression": expr})},
                {"role": "tool", "name": "functions.calculator", "channel": "commentary", "recipient": "assistant",
                 "content": result},
                final(f"{a} {sym} {b} = {fmt_number(value)}")]
        return _example(kind, effort, tools, q, msgs, answer=fmt_number(value),
                        call={"name": "calculator", "arguments": {"expression": expr}}, rng=rng, free=free,
                        version=version, request=expr)
    if kind in ("convert", "no_converter"):
        uf, ut = rng.choice(PAIRS)
        v = rng.choice([rng.randint(1, 100), rng.randint(1, 1000), round(rng.uniform(0.5, 100), 1)])
        if uf in "CF" and rng.random() < 0.3:
            v = -v
        template = rng.choice(CONVERT_HELDOUT if phrasing == "heldout" else CONVERT_TEMPLATES)
        q = _phrased(rng, phrasing, template, version, v=fmt_number(v), f=rng.choice(UNITS[uf][0]),
                     t=rng.choice(UNITS[ut][0]))
        if version >= 5:
            q, free = glue(rng, q, phrasing, version)
        if kind == "no_converter":
            tools = rng.choice([(), (), ("calculator",)])
            return _example(kind, effort, tools, q, [analysis(thoughts(version)[kind][effort]),
                                                     final(replies(version)["no_converter"])],
                            rng=rng, free=free, version=version, request=f"{fmt_number(v)} {uf} to {ut}")
        tools = rng.choice([("convert_units",), ("convert_units",), ("calculator", "convert_units")])
        args = {"value": json.loads(fmt_number(v)), "from": uf, "to": ut}
        result = convert_result(v, uf, ut)
        out = fmt_number(json.loads(result)["result"])
        msgs = [analysis(_tool_thought(effort, "convert_units", f"{fmt_number(v)} {uf} to {ut}")),
                {"role": "assistant", "channel": "commentary", "recipient": "functions.convert_units",
                 "content_type": "json", "content": json.dumps(args)},
                {"role": "tool", "name": "functions.convert_units", "channel": "commentary", "recipient": "assistant",
                 "content": result},
                final(f"{fmt_number(v)} {uf} = {out} {ut}")]
        return _example(kind, effort, tools, q, msgs, answer=out, call={"name": "convert_units", "arguments": args},
                        rng=rng, free=free, version=version, request=f"{fmt_number(v)} {uf} to {ut}")
    if kind == "too_big":
        tools = rng.choice([(), (), ("convert_units",)])
        op = rng.choice(["add", "sub", "mul", "div"])
        if op == "mul":
            a, b = number(rng, 4), number(rng, 4)
            while len(str(a)) < 2 or len(str(b)) < 2:
                a, b = number(rng, 4), number(rng, 4)
        else:
            a, b = rng.randint(10_000, 9_999_999), number(rng, 6)
            if rng.random() < 0.5:
                a, b = b, a
        if phrasing is not None:
            q = question(rng, op, a, max(b, 2) if op == "div" else b, phrasing, version)
        else:
            q = question(rng, op, a, b) if op != "div" else f"What is {a} / {max(b, 2)}?"
        q, free = glue(rng, q, phrasing, version)
        return _example(kind, effort, tools, q, [analysis(thoughts(version)[kind][effort]),
                                                 final(replies(version)["too_big"])], rng=rng,
                        free=free, version=version, request=f"{a} {ASCII_OPS[op]} {max(b, 2) if op == 'div' else b}")
    if kind == "general":
        tools = rng.choice([(), (), ("calculator",), ("convert_units",)])
        held = heldout or phrasing == "heldout"
        templates, subjects, things = (HELDOUT_GENERAL, HELDOUT_SUBJECTS, HELDOUT_THINGS) if held else \
            (GENERAL, SUBJECTS, THINGS)
        q = _phrased(rng, phrasing, rng.choice(templates), version, s=rng.choice(subjects), t=rng.choice(things))
        if version >= 5 and not held:
            if rng.random() < 0.4:
                q = numberless(rng, version)
            q = glue(rng, q, phrasing, version)[0]
        return _example(kind, effort, tools, q, [analysis(thoughts(version)[kind][effort]),
                                                 final(replies(version)["dont_know"])], rng=rng, version=version)
    if kind == "greeting":
        tools = rng.choice([(), ("calculator",)])
        return _example(kind, effort, tools, rng.choice(GREETINGS),
                        [analysis(thoughts(version)[kind][effort]), final(replies(version)["greeting"])], rng=rng,
                        version=version)
    raise ValueError(f"unknown example kind {kind!r}")


KINDS = ["add", "sub", "mul", "calc", "convert", "general", "too_big", "no_converter", "greeting"]
WEIGHTS = [20, 18, 18, 14, 10, 9, 6, 3, 2]
WEIGHTS_V2 = [20, 22, 16, 12, 8, 10, 8, 2, 2]  # more subtraction (the weak spot) and more refusals to tell apart
KINDS_V4, WEIGHTS_V4 = KINDS + ["json"], WEIGHTS_V2 + [8]
WEIGHTS_V5 = [20, 22, 16, 12, 8, 15, 10, 2, 2, 8]  # more refusals: run 4 declined only half the held-out ones
KINDS_V10, WEIGHTS_V10 = KINDS_V4 + ["followup", "followup_none"], WEIGHTS_V5 + [10, 2]
WEIGHTS_V11 = WEIGHTS_V5 + [10, 4]  # twice the dangling follow-ups: run 10 declined 73 % of the held-out ones
WEIGHTS_V14 = WEIGHTS_V5 + [16, 4]  # more follow-ups: their held-out score swung from 108 to 153 of 170 by draw


def earlier_turn(prev: Example) -> list[dict[str, Any]]:
    """An earlier turn as the chat keeps it in the history: the question and the final answer (no analysis)."""
    return [{"role": "user", "content": prev.question}, {**prev.messages[-1]}]


def conversation(effort: str, tools: tuple[str, ...], history: list[dict[str, Any]], question: str,
                 assistant: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """System and developer messages, the earlier turns, the question, and the assistant's messages."""
    return [system(effort), *developer(tools), *history, {"role": "user", "content": question}, *assistant]


FOLLOWUP_OPS = ("add", "sub", "sub", "mul", "sub_from")
FOLLOWUP_OPS_V14 = FOLLOWUP_OPS + ("sub_from",)  # the previous answer as second operand: the frame missed most


def followup_example(rng: random.Random, effort: str, phrasing: str | None, version: int,
                     dangling: bool = False) -> Example:
    """Version 10: an in-scope arithmetic question about the previous turn's answer (`Add 5 to that.` after
    `1234 - 987 = 247`). The earlier turn is kept as chat keeps it (question and final answer); the analysis
    first names the number the question refers to, `Previous answer: 247.`, copied from that final answer,
    then works `247 + 5` as any other question. Previous answers are 0 to 9999, so the work stays in scope.

    dangling: the same question with no answer to refer to (the first message, or after a question the model
    declined or a greeting), declined (kind "followup_none")."""
    fam = training_family(version) if phrasing != "heldout" else "heldout"
    if dangling:
        op = rng.choice(["add", "sub", "mul", "sub_from"])
        q = followup(rng, fam, op, rng.randint(2, 9) if op == "mul" else number(rng))
        history: list[dict[str, Any]] = []
        free_history: tuple[str, ...] = ()
        if rng.random() < 0.6:
            prev = make_example(rng, rng.choice(["general", "general", "greeting"]), phrasing=phrasing, version=version)
            history = earlier_turn(prev)
            free_history = (prev.question,) if user_free_text(prev) else ()
        tools = rng.choice([(), (), ("convert_units",)])
        messages = conversation(effort, tools, history, q,
                                [analysis(thoughts(version)["followup_none"][effort]),
                                 final(replies(version)["no_earlier"])])
        return Example("followup_none", effort, tools, q, messages, None, None, history, False, free_history)
    while True:
        prev = make_example(rng, rng.choice(["add", "sub", "mul"]), phrasing=phrasing, version=version)
        if prev.answer is not None and 0 <= int(prev.answer) <= 9999:
            break
    r = int(prev.answer)
    op = rng.choice(FOLLOWUP_OPS_V14 if more_followups(version) else FOLLOWUP_OPS)
    n = rng.randint(2, 9) if op == "mul" else number(rng)
    a, b = (n, r) if op == "sub_from" else (r, n)
    kind = "sub" if op == "sub_from" else op
    work, result = (work_mul(a, b, effort, version) if kind == "mul" else
                    (work_add if kind == "add" else work_sub)(a, b, effort, version))
    q = followup(rng, fam, op, n, separators=SEPARATORS_V6 if phrasing != "heldout" else 0.1)
    request = f"{a} {ASCII_OPS[kind]} {b}"
    first, last = restated(request, [analysis(work), final(f"{a} {OPS[kind][1]} {b} = {result}")], q)
    lead = {"low": f"prev={r}", "medium": f"Previous answer: {r}.",
            "high": f"The question refers to my previous answer, {r}."}[effort]
    assistant = [{**first, "content": f"{lead}\n{first['content']}"}, last]
    history = earlier_turn(prev)
    tools: tuple[str, ...] = ("convert_units",) if rng.random() < 0.1 else ()
    free_history = (prev.question,) if user_free_text(prev) else ()
    if long_histories(version) and rng.random() < HISTORY_P_V12:  # turns before the one referred to (the last answer counts)
        before, free_before = earlier_turns(rng, tools, version, turns=rng.choice([1, 1, 2]))
        history = before + history
        free_history = free_before + free_history
    messages = conversation(effort, tools, history, q, assistant)
    return Example("followup", effort, tools, q, messages, str(result), None, history, False, free_history)

# Version 4's structured answers: (format name, description or None, the expression's field or None, the
# result's field). The schema is built from them (response_schema); the final answer is that object.
RESPONSE_FORMATS = [("arithmetic", None, "expression", "result"), ("answer", None, None, "answer"),
                    ("calculation", "The worked result.", "question", "value"), ("math_result", None, None, "result"),
                    ("sum_reply", "Reply with the number only.", None, "total"), ("solution", None, "problem", "solution")]


def response_schema(expression_field: str | None, result_field: str) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if expression_field:
        props[expression_field] = {"type": "string"}
    props[result_field] = {"type": "integer"}
    return {"type": "object", "additionalProperties": False, "required": list(props), "properties": props}


def structured_example(rng: random.Random, version: int, phrasing: str | None = None) -> Example:
    """An in-scope arithmetic question (phrased from `phrasing`'s family; training: "train") answered as the JSON
    object of a declared response format."""
    base = make_example(rng, rng.choice(["add", "sub", "mul"]), phrasing=phrasing, version=version)
    name, description, expression_field, result_field = rng.choice(RESPONSE_FORMATS)
    schema = response_schema(expression_field, result_field)
    a, sym, b = base.messages[-1]["content"].split(" = ")[0].split(" ")
    answer = {expression_field: f"{a} {sym} {b}"} if expression_field else {}
    answer[result_field] = int(base.answer)
    fmt = {"name": name, "schema": schema, **({"description": description} if description else {})}
    messages = [m for m in base.messages if m["role"] != "developer"]
    at = 1  # after the system message
    dev = {"role": "developer", "content": {"tools": [TOOL_DEFS[t] for t in base.tools], "response_format": fmt}}
    # version 6 writes "×" as itself: json.dumps's default "\u00d7" is six tokens the model must spell out, and
    # run 5 got 27 of 52 held-out multiplications with an expression field right (90 % of the other JSON answers)
    messages = [*messages[:at], dev, *messages[at:-1], final(json.dumps(answer, ensure_ascii=version < 6))]
    return Example("json", base.effort, base.tools, base.question, messages, base.answer, None, base.history,
                   base.free, base.free_history)


ASCII_OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def restated(request: str, assistant: list[dict[str, Any]], question: str | None = None) -> list[dict[str, Any]]:
    """Version 3: the first analysis message begins with the request restated (`5622 - 2769`), unless it
    already does (the low-effort work opens with the problem line).

    Version 6 (`question` given): where the question types a number with thousands separators, the request is
    first copied as typed (`2,659 + 8670`), each such number spelled digit by digit (`2,659 = 2 6 5 9`), and only
    then written without separators. o200k splits `2,659` into `2` `,` `659` and `2659` into `265` `9`: going
    straight from one to the other regroups digits across tokens, the step run 5 got wrong in 52 of 56 held-out
    questions with separators. Copying, spelling a chunk's digits and writing digits back as a number are each
    a step the rest of the work already takes."""
    first, *rest = assistant
    text = first["content"]
    if not (text == request or text.startswith(request + "\n")):
        text = f"{request}\n{text}"
    words = request.split(" ")
    typed = {t.replace(",", ""): t for t in NUMBER.findall(question or "") if "," in t and t.replace(",", "") in words}
    if typed:  # plain digits → as typed
        spelled = [f"{t} = {spaced(digits(int(n), len(n)))}" for n, t in typed.items()]
        text = "\n".join([" ".join(typed.get(w, w) for w in words), *spelled, text])
    return [{**first, "content": text}, *rest]


def _example(kind: str, effort: str, tools: tuple[str, ...], q: str, assistant: list[dict[str, Any]],
             answer: str | None = None, call: dict[str, Any] | None = None, rng: random.Random | None = None,
             free: bool = False, version: int = 1, request: str | None = None) -> Example:
    if version >= 3 and request is not None:
        assistant = restated(request, assistant, q if version >= 6 else None)
    history: list[dict[str, Any]] = []
    free_history: tuple[str, ...] = ()
    if rng is not None and long_histories(version):
        if rng.random() < HISTORY_P_V12:
            history, free_history = earlier_turns(rng, tools, version)
    elif rng is not None and rng.random() < 0.1:  # an earlier turn, as chat keeps it (final answer only)
        prev = make_example(rng, rng.choice(["add", "sub", "mul", "general"]), version=version)
        history = earlier_turn(prev)
        if version >= 5 and user_free_text(prev):  # (versions 2 to 4 put its words in the vocabulary)
            free_history = (prev.question,)
    messages = conversation(effort, tools, history, q, assistant)
    return Example(kind, effort, tools, q, messages, answer, call, history, free, free_history)


def without_earliest_turn(ex: Example) -> Example:
    """The conversation with its earliest earlier turn (a question and its answer) left out."""
    start = next(i for i, m in enumerate(ex.messages) if m is ex.history[0])
    drop = ex.history[:2]
    return dataclasses.replace(ex, messages=ex.messages[:start] + ex.messages[start + 2:], history=ex.history[2:],
                               free_history=tuple(q for q in ex.free_history if q != drop[0]["content"]))


def more_followups(version: int) -> bool:
    """Version 14's larger share of follow-ups, twice as many with the previous answer second. Version 15 goes
    back to version 13's shares and keeps version 14's training frames: runs 16 and 17 (version 14) got held-out
    follow-ups right as often as run 11 or more, but copied operands worse (experiments/demo/RESULTS.md)."""
    return version == 14


def long_histories(version: int) -> bool:
    """Version 12's 1 to 4 earlier turns on 30 % of conversations. Version 13 goes back to version 11's one
    earlier turn on 10 %: run 12, trained on version 12, did worse than run 11 (experiments/demo/RESULTS.md)."""
    return version == 12


HISTORY_P_V12 = 0.3  # version 12: the share of conversations with earlier turns (until version 11: 10 %, one turn)
HISTORY_TURNS_V12 = ([1, 2, 3, 4], [4, 3, 2, 1])  # how many earlier turns, and how often
HISTORY_KINDS_V12 = (["add", "sub", "mul", "general", "too_big", "greeting"], [6, 6, 4, 3, 2, 1])


def earlier_turns(rng: random.Random, tools: tuple[str, ...], version: int,
                  turns: int | None = None) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """Version 12: 1 to 4 earlier turns as the chat keeps them (question and final answer each), of arithmetic,
    general questions, greetings and, where no calculator is declared, declined out-of-scope arithmetic. Run 11
    answered held-out questions worse after earlier turns (experiments/demo/long_history.py: 231 of 240 after
    one, 146 of 160 after three) and garbled a subtraction after a declined question; until version 11 only 10 %
    of training conversations had an earlier turn, and only one. Returns the turns and the questions among them
    that are free text (kept out of the vocabulary, as a current free-text question is)."""
    # "too big to work out by hand" contradicts a declared calculator
    kinds, weights = zip(*((k, w) for k, w in zip(*HISTORY_KINDS_V12) if k != "too_big" or "calculator" not in tools))
    history: list[dict[str, Any]] = []
    free: list[str] = []
    for _ in range(turns or rng.choices(*HISTORY_TURNS_V12)[0]):
        prev = make_example(rng, rng.choices(kinds, weights)[0], version=version)
        history += earlier_turn(prev)
        if user_free_text(prev):
            free.append(prev.question)
    return history, tuple(free)


LATEST_VERSION = 23  # the newest data version (see the module docstring); 1 to this are defined


def generate(seed: int, n: int, exclude: set[str] | None = None, version: int = 1) -> Iterator[Example]:
    """n examples from `seed`; questions in `exclude` (e.g. the training set's) are skipped, and no
    question repeats within the set (so a held-out set is disjoint from the training questions)."""
    if not 1 <= version <= LATEST_VERSION:  # an undefined version would quietly draw the newest one's data
        raise ValueError(f"data version {version}: defined versions are 1 to {LATEST_VERSION}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    count = 0
    while count < n:
        ex = make_example(rng, version=version)
        key = question_key(ex)
        if key in seen:
            continue
        seen.add(key)
        count += 1
        yield ex


def question_key(ex: Example) -> str:
    return f"{ex.kind}|{ex.tools}|{ex.question}"


# ---------------------------------------------------------------- rendering for training
def message(d: dict[str, Any]) -> harmony.Message:
    """A message dict → harmony.Message (the one place the data format meets the Harmony layer). The dict is
    the JSONL `messages` format of `gptoss train`: system content = SystemContent fields, developer content =
    {instructions?, tools: [{name, description, parameters}]}."""
    content = d.get("content", "")
    if d["role"] == "system":
        content = harmony.SystemContent(**content)
    elif d["role"] == "developer":
        fmt = content.get("response_format")
        content = harmony.DeveloperContent(content.get("instructions"),
                                           [harmony.ToolDefinition(**t) for t in content.get("tools", [])],
                                           harmony.ResponseFormat(**fmt) if fmt else None)
    return harmony.Message(role=d["role"], content=content, channel=d.get("channel"), recipient=d.get("recipient"),
                           content_type=d.get("content_type"), name=d.get("name"))


def to_messages(ex: Example) -> list[harmony.Message]:
    return [message(m) for m in ex.messages]


def to_document(ex: Example, tok: Tokenizer | None = None,
                current_turn_only: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the whole conversation and the loss mask (True on what the assistant writes).

    Rendered without Harmony's drop of the last turn's analysis: the analysis is exactly what the model must
    learn to write (history turns carry no analysis in the first place). The final answer ends with
    <|return|>, a tool call with <|call|>. The mask covers what the model writes: each assistant message after
    the `<|start|>assistant` that ends the prompt, and the whole header of an assistant message that follows
    another one (after its analysis `<|end|>` the model itself goes on with `<|start|>assistant<|channel|>…`).

    current_turn_only (data version 11 on): earlier turns' answers are context, not targets. They end with
    <|end|>, as the chat renders them in the history, but the model wrote <|return|> there; trained on, they
    teach a final answer that ends with <|end|> (run 10: 12 of 1700 held-out answers not ended with
    <|return|>, all of them replies of the kinds that earlier turns hold)."""
    tok = tok or get_tokenizer()
    messages = to_messages(ex)
    turn = max(i for i, m in enumerate(messages) if m.role == "user") if current_turn_only else 0
    has_tools = harmony.Conversation(messages).has_function_tools()
    tokens: list[int] = []
    mask: list[bool] = []
    head = 1 + len(tok.encode_ordinary("assistant"))
    for i, m in enumerate(messages):
        part = harmony.render_message(m, tok, has_function_tools=has_tools)
        if i == len(messages) - 1 and m.role == "assistant" and m.channel == "final":
            part[-1] = tok.return_
        tokens += part
        if m.role != "assistant" or i < turn:
            mask += [False] * len(part)
        elif i > 0 and messages[i - 1].role == "assistant":  # the model itself starts this message
            mask += [True] * len(part)  # <|start|> included: it follows the <|end|> the model wrote
        else:  # the prompt ends with <|start|>assistant (render_conversation_for_completion)
            mask += [False] * head + [True] * (len(part) - head)
    return tokens, mask


def user_free_text(ex: Example) -> bool:
    """Whether the question is free text whose words the model need not know (they map to the unknown token)."""
    return ex.kind in ("general", "greeting") or ex.free


# ---------------------------------------------------------------- the vocabulary subset
def build_vocab(examples: list[Example], tok: Tokenizer | None = None) -> list[int]:
    """The o200k ids the demo model knows: every id of the rendered conversations except the words of free-text
    questions (those become the unknown token, so the model learns to refuse what it cannot read), every
    number token 0..999 (with leading zeros: any number can be read and copied), and the Harmony specials."""
    from ..tokenizer import SPECIAL_TOKENS

    tok = tok or get_tokenizer()
    ids: set[int] = set()
    for ex in examples:
        for m in ex.messages:
            if m["role"] == "user" and m.get("content") == ex.question and user_free_text(ex):
                continue
            if m["role"] == "user" and m.get("content") in ex.free_history and m.get("content") != ex.question:
                continue
            ids.update(harmony.render_message(message(m), tok, has_function_tools=bool(ex.tools)))
        ids.update(harmony.render_message(harmony.Message.system(harmony.SystemContent(reasoning_effort=ex.effort)),
                                          tok, has_function_tools=bool(ex.tools)))
    for width in (1, 2, 3):
        for n in range(10 ** width):
            ids.update(tok.encode_ordinary(str(n).zfill(width)))
    ids.update(i for name, i in SPECIAL_TOKENS.items() if not name.startswith("<|reserved") or i <= 200012)
    return sorted(ids)


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptoss.demo.data", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for train.jsonl (messages) and vocab.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=120000)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = list(generate(args.seed, args.n))
    with (out / "train.jsonl").open("w") as f:
        for ex in examples:
            f.write(json.dumps({"messages": ex.messages, "kind": ex.kind}) + "\n")
    vocab = build_vocab(examples)
    (out / "vocab.json").write_text(json.dumps(vocab))
    print(f"wrote {len(examples)} conversations to {out / 'train.jsonl'}, vocabulary of {len(vocab)} ids")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
