"""How users phrase the demo's questions: a training family and a held-out family of phrasings.

A held-out set drawn from the training templates measures memorisation of the templates, not the skill
(PITFALLS.md). So the ways of asking are split in two families, and training never sees the held-out one:

- whole question frames ("Please calculate {e}", "From {a}, subtract {b}") — each family its own;
- the glue around them: polite prefixes, trailing text, end punctuation, letter case, spacing around the
  operator — each family its own pools (held-out: ALL CAPS, `12+ 7`, `??`, "Excuse me, ", " :)" ...).

What both families share are the atoms a reader cannot be expected to guess: digits, thousands separators,
and the operator words and symbols themselves (`+ plus add sum`, `- minus subtract take away`,
`* x × times multiplied by product`, `/ ÷ divided by`), in the casings a question can give them. A model
that has never seen "×" cannot know it multiplies; one that has seen "×" in "933 × 8 = ?" can be asked to
read "What would 933 × 8 be??". Letter case is only partly held out for the same reason (o200k's `PLUS`
and ` plus` are unrelated tokens): both families use as-is, lower case and ALL CAPS; Title Case Every Word
is held out. The skeleton check is case-folded, so no held-out question is a training phrasing in another
case.

Noise glue (data version 5): a fixed pool of common o200k words (`noise_words()`), none of them a word of the
held-out family nor a word that changes what is asked (operators, units, number words, "from", "by", "and"),
put around training questions in random runs. It teaches the one thing the held-out glue needs: that words
around the numbers and the operator do not change the question. A question with noise contains a word no
held-out question has, so it cannot share a held-out skeleton.

`phrase(rng, family, op, a, b)` writes one question; `skeleton(q)` is its phrasing with the numbers taken out
(case-folded, spaces collapsed): the held-out family's skeletons are disjoint from every skeleton the training
family can produce (`training_skeletons()` enumerates them all; tests/test_demo_phrasing.py checks it).
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from dataclasses import dataclass, field, replace

# Operator atoms, shared by both families: the expression forms ({a} OP {b}); the first is the canonical one.
OPERATORS = {"add": ["+", "plus"], "sub": ["-", "minus"], "mul": ["*", "×", "x", "times", "multiplied by"],
             "div": ["/", "÷", "divided by"]}


@dataclass(frozen=True)
class Family:
    name: str
    expression: tuple[str, ...]  # frames around an expression {e} = "{a} OP {b}"
    words: dict[str, tuple[str, ...]]  # op → frames in words, with {a} and {b} (a is the minuend / multiplicand)
    spacing: tuple[str, ...]  # how OP sits between the numbers (symbols only; words always take single spaces)
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    ends: tuple[str, ...]  # replaces the frame's own end punctuation ("" keeps it)
    cases: tuple[str, ...]  # "as is" | "lower" | "upper" | "title"
    wrapped: float = 0.0  # the share of questions whose operands are typed inside `wrappers` (version 8)
    wrappers: tuple[str, ...] = ()
    # follow-ups (version 10): questions about the previous answer, with {n} the new number; "add", "sub", "mul"
    # take the previous answer first (`Subtract {n} from that`), "sub_from" second (`Subtract that from {n}`)
    followups: dict[str, tuple[str, ...]] = field(default_factory=dict)


# The version-1 question templates (the shipped model's training data) are all in the training family.
TRAIN = Family(
    name="train",
    expression=("What is {e}?", "{e}", "{e} = ?", "Compute {e}.", "what is {e}", "Calculate {e}", "How much is {e}?",
                "What's {e}?", "Please work out {e}.", "{e}?", "Can you compute {e}?", "Solve {e}.", "Evaluate {e}",
                "Find {e}.", "What does {e} equal?", "Work out {e}", "Tell me {e}.", "{e} =", "What is the result of {e}?",
                "Could you calculate {e}?", "I want to know {e}", "Help me with {e}", "{e} is what?", "Do the math: {e}",
                "Answer this: {e}", "Whats {e}", "Can you solve {e} for me?", "What is the answer to {e}?"),
    words={"add": ("Add {a} and {b}.", "What is the sum of {a} and {b}?", "Sum of {a} and {b}", "Add {b} to {a}",
                   "What do I get if I add {a} and {b}?"),
           "sub": ("Subtract {b} from {a}.", "What is {a} take away {b}?", "Take {b} away from {a}",
                   "What is left if I subtract {b} from {a}?", "Take away {b} from {a}."),
           "mul": ("Multiply {a} by {b}.", "What is the product of {a} and {b}?", "Multiply {a} and {b}",
                   "{b} times {a} is?", "What do I get if I multiply {a} by {b}?"),
           "div": ("Divide {a} by {b}.", "What is {a} divided by {b}?", "Divide {a} by {b}, please")},
    spacing=(" {op} ", " {op} ", " {op} ", "{op}", "  {op}  "),
    prefixes=("", "", "", "", "Hi, ", "Hey, ", "Quick question: ", "Hello! ", "Ok, ", "Math question: ", "Hi! "),
    suffixes=("", "", "", "", " thanks", " Thank you.", " please", " (no rush)", " Thanks.", " asap"),
    ends=("", "", "", "?", "."),
    cases=("as is", "as is", "as is", "as is", "lower", "upper"),
)

HELDOUT = Family(
    name="heldout",
    expression=("Please calculate {e}", "How much does {e} make?", "What do you get for {e}?", "{e} equals what?",
                "Could you work out {e}?", "I need {e}.", "Give me {e}", "Can you tell me what {e} is?",
                "Result of {e}?", "What would {e} be?", "Quickly, {e}", "So {e}?", "Figure out {e} for me",
                "What is {e} exactly?", "Determine {e}.", "Can you do {e}", "Help: {e}", "Let me know {e}",
                "What's the value of {e}?", "{e} makes?"),
    words={"add": ("Add up {a} and {b}.", "What do {a} and {b} add up to?", "The sum of {a} and {b} is?",
                   "Sum {a} and {b} please", "Please add {a} and {b}"),
           "sub": ("From {a}, subtract {b}.", "What is {b} subtracted from {a}?", "{a} take away {b}",
                   "Please subtract {b} from {a}", "How much is {a} take away {b}?"),
           "mul": ("Product of {a} and {b}?", "Multiply {a} with {b}", "What is {a} multiplied by {b} exactly?",
                   "Please multiply {a} by {b}", "The product of {a} and {b} is?"),
           "div": ("Please divide {a} by {b}", "{a} divided by {b} is?", "What does {a} divided by {b} come to?")},
    spacing=("{op} ", " {op}", " {op} ", "{op}"),
    prefixes=("", "", "Hi there, ", "Excuse me, ", "Um, ", "Yo ", "Dear model, ", "Question: ", "Hello, "),
    suffixes=("", "", " Thanks!", " Cheers.", " thx", " I need it for homework.", " :)", " thank you very much"),
    ends=("", "", "??", " ?", "?!", "..."),
    cases=("as is", "as is", "as is", "lower", "upper", "title"),
    followups={"add": ("Now add {n} to it", "What is that plus {n}?", "And now plus {n}?",
                       "Add {n} to the answer please", "Then add {n}."),
               "sub": ("Now subtract {n} from it", "What is that minus {n}?", "And now minus {n}?",
                       "Subtract {n} from the answer please", "Then take away {n}."),
               "mul": ("Now multiply it by {n}", "What is that times {n}?", "And now times {n}?",
                       "Multiply the answer by {n} please", "Then times {n}."),
               "sub_from": ("What is {n} minus that?", "Now subtract it from {n}")},
)
# Data version 6: the training family in Title Case too. o200k's title-case words are tokens unrelated to their
# lower-case forms (` From`, ` And`, ` Liters`), so a model trained without them reads a held-out Title Case
# question's operator, order and units as unknown tokens: run 5 got 75 % of those right against 92 % of the
# others. Its frames and glue stay held out (skeletons are case-folded), as for lower case and ALL CAPS.
TRAIN_V6 = replace(TRAIN, cases=TRAIN.cases + ("title", "title"))
# Data version 7: the inflected operator words are atoms as much as "×" is. The held-out family asks "What is
# {b} subtracted from {a}?" and "Multiply {a} with {b}"; o200k writes " subtracted" as " sub" + "tracted", and no
# training question had "tracted", so run 6 read the unknown token there and answered 10 of 12 such questions
# with an addition or a multiplication. Training frames of their own carry the words; the held-out frames stay
# held out (their skeletons differ, and training_skeletons(7) includes these).
TRAIN_V7 = replace(TRAIN_V6, words={
    **TRAIN_V6.words,
    "sub": TRAIN_V6.words["sub"] + ("{b} subtracted from {a}", "{b} subtracted from {a} leaves what?"),
    "mul": TRAIN_V6.words["mul"] + ("{a} multiplied with {b}", "Multiplied with {b}, {a} gives?")})
# Data version 8: operands sometimes typed in brackets or quotes (`779 + (55)`, `[779] + [55]`, `"8848" - "210"`).
# o200k never joins a space to digits (` 55` is ` ` + `55`), so in every training question of version 7 the
# second operand's digits follow ` `, a bare operator (`779+55`) or a comma; the held-out spacing `779 +55` puts
# them right after ` +`, and run 7 copied that operand wrong in 86 of 109 such questions. Here they also follow
# ` (`, ` [`, ` "` and bare brackets: a number is its digits whatever token comes before. No held-out question
# types a number in brackets or quotes (tests/test_demo_phrasing.py), so the families stay disjoint.
TRAIN_V8 = replace(TRAIN_V7, wrapped=0.15, wrappers=("({n})", "[{n}]", '"{n}"'))
# Data version 10: follow-up questions about the previous answer (`now add 5 to that`). Until version 9 every
# question stated all its numbers, and the shipped model answered `now add 5 to that` after `1234 - 987 = 247`
# with `5 + 5 = 10`. The reference words (that, it, the result, the answer) occur in both families; the frames
# are each family's own.
TRAIN_V10 = replace(TRAIN_V8, followups={
    "add": ("Add {n} to that.", "Now add {n}.", "Plus {n}?", "That plus {n}", "Add {n} to the result",
            "What if I add {n} to it?", "And add {n}"),
    "sub": ("Subtract {n} from that.", "Now take away {n}.", "Minus {n}?", "That minus {n}",
            "Take {n} away from the result", "What if I subtract {n} from it?", "And subtract {n}"),
    "mul": ("Multiply that by {n}.", "Now times {n}.", "Times {n}?", "That times {n}", "Multiply the result by {n}",
            "What if I multiply it by {n}?", "And multiply by {n}"),
    "sub_from": ("Subtract that from {n}.", "{n} minus that?", "Take the result away from {n}")})
# Data version 11: "the answer" and "then" as follow-up words, and "it"/"that" in glue that refers to nothing.
# Version 10's training follow-ups said "that", "it" and "the result"; run 10 got the held-out frames with "the
# answer" or "then" right in 24 of 56 (the rest: 99 of 114), and declined 8 in-scope single questions whose
# held-out suffix "I Need It For Homework." has " It": in training, " It" only ever pointed at an earlier answer.
# Frames of training's own carry the words (the held-out frames stay held out); the new suffixes carry a
# non-referring "it"/"that" on every kind of question.
TRAIN_V11 = replace(
    TRAIN_V10,
    suffixes=TRAIN_V10.suffixes + (" I want it exact.", " Can you do it?", " (work it out by hand)", " that is all"),
    followups={
        "add": TRAIN_V10.followups["add"] + ("The answer plus {n}?", "Then add {n} to it", "And then plus {n}",
                                             "Take the answer and add {n}."),
        "sub": TRAIN_V10.followups["sub"] + ("The answer minus {n}?", "Then subtract {n} from that",
                                             "And then minus {n}", "Take {n} off the answer."),
        "mul": TRAIN_V10.followups["mul"] + ("The answer times {n}?", "Then multiply that by {n}", "And then times {n}",
                                             "Take the answer and multiply it by {n}."),
        "sub_from": TRAIN_V10.followups["sub_from"] + ("{n} minus the answer?", "Then subtract that from {n}",
                                                       "Take the answer away from {n}.")})
# Data version 14: more follow-up frames of training's own, so that reading a question as a follow-up rests on
# more than a few wordings. Runs 11, 15 and 14 (two draws of version 11 and one of version 13, whose follow-ups
# are version 11's) got 153, 129 and 108 of 170 held-out follow-ups right; in 59 of run 14's 62 misses it never
# read the question as a follow-up. The new frames say "the previous answer", "the result" and "that" in
# sentence shapes no training follow-up had ("What do I get if ...", "Okay, ... now", "Use the result and ..."),
# none of them a held-out frame (the skeletons stay disjoint, tests/test_demo_phrasing.py).
TRAIN_V14 = replace(TRAIN_V11, followups={
    "add": TRAIN_V11.followups["add"] + ("What do I get if I add {n} to that?", "Add {n} to the previous answer.",
                                         "Okay, plus {n} now", "Use the result and add {n}"),
    "sub": TRAIN_V11.followups["sub"] + ("What do I get if I subtract {n} from that?",
                                         "Subtract {n} from the previous answer.", "Okay, minus {n} now",
                                         "Use the result and subtract {n}"),
    "mul": TRAIN_V11.followups["mul"] + ("What do I get if I multiply that by {n}?",
                                         "Multiply the previous answer by {n}.", "Okay, times {n} now",
                                         "Use the result and multiply by {n}"),
    "sub_from": TRAIN_V11.followups["sub_from"] + ("What do I get if I subtract that from {n}?",
                                                   "Subtract the previous answer from {n}.", "Okay, {n} minus that now",
                                                   "{n} take away the result?", "What is left if I take that from {n}?")})
# Data version 16: version 13 (version 14's frames left out again) with the words that name an operation or its
# order in every token form a held-out question can type them. o200k writes a sentence's first word without the
# leading space (`Product`, `From` are tokens of their own, unrelated to ` product`, ` from`), and no training
# question began with "product" or "from": the held-out "Product of 7 and 5?" reaches the model as the unknown
# token + "of 7 and 5", and all six runs paired on it (11, 14-18) answered it with an addition. Training frames
# of their own begin with the words (held-out frames stay held out); "From {a}, ..." also puts a comma right
# after a number, which no training question did (run 11 restated "From 9,907, subtract 1931" as `9,907,7 -
# 1931` and declined it).
TRAIN_V16 = replace(TRAIN_V11, words={
    **TRAIN_V11.words,
    "sub": TRAIN_V11.words["sub"] + ("From {a}, take away {b}.", "From {a} take {b} away"),
    "mul": TRAIN_V11.words["mul"] + ("Product of {a} with {b}",)})
# Data version 18: version 11's family with training frames that put a comma right after the first operand
# (`Take 5,427, subtract 2829.`), in words version 11's data already has. Run 29 (version 11) declined two
# held-out `from 5,427, subtract 2829` as too big: a separated number followed by `, ` occurs 11 times in the
# first 20,000 version-11 training questions, a seven-digit separated number (`5,427,123`: to be declined) 346
# times, so `5,427,` read as the start of one. Version 16 had such frames but began them with words version 11's
# vocabulary lacks (`From`, `Product`), so a model trained on version 11 could not continue on it.
TRAIN_V18 = replace(TRAIN_V11, words={
    "add": TRAIN_V11.words["add"] + ("Take {a}, add {b}.", "Take {a}, then add {b} to it", "{a}, plus {b}?"),
    "sub": TRAIN_V11.words["sub"] + ("Take {a}, subtract {b}.", "Take {a}, then take away {b}", "{a}, minus {b}?"),
    "mul": TRAIN_V11.words["mul"] + ("Take {a}, multiply it by {b}.", "Take {a}, then times {b}", "{a}, times {b}?"),
    "div": TRAIN_V11.words["div"]})
# Data version 19: version 18's family with version 16's frames that begin with "From" and "Product" (`From {a},
# take away {b}.`, `Product of {a} with {b}`). Version 11's vocabulary lacks `From`, `FROM`, `Product`, `PRODUCT`
# and `product` (o200k's tokens for those words beginning a question), so a held-out `Product of 5 and 9717?`
# reaches a version-11 model as the unknown token + "of 5 and 9717": run 29 added in all 5 of 20 such questions
# without a prefix (experiments/demo/frame_probe.py). A model trained on version 11 continues on it with its
# vocabulary grown (`[demo] init_from`: each new token starts as the unknown row).
TRAIN_V19 = replace(TRAIN_V18, words={
    **TRAIN_V18.words,
    "sub": TRAIN_V18.words["sub"] + ("From {a}, take away {b}.", "From {a} take {b} away"),
    "mul": TRAIN_V18.words["mul"] + ("Product of {a} with {b}",)})
# Data version 20: version 19 without the comma frames that read like a follow-up (`Take {a}, then add {b} to it`,
# `Take {a}, multiply it by {b}.`, `Take {a}, then times {b}`); the comma frames kept say the operation outright.
# Made because runs 31-34 on versions 18 and 19 answered held-out follow-ups (`what is 76 minus that?`) worse than
# run 29 on two validation draws, and those frames use "then"/"it" for a number in the same message. The control
# said otherwise: run 35, the same phase on version 11, lost as many as run 36 on version 20 (experiments/demo/
# RESULTS.md, runs 35 and 36).
_FOLLOWUP_LIKE = ("Take {a}, then add {b} to it", "Take {a}, then take away {b}", "Take {a}, multiply it by {b}.",
                  "Take {a}, then times {b}")
_V20_KEPT = {op: tuple(f for f in frames if f not in _FOLLOWUP_LIKE) for op, frames in TRAIN_V19.words.items()}
TRAIN_V20 = replace(TRAIN_V19, words={**_V20_KEPT, "add": _V20_KEPT["add"] + ("{a}, add {b}",),
                                      "mul": _V20_KEPT["mul"] + ("Take {a}, multiply by {b}.",)})
# Data version 21: version 11's family with training frames in the three shapes where every model of run 29's
# lineage declines held-out in-scope questions (experiments/demo/decline_probe.py, 10,000 items: about 7 per
# model): "with" joining the operands (held out: `Multiply {a} with {b}`, 3.5 % of those declined, the first operand
# copied wrong), a question that begins with "Result" or "Answer" and means its own result (held out: Title-Case
# `Result Of {e}`, read as a reference to an earlier answer: in version 11 a capitalised "Result"/"Answer" not
# after "what is the" only ever pointed back), and a follow-up that puts the earlier answer second inside an
# ordinary question frame (held out: `What is {n} minus that?`, declined as not arithmetic). The held-out frames
# stay held out: each new frame differs from them in words, not only in glue (skeletons stay disjoint,
# tests/test_demo_phrasing.py).
TRAIN_V21 = replace(
    TRAIN_V11,
    expression=TRAIN_V11.expression + ("Result for {e}?", "Answer to {e}?", "Answer: {e}", "The result of {e}?"),
    words={**TRAIN_V11.words,
           "add": TRAIN_V11.words["add"] + ("Add {a} with {b}", "Add {a} together with {b}."),
           "mul": TRAIN_V11.words["mul"] + ("Multiply {a} together with {b}.", "Multiply together {a} with {b}")},
    followups={**TRAIN_V11.followups,
               "add": TRAIN_V11.followups["add"] + ("How much is that plus {n}?",),
               "mul": TRAIN_V11.followups["mul"] + ("Calculate that times {n}",),
               "sub_from": TRAIN_V11.followups["sub_from"] + (
                   "How much is {n} minus that?", "Calculate {n} minus the answer", "Take it away from {n}.")})
# Data version 22: version 21 with version 20's frames (a comma after the first operand, `Take {a}, subtract {b}.`;
# frames beginning "From" and "Product"). Run 41 (version 21) declined 2 of 10,000 probe items where run 29
# declined 7, none in the three shapes version 21 trains, but on fresh validation items it still declined the
# comma shape (`From 2,037, subtract 63`, read as a seven-digit number), which version 20 fixed in runs 33-36.
TRAIN_V22 = replace(TRAIN_V21, words={
    op: TRAIN_V21.words[op] + tuple(f for f in TRAIN_V20.words[op] if f not in TRAIN_V11.words[op])
    for op in TRAIN_V21.words})
# Data version 23: version 22 with a short word right before the expression (`Ok {e}`, `Well {e}?`), questions
# that begin with "So" (`So what's {e}?`), and follow-ups in the shapes run 43 (version 22) still misread. Its
# last declines were lower-case `so 5313 plus 6686`: in training, "so" at the start of a line is only the
# analysis channel's closing `so 5313 + 6686 = 11999`, and run 43 restated the first operand twice (`531531 +
# 6686`) and declined it as too big. The held-out `So {e}?` stays held out (no new frame puts "So" right before
# the expression). Capital follow-ups `AND NOW MINUS 35` (read as a multiplication) and `NOW SUBTRACT IT FROM 87`
# (declined) get frames of training's own: `Now minus {n}.`, `Now plus {n}?`, `Then subtract it from {n}.`.
TRAIN_V23 = replace(
    TRAIN_V22,
    expression=TRAIN_V22.expression + ("Ok {e}", "Well {e}?", "Next {e}", "Also {e}?", "So what's {e}?",
                                       "So, how much is {e}?"),
    followups={**TRAIN_V22.followups,
               "add": TRAIN_V22.followups["add"] + ("Now plus {n}?",),
               "sub": TRAIN_V22.followups["sub"] + ("Now minus {n}.",),
               "sub_from": TRAIN_V22.followups["sub_from"] + ("Then subtract it from {n}.",)})
FAMILIES = {"train": TRAIN, "heldout": HELDOUT}
# (first data version, its training family), newest first; earlier versions: TRAIN
TRAINING_FAMILIES = ((16, TRAIN_V16), (14, TRAIN_V14), (11, TRAIN_V11), (10, TRAIN_V10), (8, TRAIN_V8), (7, TRAIN_V7),
                     (6, TRAIN_V6))


# Data versions that ask another version's questions (numbers, shares of kinds, reasoning) and change only how the
# model answers (version 17: version 11's questions, the fixed replies worded anew: gptoss.demo.data.REPLIES_V17)
# or only the training frames (versions 18 to 23: FAMILY_OF).
QUESTIONS_OF = {17: 11, 18: 11, 19: 11, 20: 11, 21: 11, 22: 11, 23: 11}
FAMILY_OF = {18: TRAIN_V18, 19: TRAIN_V19, 20: TRAIN_V20, 21: TRAIN_V21, 22: TRAIN_V22, 23: TRAIN_V23}


def question_version(version: int) -> int:
    """The data version whose questions (phrasing, numbers, shares of kinds) data `version` asks."""
    return QUESTIONS_OF.get(version, version)


def training_family(version: int) -> Family:
    """The training family as data `version` phrases it (version 6 adds Title Case, 7 inflected operators, 8
    operands in brackets or quotes, 10 follow-up questions, 11 follow-ups with "the answer" and "then", 14 more
    follow-up frames, 16 version 11's family with operation words beginning a question; 17 version 11's; 18
    version 11's with a comma after the first operand; 19 version 18's with version 16's "From"/"Product" frames; 20
    version 19's without the comma frames that read like a follow-up; 21 version 11's with "with" between the
    operands, "Result"/"Answer" beginning a question, and follow-ups that put the answer second in a question
    frame; 22 version 21's with version 20's frames; 23 version 22's with a short word or "So ..." before the
    expression and more follow-up frames)."""
    if version in FAMILY_OF:
        return FAMILY_OF[version]
    version = question_version(version)
    return next((fam for since, fam in TRAINING_FAMILIES if version >= since), TRAIN)


def with_separators(n: int) -> str:
    return f"{n:,}"


def number_text(rng: random.Random, n: int, separators: float) -> str:
    """A number as a user types it: 4195, or with thousands separators (4,195) some of the time."""
    return with_separators(n) if abs(n) >= 1000 and rng.random() < separators else str(n)


def _case(text: str, case: str) -> str:
    if case == "lower":
        return text.lower()
    if case == "upper":
        return text.upper()
    if case == "title":
        return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    return text


def _finish(frame: str, end: str) -> str:
    return frame.rstrip("?.!") + end if end else frame


def phrase(rng: random.Random, family: Family | str, op: str, a: int, b: int, words: float = 0.2,
           separators: float = 0.1) -> str:
    """One question asking for a OP b (op: add, sub, mul, div), phrased from `family`."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    ta, tb = number_text(rng, a, separators), number_text(rng, b, separators)
    if fam.wrapped and rng.random() < fam.wrapped:  # the second operand always, the first half of the time
        wrapper = rng.choice(fam.wrappers)
        tb = wrapper.format(n=tb)
        if rng.random() < 0.5:
            ta = wrapper.format(n=ta)
    if rng.random() < words:
        frame = rng.choice(fam.words[op]).format(a=ta, b=tb)
    else:
        sym = rng.choice(OPERATORS[op])
        if fam.name == "train" and sym[0].isalpha() and rng.random() < 0.15:
            sym = sym.title()  # operator words in every casing a held-out question can give them (Title Case)
        space = " {op} " if sym[0].isalpha() else rng.choice(fam.spacing)
        e = ta + space.format(op=sym) + tb
        frame = rng.choice(fam.expression).format(e=e)
    return compose(rng, fam, frame)


def followup(rng: random.Random, family: Family | str, op: str, n: int, separators: float = 0.1) -> str:
    """A follow-up question applying op to the previous answer and n (op "sub_from": n minus the answer)."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    return compose(rng, fam, rng.choice(fam.followups[op]).format(n=number_text(rng, n, separators)))


def compose(rng: random.Random, fam: Family, frame: str) -> str:
    """A frame with the family's glue around it: end punctuation, prefix, suffix, letter case."""
    text = _finish(frame, rng.choice(fam.ends))
    prefix = rng.choice(fam.prefixes)
    if prefix and text[:1].isalpha():
        text = text[0].lower() + text[1:]
    text = prefix + text + rng.choice(fam.suffixes)
    return _case(text, rng.choice(fam.cases))


NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+|\d+")


def skeleton(question: str) -> str:
    """The phrasing of a question without its numbers: case-folded, spaces collapsed, numbers → N."""
    return " ".join(NUMBER.sub("N", question).casefold().split())


def numbers(question: str) -> list[int]:
    """The numbers a question states, in order (thousands separators read)."""
    return [int(m.replace(",", "")) for m in NUMBER.findall(question)]


@functools.lru_cache(maxsize=None)
def training_skeletons(version: int = 1) -> frozenset[str]:
    """Every skeleton the training family of data `version` can produce (all frames × operators × spacing ×
    glue × case), operands typed plain. Version 8's operands in brackets or quotes are left out of the product
    (it would grow sixfold): each such skeleton has `(n)`, `[n]` or `"n"` in it, which no held-out one has."""
    out: set[str] = set()
    fam = training_family(version)
    frames: list[str] = []
    for op, syms in OPERATORS.items():
        for sym in syms:
            spaces = {" {op} "} if sym[0].isalpha() else set(fam.spacing)
            frames += [f.format(e="1" + s.format(op=sym) + "2") for f in fam.expression for s in spaces]
        frames += [f.format(a="1", b="2") for f in fam.words[op]]
    frames += [f.format(n="1") for fs in fam.followups.values() for f in fs]
    for frame, end, prefix, suffix in itertools.product(frames, set(fam.ends), set(fam.prefixes), set(fam.suffixes)):
        text = _finish(frame, end)
        if prefix and text[:1].isalpha():
            text = text[0].lower() + text[1:]
        # every case of the training family folds to the same skeleton
        out.add(skeleton(prefix + text + suffix))
    return frozenset(out)


# Words that change what a question asks: never noise. Operator words, the words of order ("from", "by"),
# number words, units, and the words that turn a question into another kind ("convert", "capital" ...).
MEANINGFUL = frozenset("""
    plus minus add adds added adding addition sum sums total subtract subtracts subtracted subtraction take takes
    away less more difference times multiply multiplies multiplied multiplication product by divide divides
    divided division over under half double twice triple square root power percent from and of to into in
    equal equals makes make zero one two three four five six seven eight nine ten eleven twelve hundred thousand
    million billion dozen first second third convert converted conversion unit units km mi miles mile meter meters
    metre metres feet foot ft inch inches cm kg lb pounds pound gal gallon gallons liter liters litre litres
    celsius fahrenheit degrees degree temperature not no never without except calculator tool tools number
    numbers digit digits math result answer""".split())


@functools.lru_cache(maxsize=None)
def noise_words(heldout_texts: tuple[str, ...] = (), known: int = 400,
                unknown: int = 3000) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Two disjoint pools of noise words: the `known` most common lower-case o200k words (` word` tokens of 3 to
    9 letters, in id order, which roughly follows frequency) and the next `unknown` ones, none in MEANINGFUL nor
    a word of the held-out family or of `heldout_texts` (the data's other held-out questions), case-folded. The
    data puts the known pool's words into the vocabulary and leaves the unknown pool's outside (read as the
    unknown token, like a held-out word the model never saw)."""
    from ..tokenizer import get_tokenizer

    tok = get_tokenizer()
    held = set()
    for text in (*_family_texts(HELDOUT), *heldout_texts):
        held.update(re.findall(r"[a-z]+", text.casefold()))
    out: list[str] = []
    for i in range(60_000):
        s = tok.decode([i])
        if re.fullmatch(r" [a-z]{3,9}", s) and s[1:] not in MEANINGFUL and s[1:] not in held:
            out.append(s[1:])
        if len(out) == known + unknown:
            break
    return tuple(out[:known]), tuple(out[known:])


def _family_texts(fam: Family) -> list[str]:
    return [*fam.expression, *(f for frames in fam.words.values() for f in frames), *fam.prefixes, *fam.suffixes]


def with_noise(rng: random.Random, question: str, pool: tuple[str, ...]) -> str:
    """The question with a run of 1 to 4 noise words before it, after it, or both, joined by a space, a comma or
    a colon (never "-" or "/", which are operators). The words stay lower case and follow a space, so that each
    is one o200k token (` word`) and the known pool adds at most its own size to the vocabulary."""
    def run() -> str:
        return " ".join(rng.choice(pool) for _ in range(rng.randint(1, 4)))

    before, after = rng.choice([(True, False), (False, True), (True, True)])
    text = question
    if before:
        text = run() + rng.choice([", ", ": ", " "]) + text
    if after:
        text += rng.choice([" ", ", "]) + run()
    return text
