"""Held-out phrasing for the demo model (gptoss.demo.phrasing) and the version-2 training data.

The held-out family must be phrasings training never produces (checked against every skeleton the training
family can produce, and against generated version-1 and version-2 training data), each question must state
exactly the operands it asks about, the version-2 reasoning must check out column by column (the borrow
decisions included), and the rendered conversations must parse in openai-harmony as the messages they came
from, ending the turn with exactly one <|return|>.
"""

from __future__ import annotations

import functools
import json
import random
import re

import pytest

from gptoss import harmony
from gptoss.demo import data as D
from gptoss.demo import phrasing as P
from gptoss.demo.eval import heldout, repeated
from gptoss.tokenizer import get_tokenizer
from test_harmony import from_oh, oh  # noqa: F401  (the openai-harmony fixture, offline)

TOK = get_tokenizer()
OPS = ("add", "sub", "mul", "div")


@functools.lru_cache(maxsize=None)
def heldout_skeletons() -> frozenset[str]:
    """Skeletons of 5,000 held-out-family questions (seed 0, operands up to 4 digits)."""
    rng = random.Random(0)
    return frozenset(P.skeleton(P.phrase(rng, "heldout", rng.choice(OPS), rng.randint(0, 9999), rng.randint(0, 9999)))
                     for _ in range(5000))


@functools.lru_cache(maxsize=None)
def drawn(version: int) -> tuple[D.Example, ...]:
    """The first 20,000 training conversations of data `version` (seed 0), drawn once for the tests that read them."""
    return tuple(D.generate(seed=0, n=20000, version=version))


@functools.lru_cache(maxsize=None)
def heldout_followup_skeletons() -> frozenset[str]:
    """Skeletons of 3,000 held-out-family follow-ups (seed 0)."""
    rng = random.Random(0)
    return frozenset(P.skeleton(P.followup(rng, "heldout", rng.choice(["add", "sub", "mul", "sub_from"]),
                                           rng.randint(0, 9999))) for _ in range(3000))


def test_heldout_family_is_disjoint_from_every_training_phrasing():
    trained = P.training_skeletons()
    held = heldout_skeletons()
    assert len(held) > 2000  # varied, not a handful of frames
    assert not held & trained
    # the frames themselves differ too, case folded (not only the glue around them)
    for op in OPS:
        assert not {f.casefold() for f in P.HELDOUT.words[op]} & {f.casefold() for f in P.TRAIN.words[op]}
    assert not {f.casefold() for f in P.HELDOUT.expression} & {f.casefold() for f in P.TRAIN.expression}
    assert not set(P.HELDOUT.prefixes) - {""} & set(P.TRAIN.prefixes)
    assert not set(P.HELDOUT.suffixes) - {""} & set(P.TRAIN.suffixes)


@pytest.mark.parametrize("version", [1, 2])
def test_training_data_never_phrases_a_question_the_heldout_way(version):
    """Both the shipped model's data (version 1) and version 2: every arithmetic question is a training-family
    phrasing (version 2: up to filler words), and none is a held-out skeleton."""
    trained = P.training_skeletons()
    examples = [ex for ex in D.generate(seed=0, n=4000, version=version) if ex.kind in ("add", "sub", "mul", "calc")]
    skeletons = {P.skeleton(ex.question) for ex in examples}
    clean = {P.skeleton(ex.question) for ex in examples if not ex.free}
    assert clean <= trained, sorted(clean - trained)[:5]
    held = {P.skeleton(ex.question) for ex in heldout(30, family="heldout", train_n=2000, version=version)}
    assert not held & skeletons


def test_heldout_questions_state_their_operands_and_answers():
    seen_separators = 0
    for ex in heldout(60, family="heldout", train_n=2000):
        if ex.kind not in ("add", "sub", "mul", "calc"):
            continue
        a, sym, b, result = re.fullmatch(r"(\d+) ([-+×÷]) (\d+) = (-?[\d.]+)", ex.messages[-1]["content"]).groups()
        assert sorted(P.numbers(ex.question)) == sorted([int(a), int(b)]), ex.question
        seen_separators += bool(re.search(r"\d,\d{3}", ex.question))
        assert ex.answer == result
    assert seen_separators > 0  # thousands separators do occur


def test_subtract_from_reverses_the_operands():
    rng = random.Random(1)
    for family in ("train", "heldout"):
        for _ in range(300):
            q = P.phrase(rng, family, "sub", 4195, 1932, words=1.0, separators=0)
            if "from" in q.casefold():  # "subtract 1932 from 4195", "from 4195, subtract 1932"
                assert q.casefold().index("1932") < q.casefold().index("from") < q.casefold().index("4195") or \
                    q.casefold().index("from") < q.casefold().index("4195") < q.casefold().index("1932"), q


def test_operator_atoms_of_heldout_questions_occur_in_training():
    """A held-out question may be phrased in new ways, but its operator words are ones training uses."""
    train_tokens = set()
    for ex in D.generate(seed=0, n=6000, version=2):
        if not D.user_free_text(ex):
            train_tokens.update(TOK.encode_ordinary(ex.question))
    for op, syms in P.OPERATORS.items():
        for sym in syms:
            for form in {sym, sym.title()}:
                ids = TOK.encode_ordinary(f"1 {form} 2")
                assert set(ids) <= train_tokens | set(TOK.encode_ordinary("1 2")), (op, form)


def replay_v2(work: str) -> tuple[list[int], list[int]]:
    """The digits a version-2 subtraction writes (least significant first) and the borrows it declares; every
    line re-checked: the comparison x − borrow against y decides the borrow, the column uses it."""
    digits, borrows, borrow = [], [], 0
    for line in work.splitlines():
        m = re.fullmatch(r"(?:\w+: )?(\d)-(\d)(<|>=)(\d), (\d+)-(\d)-(\d)=(\d)(?:, borrow (\d))?", line)
        if not m:
            continue
        x, b_in, cmp, y, top, y2, b2, d = m.groups()[:8]
        x, b_in, y, top, y2, b2, d = map(int, (x, b_in, y, top, y2, b2, d))
        assert b_in == b2 == borrow and y == y2
        need = x - b_in < y
        assert cmp == ("<" if need else ">=") and top == x + 10 * need and d == top - y - b_in
        if m.group(9) is not None:
            assert int(m.group(9)) == need
        digits.append(d)
        borrows.append(int(need))
        borrow = int(need)
    return digits, borrows


@pytest.mark.parametrize("effort", D.EFFORTS)
def test_version2_reasoning_restates_operands_and_shows_each_borrow(effort):
    rng = random.Random(11)
    for _ in range(300):
        a, b = D.hard_pair(rng, "sub") if rng.random() < 0.5 else (D.number(rng), D.number(rng))
        work, r = D.work_sub(a, b, effort, version=2)
        assert r == a - b
        big, small = max(a, b), min(a, b)
        assert f"{big} - {small}" in work  # the operands restated, at every effort
        assert D.spaced(D.digits(big, len(str(big)))) in work.splitlines()
        written, borrows = replay_v2(work)
        assert len(written) == len(str(big)) and int("".join(map(str, written[::-1]))) == big - small
        assert borrows[-1] == 0  # nothing is borrowed past the leading digit
    for _ in range(200):
        a, b = D.number(rng), D.number(rng)
        work, r = D.work_add(a, b, effort, version=2)
        assert r == a + b and f"{a} + {b}" in work


def test_hard_pairs_are_mostly_carries_and_borrows():
    rng = random.Random(2)
    borrows = carries = 0
    for _ in range(500):
        a, b = D.hard_pair(rng, "sub")
        assert 1000 <= a <= 9999 and a >= b
        borrows += sum(replay_v2(D.work_sub(a, b, "medium", version=2)[0])[1])
        a, b = D.hard_pair(rng, "add")
        carries += sum(x + y >= 10 for x, y in zip(D.digits(a, 4), D.digits(b, 4)))
    assert borrows / 500 > 1.5 and carries / 500 > 1.5  # uniform pairs: 1.35 borrows and 1.8 carries per 4 columns


def test_version1_data_keeps_its_templates_and_reasoning():
    """The shipped model's recipe must stay reproducible: version 1 questions come from its own templates
    (TEMPLATES, WORD_TEMPLATES), its reasoning has no version-2 lines, its refusal text is its own."""
    def pattern(template: str) -> str:
        t = re.escape(template).replace(r"\{a\}", r"\d+").replace(r"\{b\}", r"\d+")
        return t.replace(r"\{op\}", "(?:" + "|".join(re.escape(o) for ops, _ in D.OPS.values() for o in ops) + ")")

    frames = [pattern(t) for t in D.TEMPLATES + [t.replace("{a}{op}{b}", "{a} {op} {b}") for t in D.TEMPLATES]]
    frames += [pattern(t) for ts in D.WORD_TEMPLATES.values() for t in ts]
    for ex in D.generate(seed=9, n=600):
        if ex.kind in ("add", "sub", "mul"):
            assert any(re.fullmatch(f, ex.question) for f in frames), ex.question
            assert not ex.free and not re.search(r"\d-\d(?:<|>=)\d, ", ex.messages[-2]["content"])
            if ex.effort == "low":  # version 1 does not restate the operands at low effort
                assert not ex.messages[-2]["content"].startswith(ex.messages[-1]["content"].split(" =")[0])
        if ex.kind == "too_big":
            assert ex.messages[-1]["content"] == D.TOO_BIG


def test_version2_conversations_parse_in_openai_harmony_and_end_with_one_return(oh):  # noqa: F811
    lib, encoding = oh
    checked = set()
    for ex in D.generate(seed=5, n=400, version=2):
        if ex.kind in checked and len(checked) < 9:
            continue
        checked.add(ex.kind)
        tokens, mask = D.to_document(ex, TOK)
        n_prompt = max(i for i, m in enumerate(ex.messages) if m["role"] == "user") + 1
        prompt = harmony.render_conversation_for_completion([D.message(m) for m in ex.messages[:n_prompt]],
                                                            "assistant", TOK)
        assert tokens[:len(prompt)] == prompt
        completion = tokens[len(prompt):]
        assert completion[-1] == TOK.return_ and completion.count(TOK.return_) == 1
        parsed = [from_oh(m) for m in encoding.parse_messages_from_completion_tokens(completion, lib.Role.ASSISTANT)]
        want = [(m["role"], m.get("name"), m.get("channel"), m.get("recipient"), m.get("content_type"), m["content"])
                for m in ex.messages[n_prompt:]]
        assert parsed == want, ex.question
        assert mask[-1]  # the <|return|> is a training target
    assert checked >= {"add", "sub", "mul", "calc", "convert", "general", "too_big"}


def test_repeated_answers_are_caught():
    assert repeated("2 + 2 = 42 + 2 = 4")
    assert repeated("1234 - 987 = 247\n1234 - 987 = 247")
    assert repeated(D.DONT_KNOW + " " + D.DONT_KNOW)
    assert not repeated("2 + 2 = 4") and not repeated(D.DONT_KNOW) and not repeated(D.TOO_BIG)
    assert not repeated("27.3 in = 69.34 cm") and not repeated(D.GREETING)


def scripted(text: str):
    """A `complete` function that writes `text` whatever the prompt (a stand-in model for the eval's session)."""
    def complete(prompt, params):
        return iter(TOK.encode(text, allowed_special="all"))
    return complete


def test_eval_sees_how_the_final_answer_ends():
    from gptoss.demo.eval import final_stop, run_one

    ex = next(e for e in heldout(1, family="heldout", train_n=2000) if e.kind == "add")
    final = "<|start|>assistant<|channel|>final<|message|>"
    cases = {"return": f"<|channel|>analysis<|message|>x<|end|>{final}{ex.messages[-1]['content']}<|return|>",
             # the report: a second answer after <|end|>; the chat session cuts it, the eval counts it
             "end": f"<|channel|>final<|message|>{ex.messages[-1]['content']}<|end|>{final}2 + 2 = 4<|return|>",
             "none": f"<|channel|>final<|message|>{ex.messages[-1]['content']}"}
    for stop, text in cases.items():
        assert final_stop(TOK.encode(text, allowed_special="all"), TOK) == stop
        r = run_one(ex, scripted(text), "medium", 64, "heldout")
        assert (r.stop, r.final, r.correct, r.repeated) == (stop, ex.messages[-1]["content"], True, False), stop
    assert final_stop(TOK.encode("<|channel|>analysis<|message|>x<|end|>", allowed_special="all"), TOK) is None


@pytest.mark.parametrize("version", [5, 6, 7])
def test_version_5_noise_words_are_not_heldout_words_and_questions_stay_training_phrasings(version):
    """Version 5's noise words: two disjoint pools, none a word of any held-out question nor a word that changes
    the question; every training question is a training phrasing, carries filler, or carries a noise word
    (so it cannot be a held-out skeleton), and no held-out question's skeleton is produced."""
    known, unknown = D.noise_pools()
    noise = set(known) | set(unknown)
    assert len(known) == 400 and len(unknown) == 3000 and not set(known) & set(unknown)
    assert not noise & P.MEANINGFUL
    held_texts = [*P.HELDOUT.expression, *P.HELDOUT.prefixes, *P.HELDOUT.suffixes,
                  *(f for frames in P.HELDOUT.words.values() for f in frames), *D.HELDOUT_GENERAL,
                  *D.HELDOUT_SUBJECTS, *D.HELDOUT_THINGS, *D.CONVERT_HELDOUT]
    held_words = {w for t in held_texts for w in re.findall(r"[a-z]+", t.casefold())}
    assert not noise & held_words
    trained = P.training_skeletons(version)
    examples = [ex for ex in D.generate(seed=0, n=4000, version=version) if ex.kind in ("add", "sub", "mul", "calc")]
    with_noise = 0
    frame_words = {w for t in P._family_texts(P.training_family(version)) for w in re.findall(r"[a-z]+", t.casefold())}
    for ex in examples:
        has_noise = bool(set(re.findall(r"[a-z]+", ex.question.casefold())) & noise - frame_words)
        with_noise += has_noise
        assert P.skeleton(ex.question) in trained or ex.free or has_noise, ex.question
    assert with_noise / len(examples) > 0.2
    held = {P.skeleton(ex.question) for ex in heldout(30, family="heldout", train_n=2000, version=version)}
    assert not held & {P.skeleton(ex.question) for ex in examples}


def test_version_5_unknown_noise_stays_outside_the_vocabulary():
    """The unknown pool's words reach the vocabulary only through text other than the noisy questions (the
    model's own analysis, tool definitions ...); the known pool's do."""
    examples = list(D.generate(seed=3, n=3000, version=5))
    vocab = set(D.build_vocab(examples, TOK))
    known, unknown = D.noise_pools()
    other: set[int] = set()
    for ex in examples:
        for m in ex.messages:
            if m["role"] == "user" and (m["content"] == ex.question or m["content"] in ex.free_history):
                continue
            other.update(harmony.render_message(D.message(m), TOK, has_function_tools=bool(ex.tools)))
        if not D.user_free_text(ex):
            other.update(TOK.encode_ordinary(ex.question))
    unknown_ids = {TOK.encode_ordinary(" " + w)[0] for w in unknown}
    assert vocab & unknown_ids <= other
    assert len(vocab & {TOK.encode_ordinary(" " + w)[0] for w in known}) > 350


def test_version_5_numberless_questions_are_refused():
    """A training frame with words for operands states no numbers: refused as a general question."""
    examples = [ex for ex in D.generate(seed=4, n=3000, version=5) if ex.kind == "general"]
    op_word = re.compile(r"\b(plus|minus|times|add|subtract|multiply|divide)\b", re.I)
    ops = [ex for ex in examples if op_word.search(ex.question)]
    assert len(ops) > 50
    for ex in ops:
        assert not re.search(r"\d", ex.question)
        assert ex.messages[-1]["content"] == D.DONT_KNOW


def _title_case(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    return bool(words) and all(w[0].isupper() for w in words) and not all(w.isupper() for w in words)


def test_version_6_copies_separated_numbers_as_typed_then_spells_them():
    """A question typing 2,659 gets an analysis that copies the request as typed, spells each separated number's
    digits, then restates it without separators; the spelled digits are the number's, and the final answer and
    any tool call use the number without separators."""
    examples = [ex for ex in D.generate(seed=5, n=3000, version=6) if ex.kind in ("add", "sub", "mul", "calc", "json")]
    separated = [ex for ex in examples if re.search(r"\d,\d{3}", ex.question)]
    assert 0.15 < len(separated) / len(examples) < 0.5
    for ex in separated:
        lines = next(m for m in ex.messages if m.get("channel") == "analysis")["content"].split("\n")
        typed = [t for t in P.NUMBER.findall(ex.question) if "," in t]
        assert [int(t.replace(",", "")) for t in P.NUMBER.findall(lines[0])] == \
            [int(t) for t in re.findall(r"\d+", lines[len(typed) + 1])]  # as typed, then the same numbers plain
        assert set(typed) <= set(P.NUMBER.findall(lines[0]))
        for t, line in zip(dict.fromkeys(typed), lines[1:]):
            left, right = line.split(" = ")
            assert left == t and right.replace(" ", "") == t.replace(",", "")
        assert "," not in lines[len(typed) + 1]
        if ex.call:
            assert "," not in ex.call["arguments"]["expression"]
    # no separators in the question: the analysis starts with the plain request, as in version 5
    plain = [ex for ex in examples if ex.kind != "json" and not re.search(r"\d,\d", ex.question)][:200]
    for ex in plain:
        first = next(m for m in ex.messages if m.get("channel") == "analysis")["content"].split("\n")[0]
        assert "," not in first and " = " not in first


def test_version_6_trains_title_case_and_keeps_earlier_versions():
    """Version 6 phrases training questions in Title Case too (their words are other o200k tokens), which puts
    title-case operator and order words into the vocabulary; versions 5 and below draw what they drew."""
    v6 = list(D.generate(seed=0, n=3000, version=6))
    v5 = list(D.generate(seed=0, n=3000, version=5))
    share = lambda exs: sum(_title_case(ex.question) for ex in exs) / len(exs)  # noqa: E731
    assert share(v6) > 0.05 and share(v6) > 3 * share(v5)
    vocab = set(D.build_vocab(v6, TOK))
    for word in (" From", " And", " By", " Plus"):
        assert TOK.encode_ordinary(word)[0] in vocab, word
    assert P.TRAIN_V6.expression == P.TRAIN.expression and P.training_family(5) is P.TRAIN
    # the held-out family phrases a question the same way whatever the version
    rng5, rng6 = random.Random(7), random.Random(7)
    assert [D.question(rng5, "add", 1234, 5678, "heldout", 5) for _ in range(50)] == \
        [D.question(rng6, "add", 1234, 5678, "heldout", 6) for _ in range(50)]


def test_version_6_json_answers_write_the_times_sign_as_itself():
    """Version 6's JSON answers keep "×" unescaped (run 5 slipped on the six-token escape); version 5's as before."""
    for version, sign in ((5, "\\u00d7"), (6, "×")):
        finals = [ex.messages[-1]["content"] for ex in D.generate(seed=2, n=4000, version=version) if ex.kind == "json"]
        answers = [a for a in finals if "×" in "".join(json.loads(a).get(f, "") for f in ("expression", "question",
                                                                                          "problem"))]
        assert len(answers) > 10 and all(sign in a for a in answers), (version, answers[:2])


def _compared(line: str) -> tuple[int, int, str, str]:
    """(a, b, relation, reason) of a version-7 comparison line, either effort's form."""
    m = re.fullmatch(r"Compare (\d+) and (\d+): (?:from the left )?(.+), so \1 ([<>=]) \2\.", line) or \
        re.fullmatch(r"(\d+)([<>=])(\d+) \((.+)\)", line)
    assert m, line
    if line.startswith("Compare"):
        return int(m[1]), int(m[2]), m[4], m[3]
    return int(m[1]), int(m[3]), m[2], m[4]


@pytest.mark.parametrize("effort", D.EFFORTS)
def test_version_7_compares_the_operands_before_subtracting(effort):
    """Every version-7 subtraction opens with a comparison whose relation is true and whose reason checks out:
    the digit counts when they differ, else the digits from the left, equal up to the first that differs."""
    rng = random.Random(3)
    pairs = [(548, 743), (93, 94), (2108, 2039), (32, 307), (555, 555), (0, 0), (9, 10)]
    pairs += [(D.number(rng), D.number(rng)) for _ in range(400)]
    for a, b in pairs:
        work, r = D.work_sub(a, b, effort, version=7)
        assert r == a - b
        first, rest = work.split("\n", 1)
        ca, cb, rel, why = _compared(first)
        assert (ca, cb) == (a, b) and rel == ("<" if a < b else ">" if a > b else "=")
        if len(str(a)) != len(str(b)):
            assert why == f"{len(str(a))} digits {rel} {len(str(b))} digits"
        else:
            steps = [re.fullmatch(r"(\d)([<>=])(\d)", s).groups() for s in why.split(", ")]
            for k, (x, s, y) in enumerate(steps):
                assert (x, y) == (str(a)[k], str(b)[k]) and s == ("<" if x < y else ">" if x > y else "=")
            assert all(s == "=" for _, s, _ in steps[:-1]) and (steps[-1][1] != "=" or a == b)
        assert rest == D.work_sub(a, b, effort, version=6)[0]  # then the work as version 6 writes it
    # in the generated conversations, right after the restated request (and JSON answers too)
    subs = [ex for ex in D.generate(seed=1, n=3000, version=7) if ex.kind == "sub"]
    for ex in subs:
        lines = next(m for m in ex.messages if m.get("channel") == "analysis")["content"].split("\n")
        k = next(i for i, line in enumerate(lines) if line.startswith("Compare") or re.match(r"\d+[<>=]\d+ \(", line))
        a, b = (int(t) for t in re.findall(r"-?\d+", lines[k])[:2])
        assert lines[k - 1] == f"{a} - {b}" and ex.answer == str(a - b)


def test_version_7_trains_the_inflected_operator_words_and_keeps_heldout_frames_out():
    """"subtracted from" and "multiplied with" reach the training vocabulary (" sub" + "tracted"), in frames of the
    training family's own: the held-out family stays disjoint from every skeleton version 7 can produce, and
    version 6 and below draw what they drew (TRAIN_V6 unchanged)."""
    v7 = list(D.generate(seed=0, n=4000, version=7))
    vocab = set(D.build_vocab(v7, TOK))
    assert TOK.encode_ordinary(" subtracted") == TOK.encode_ordinary(" sub") + TOK.encode_ordinary("tracted")
    assert TOK.encode_ordinary("tracted")[0] in vocab
    assert sum("subtracted from" in ex.question.lower() for ex in v7) > 20
    assert sum("multiplied with" in ex.question.lower() for ex in v7) > 10
    trained = P.training_skeletons(7)
    assert P.training_skeletons(1) < trained
    held = heldout_skeletons()
    assert not held & trained
    for op in OPS:
        assert not {f.casefold() for f in P.HELDOUT.words[op]} & {f.casefold() for f in P.TRAIN_V7.words[op]}
    assert P.training_family(6) is P.TRAIN_V6 and P.TRAIN_V6.words == P.TRAIN.words


WRAPPED = re.compile(r"[(\[\"]\d[\d,]*[)\]\"]")


def test_version_8_types_operands_in_brackets_or_quotes_and_heldout_never_does():
    """Version 8 puts the second operand's digits after tokens other than a space or a bare operator (o200k never
    joins a space to digits: ` 55` is ` ` + `55`), in about 15 % of training questions; the analysis restates the
    operands plain, and held-out questions never type a number that way, so their skeletons (which would contain
    `(n)`, `[n]` or `"n"`) stay disjoint from version 8's. Version 7 draws what it drew (TRAIN_V7 unchanged)."""
    assert TOK.encode_ordinary("779 + 55") == TOK.encode_ordinary("779") + TOK.encode_ordinary(" +") + \
        TOK.encode_ordinary(" ") + TOK.encode_ordinary("55")
    v8 = [ex for ex in D.generate(seed=0, n=3000, version=8) if ex.kind in ("add", "sub", "mul")]
    wrapped = [ex for ex in v8 if WRAPPED.search(ex.question)]
    assert 0.08 < len(wrapped) / len(v8) < 0.25
    after = {TOK.decode([TOK.encode_ordinary(ex.question)[i - 1]])
             for ex in wrapped for i, t in enumerate(TOK.encode_ordinary(ex.question))
             if i and TOK.decode([t]).isdigit()}
    assert {" (", " [", ' "'} <= after  # digits right after a space-led token that is not " "
    for ex in wrapped:
        turn = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        first_line = next(m["content"] for m in ex.messages[turn:] if m["role"] == "assistant").split("\n")[0]
        assert not WRAPPED.search(first_line) and "(" not in first_line, (ex.question, first_line)
        assert sorted(P.numbers(first_line)) == sorted(P.numbers(ex.question)), (ex.question, first_line)
    rng = random.Random(0)
    held = [P.phrase(rng, "heldout", rng.choice(OPS), rng.randint(0, 9999), rng.randint(0, 9999)) for _ in range(5000)]
    assert not any(WRAPPED.search(q) for q in held)
    assert not any(WRAPPED.search(ex.question) for ex in heldout(30, family="heldout", train_n=500, version=8))
    assert P.training_family(7) is P.TRAIN_V7 and P.TRAIN_V7.wrapped == 0
    assert P.training_skeletons(8) == P.training_skeletons(7)  # plain operands: the same product


@pytest.mark.parametrize("effort", D.EFFORTS)
def test_version_9_writes_both_sides_of_each_comparison_before_its_sign(effort):
    """Version 9's comparison: every step names both digits (or both digit counts) before its sign, each sign is
    true, the steps stop at the first difference, and the numbers' relation comes last; the work after it is
    version 6's. Version 7's line is unchanged (its data draws what it drew)."""
    rng = random.Random(4)
    pairs = [(621, 201), (548, 743), (2108, 2039), (32, 307), (555, 555), (0, 0), (9, 10), (1, 2)]
    pairs += [(D.number(rng), D.number(rng)) for _ in range(400)]
    sign = lambda x, y: "<" if x < y else ">" if x > y else "="  # noqa: E731
    for a, b in pairs:
        work, r = D.work_sub(a, b, effort, version=9)
        first, rest = work.split("\n", 1)
        assert r == a - b and rest == D.work_sub(a, b, effort, version=6)[0]
        head = f"{a} vs {b}: " if effort == "low" else f"Compare {a} and {b}: "
        tail = f", so {a}{sign(a, b)}{b}" if effort == "low" else f", so {a} {sign(a, b)} {b}."
        assert first.startswith(head) and first.endswith(tail), first
        why = first[len(head):-len(tail)]
        la, lb = len(str(a)), len(str(b))
        if la != lb:
            m = re.fullmatch(r"(\d) digits? vs (\d) digits?: (\d)([<>])(\d)", why)
            assert m and m.group(1, 3) == (str(la), str(la)) and m.group(2, 5) == (str(lb), str(lb))
            assert m.group(4) == sign(la, lb)
        else:
            assert why.startswith("from the left ")
            steps = [re.fullmatch(r"(\d) vs (\d): (\d)([<>=])(\d)", s).groups() for s in why[14:].split("; ")]
            for k, (x, y, x2, s, y2) in enumerate(steps):
                assert (x, y) == (x2, y2) == (str(a)[k], str(b)[k]) and s == sign(x, y)
            assert all(s[3] == "=" for s in steps[:-1]) and (steps[-1][3] != "=" or a == b)
    assert D.work_sub(621, 201, "medium", 7)[0].startswith("Compare 621 and 201: from the left 6>2, so 621 > 201.")


def test_version_10_follow_ups_work_on_the_previous_answer():
    """Version 10's follow-ups ("Add 5 to that." after "1234 - 987 = 247"): the earlier turn is kept as the chat
    keeps it, the analysis names the previous answer first (copied from that final answer), then works the
    request in the right order (`Subtract that from n` is n − previous); the answer checks out. Held-out
    follow-up frames are phrasings version 10's training family never produces. Version 9 draws what it drew."""
    v10 = list(D.generate(seed=0, n=3000, version=10))
    ups = [ex for ex in v10 if ex.kind == "followup"]
    assert 0.05 < len(ups) / len(v10) < 0.15
    trained = P.training_skeletons(10)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for ex in ups:
        prev_final = ex.history[-1]["content"]
        assert ex.history[0]["role"] == "user" and ex.history[-1]["channel"] == "final"
        r = int(prev_final.split(" = ")[-1])
        lines = next(m for m in ex.messages if m.get("channel") == "analysis")["content"].split("\n")
        assert str(r) in lines[0] and P.numbers(lines[0]) == [r], lines[0]
        a, op, b = re.fullmatch(r"(-?\d+) ([-+*]) (-?\d+)", next(x for x in lines[1:] if "," not in x)).groups()
        n = [x for x in P.numbers(ex.question)]
        assert sorted([int(a), int(b)]) == sorted([r, *n]), (ex.question, lines[:3])
        assert int(a) == r or ("from" in ex.question.lower() or "minus that" in ex.question.lower())
        assert ex.answer == str(ops[op](int(a), int(b)))
        assert ex.messages[-1]["content"].endswith(f"= {ex.answer}")
        if not ex.free:
            assert P.skeleton(ex.question) in trained, ex.question
    held = heldout_followup_skeletons()
    assert len(held) > 300 and not held & trained
    items = [ex for ex in heldout(20, family="heldout", train_n=500, version=10) if ex.kind == "followup"]
    assert len(items) == 20 and all(ex.history and ex.answer is not None for ex in items)
    assert "followup" not in {ex.kind for ex in heldout(2, family="heldout", train_n=500, version=9)}
    # with no answer to refer to (first message, after a declined question or a greeting): declined
    none = [ex for ex in v10 if ex.kind == "followup_none"]
    assert len(none) > 20
    assert {bool(ex.history) for ex in none} == {True, False}
    for ex in none:
        assert ex.answer is None and ex.messages[-1]["content"] == D.NO_EARLIER
        assert not any(m["content"] and re.search(r"= -?\d+$", str(m["content"])) for m in ex.history)
    held_none = [ex for ex in heldout(10, family="heldout", train_n=500, version=10) if ex.kind == "followup_none"]
    assert len(held_none) == 10 and not {P.skeleton(ex.question) for ex in held_none} & trained


def test_eval_asks_follow_ups_after_the_turn_they_refer_to():
    """run_one (the engine's ChatSession) and run_one_remote (Chat Completions) both put the earlier turn before
    a follow-up question, and only before follow-ups (other kinds are asked alone, as every stored evaluation
    asked them)."""
    from gptoss.demo.eval import run_one, run_one_remote

    items = heldout(30, family="heldout", train_n=500, version=10)
    ex = next(e for e in items if e.kind == "followup")
    other = next(e for e in items if e.kind in ("add", "sub", "mul") and e.history)  # an earlier turn, not asked
    prompts = []

    def complete(prompt, params):
        prompts.append(TOK.decode(list(prompt)))
        return iter(TOK.encode(f"<|channel|>final<|message|>{ex.messages[-1]['content']}<|return|>",
                               allowed_special="all"))

    r = run_one(ex, complete, "medium", 64, "heldout")
    assert r.correct and ex.history[0]["content"] in prompts[-1] and ex.history[-1]["content"] in prompts[-1]
    assert prompts[-1].index(ex.history[-1]["content"]) < prompts[-1].index(ex.question)
    run_one(other, complete, "medium", 64, "heldout")
    assert other.history[0]["content"] not in prompts[-1] and other.question in prompts[-1]

    sent = []

    class Client:  # the openai client's surface run_one_remote uses
        class chat:
            class completions:
                @staticmethod
                def create(model, messages, **kw):
                    sent.append(messages)
                    msg = type("M", (), {"tool_calls": None, "content": ex.messages[-1]["content"],
                                         "reasoning_content": ""})()
                    return type("R", (), {"choices": [type("C", (), {"message": msg})()]})()

    r = run_one_remote(ex, Client, "demo", "medium", 64, "heldout")
    assert r.correct and [m["content"] for m in sent[0]] == [ex.history[0]["content"], ex.history[-1]["content"],
                                                              ex.question]
    assert [m["role"] for m in sent[0]] == ["user", "assistant", "user"]


def previous_and_new(ex) -> tuple[int, int]:
    """A follow-up's previous answer (the last final of its history) and the new number its question states."""
    return int(ex.history[-1]["content"].split(" = ")[-1]), P.numbers(ex.question)[-1]


def assert_own_result(exs) -> None:
    """Each question's answer is its own two numbers' result, and its analysis does not begin as a follow-up's."""
    for ex in exs:
        a, b = P.numbers(ex.question)[:2]
        first = next(m for m in ex.messages if m.get("channel") == "analysis")["content"]
        assert ex.answer == str({"add": a + b, "sub": a - b, "mul": a * b}[ex.kind]), ex.question
        assert not first.startswith("Previous answer"), ex.question


def assert_kind_shares_of_version11(exs) -> None:
    """The same shares of kinds as version 11's draw (a version that changes only the frames)."""
    v11 = drawn(11)
    for kind in {ex.kind for ex in v11}:
        assert abs(sum(ex.kind == kind for ex in v11) - sum(ex.kind == kind for ex in exs)) < 400, kind


def test_version_11_reads_the_answer_and_then_as_follow_ups_and_a_stray_it_as_nothing():
    """Version 11 trains follow-ups worded with "the answer" and "then" (frames of its own; the held-out frames
    with those words stay held out), puts an "it"/"that" that refers to nothing after single questions, which
    are still answered, and asks twice as many follow-ups with nothing to refer to. Version 10 is unchanged."""
    v11 = list(D.generate(seed=0, n=4000, version=11))
    v10 = list(D.generate(seed=0, n=4000, version=10))
    share = lambda exs, kind: sum(ex.kind == kind for ex in exs) / len(exs)  # noqa: E731
    assert share(v11, "followup_none") > 1.5 * share(v10, "followup_none")
    assert abs(share(v11, "followup") - share(v10, "followup")) < 0.03
    ups = [ex.question.casefold() for ex in v11 if ex.kind == "followup"]
    assert sum("the answer" in q for q in ups) > 0.05 * len(ups) and sum("then" in q for q in ups) > 0.05 * len(ups)
    stray = [ex for ex in v11 if ex.kind in ("add", "sub", "mul") and re.search(r"\b(it|that)\b", ex.question, re.I)]
    assert len(stray) > 30
    for ex in stray:  # answered like any other single question
        first = next(m for m in ex.messages if m.get("channel") == "analysis")["content"]
        assert ex.messages[-1]["content"].endswith(f"= {ex.answer}") and not first.startswith("Previous answer")
    trained = P.training_skeletons(11)
    assert P.training_skeletons(10) < trained and P.training_family(10) is P.TRAIN_V10
    rng = random.Random(0)
    held = {P.skeleton(P.followup(rng, "heldout", rng.choice(["add", "sub", "mul", "sub_from"]), rng.randint(0, 9999)))
            for _ in range(3000)}
    held |= {P.skeleton(P.phrase(rng, "heldout", rng.choice(OPS), rng.randint(0, 9999), rng.randint(0, 9)))
             for _ in range(3000)}
    assert not held & trained
    for ex in heldout(10, family="heldout", train_n=500, version=11):
        assert P.skeleton(ex.question) not in trained or ex.kind not in ("add", "sub", "mul", "followup", "followup_none")
    # the new frames' order: "n minus the answer" is n − previous
    for ex in (e for e in v11 if e.kind == "followup" and "minus the answer" in e.question.casefold()):
        r, n = previous_and_new(ex)
        assert ex.answer == str(n - r), ex.question


def test_version_14_asks_more_follow_ups_in_more_training_frames_and_keeps_heldout_frames_out():
    """Version 14: half again as many follow-ups, more of them with the previous answer as second operand
    (`{n} minus that`), in training frames of its own that no held-out question uses; versions up to 13 draw
    what they drew (the family of version 11 serves 11 to 13). Version 15: version 14's frames, version 13's shares."""
    v13, v14 = (list(D.generate(seed=0, n=5000, version=v)) for v in (13, 14))
    share = lambda exs, kind: sum(ex.kind == kind for ex in exs) / len(exs)  # noqa: E731
    assert share(v14, "followup") > 1.35 * share(v13, "followup")
    assert abs(share(v14, "followup_none") - share(v13, "followup_none")) < 0.01

    def second(exs) -> float:  # follow-ups whose answer is n − previous (the previous answer second)
        ups = [ex for ex in exs if ex.kind == "followup"]
        out = 0
        for ex in ups:
            r, n = previous_and_new(ex)
            out += ex.answer == str(n - r) != str(r - n)
        return out / len(ups)

    assert second(v14) > 1.25 * second(v13)
    new = {f for op, fs in P.TRAIN_V14.followups.items() for f in fs} - {
        f for op, fs in P.TRAIN_V11.followups.items() for f in fs}
    asked = [ex.question for ex in v14 if ex.kind == "followup"]
    uses_new = lambda q: any(P.skeleton(f.format(n="1")).rstrip(".?") in P.skeleton(q) for f in new)  # noqa: E731
    assert len(new) >= 12 and sum(map(uses_new, asked)) > 0.2 * len(asked)
    assert P.training_family(13) is P.TRAIN_V11 and P.training_family(14) is P.TRAIN_V14 is P.training_family(15)
    v15 = list(D.generate(seed=0, n=5000, version=15))  # version 14's frames at version 13's shares
    assert abs(share(v15, "followup") - share(v13, "followup")) < 0.01 and abs(second(v15) - second(v13)) < 0.05
    assert sum(uses_new(ex.question) for ex in v15 if ex.kind == "followup") > 30
    trained = P.training_skeletons(14)
    assert P.training_skeletons(11) < trained
    held = heldout_followup_skeletons()
    assert not held & trained
    for ex in (e for e in v14 if e.kind == "followup"):  # every frame's order holds: the answer is the work's
        r, n = previous_and_new(ex)
        assert ex.answer in (str(r + n), str(r - n), str(n - r), str(r * n)), ex.question
    # the new frames' order: "subtract that from n", "n minus that", "take that from n" are n − previous
    sub_from = re.compile(r"subtract (that|the previous answer) from|minus that now|take away the result|take that from",
                          re.I)
    checked = 0
    for ex in (e for e in v14 if e.kind == "followup" and sub_from.search(e.question)):
        r, n = previous_and_new(ex)
        assert ex.answer == str(n - r), ex.question
        checked += 1
    assert checked > 30


def typed_tokens(fam: P.Family, frames) -> set[str]:
    """The tokens of each frame as `fam` can type it: in each of its letter cases, the first word as it begins the
    question and as it follows a prefix (o200k's `Product` and ` product` are different tokens)."""
    out = set()
    for frame in frames:
        frame = frame.format(a=12, b=34, n=5, e="12 + 34")
        for case in {*fam.cases, "as is"}:
            for text in (frame, "Hi, " + frame[0].lower() + frame[1:]):
                out.update(TOK.decode([i]) for i in TOK.encode_ordinary(P._case(text, case)))
    return out


def untrained_operation_words(version: int) -> set[str]:
    """Tokens of the words that name an operation or its order (P.MEANINGFUL) in held-out operator frames and
    follow-ups that no training frame of data `version` types."""
    held = P.HELDOUT
    fam = P.training_family(version)
    heldout = typed_tokens(held, [*(f for fs in held.words.values() for f in fs),
                                  *(f for fs in held.followups.values() for f in fs)])
    trained = typed_tokens(fam, [*fam.expression, *(f for fs in fam.words.values() for f in fs),
                                 *(f for fs in fam.followups.values() for f in fs)])
    return {t for t in heldout - trained if t.strip().casefold() in P.MEANINGFUL}


def assert_from_and_product_frames_answered_as_they_read(examples: list[D.Example]) -> None:
    """Version 16's frames that begin with "From" and "Product" (> 40 of them) are answered a − b and a × b."""
    begins = re.compile(r"^(?:\w+[,!:]? )*?(from [\d,]+,? take|product of [\d,]+ with)", re.I)
    asked = [ex for ex in examples if ex.kind in ("sub", "mul") and begins.search(ex.question)]
    assert len(asked) > 40
    for ex in asked:
        a, b = P.numbers(ex.question)[:2]
        assert ex.answer == str(a - b if ex.kind == "sub" else a * b), ex.question


def test_version_16_types_every_operation_word_a_heldout_question_can_begin_with():
    """Version 16: version 13 with training frames that begin with "product" and "from", so that no held-out
    question names its operation with a token training never had (version 11's family: `Product`, `From` in each
    case); the new frames are answered as they read and the held-out skeletons stay out."""
    assert untrained_operation_words(11) == {"Product", "product", "PRODUCT", "From", "from", "FROM"}
    assert untrained_operation_words(16) == set()
    assert P.training_family(16) is P.TRAIN_V16 and P.training_family(15) is P.TRAIN_V14
    assert P.training_family(13) is P.TRAIN_V11
    v16 = drawn(16)
    vocab = {TOK.decode([i]) for i in D.build_vocab(v16)}
    assert {"Product", "PRODUCT", "From", "FROM"} <= vocab
    assert_from_and_product_frames_answered_as_they_read(v16)
    trained = P.training_skeletons(16)
    assert P.training_skeletons(13) < trained
    held = heldout_skeletons()
    assert not held & trained


def _reply_texts(version: int) -> set[str]:
    """Data `version`'s fixed replies and the thoughts before them."""
    return set(D.replies(version).values()) | {t for e in D.thoughts(version).values() for t in e.values()}


def _reply_tokens(version: int) -> set[int]:
    return {t for text in _reply_texts(version) for t in TOK.encode_ordinary(text)}


def test_version17_asks_version11s_questions_with_only_the_fixed_replies_reworded():
    """Version 17 draws version 11's conversations (same seed: same questions, answers, calls and histories);
    the messages that differ are version 17's fixed replies and the thoughts before them."""
    v17_texts = _reply_texts(17)
    changed = 0
    for a, b in zip(D.generate(5, 3000, version=11), D.generate(5, 3000, version=17), strict=True):
        assert (a.kind, a.effort, a.tools, a.question, a.answer, a.call) == (b.kind, b.effort, b.tools, b.question,
                                                                              b.answer, b.call)
        for x, y in zip(a.messages, b.messages, strict=True):
            if x != y:
                changed += 1
                # an analysis may restate the request first (`7607096 + 2` newline, then the thought)
                assert y["role"] == "assistant" and any(y["content"].endswith(t) for t in v17_texts), (x, y)
    assert changed > 300
    assert D.replies(11)["no_earlier"] == D.NO_EARLIER and D.replies(1)["too_big"] == D.TOO_BIG


def test_version17_replies_use_no_heldout_word_that_training_questions_lack():
    """A held-out question's word that no training question has, but that the model writes in its fixed replies
    and nowhere in its answers to in-scope questions, reads as a cue for those replies (version 11: `add up 9398
    and 4883` declined with SKILLS_LINE's "up to 4 digits", `Hi there,` answered with NO_EARLIER's "there is no
    earlier answer"). Version 17's replies have none; the same check finds ` up` and ` there` in version 11's."""
    rng = random.Random(3)
    in_scope = ("add", "sub", "mul", "calc", "convert", "json", "followup")
    held = set()  # the words of held-out in-scope questions
    for _ in range(400):
        for kind in in_scope:
            ex = D.make_example(rng, kind, heldout=True, phrasing="heldout", version=17)
            held.update(TOK.encode_ordinary(ex.question))
    asked, answered = set(), set()  # words of training questions; words of in-scope answers and their analyses
    for ex in D.generate(0, 20_000, version=17):
        if not D.user_free_text(ex):
            asked.update(t for m in ex.messages if m["role"] == "user" for t in TOK.encode_ordinary(m["content"]))
        if ex.kind in in_scope:
            answered.update(t for m in ex.messages if m["role"] == "assistant" and isinstance(m["content"], str)
                            for t in TOK.encode_ordinary(m["content"]))
    cues = lambda version: {TOK.decode([t]) for t in (_reply_tokens(version) & held) - asked - answered}  # noqa: E731
    assert cues(17) == set()
    assert {" up", " there"} <= cues(11)


SEPARATED_THEN_COMMA = re.compile(r"\d,\d{3}, ")  # `5,427, subtract`


def assert_comma_frames_answered_as_they_read(examples: list[D.Example], frames: str) -> None:
    """The questions a comma frame matching `frames` asks (> 50 of them) are answered with a, the number before
    the comma, as the first operand."""
    asked = [ex for ex in examples if re.search(frames, ex.question, re.I)]
    assert len(asked) > 50
    for ex in asked:
        a, b = P.numbers(ex.question)[:2]
        want = {"add": a + b, "sub": a - b, "mul": a * b}.get(ex.kind)
        assert want is None or ex.answer == str(want), ex.question


def test_version18_puts_a_comma_after_a_separated_first_operand_in_words_version11_knows():
    """Version 18: version 11's family with training frames that put a comma right after the first operand
    (`Take 5,427, subtract 2829.`), so that a separated number followed by `, ` is not read as the start of a
    seven-digit one; the rest is version 11's (replies, thoughts, reasoning), the held-out skeletons stay out,
    and every token the new frames can type is in version 11's vocabulary (a version-11 model can continue on
    it: `[demo] init_from` requires the same vocabulary rows)."""
    assert P.training_family(18) is P.TRAIN_V18 and P.question_version(18) == 11
    assert P.training_family(17) is P.TRAIN_V11 and P.training_family(16) is P.TRAIN_V16
    assert D.replies(18) == D.replies(11) and D.thoughts(18) == D.thoughts(11) != D.thoughts(17)
    trained = P.training_skeletons(18)
    assert P.training_skeletons(11) < trained
    assert not heldout_skeletons() & trained
    v11, v18 = (drawn(v) for v in (11, 18))
    arithmetic = ("add", "sub", "mul", "calc")
    def comma(exs: list[D.Example]) -> list[D.Example]:
        return [ex for ex in exs if ex.kind in arithmetic and SEPARATED_THEN_COMMA.search(ex.question)]

    assert len(comma(v18)) > 5 * len(comma(v11)) and len(comma(v18)) > 60
    # the new frames are answered as they read: a is the separated number before the comma
    assert_comma_frames_answered_as_they_read(
        comma(v18), r"\d, (?:then )?(?:add|plus|subtract|take away|minus|multiply it by|times) ")
    new = [f for op in OPS for f in P.TRAIN_V18.words[op] if f not in P.TRAIN_V11.words[op]]
    assert len(new) == 9 and all("{a}," in f for f in new)
    vocab11 = {TOK.decode([i]) for i in D.build_vocab(v11)}
    assert typed_tokens(P.TRAIN_V18, new) - {"12", "34", "5"} <= vocab11
    # the same shares of kinds and efforts as version 11 (only the frames differ)
    for field in ("kind", "effort"):
        for value in {getattr(ex, field) for ex in v11}:
            count = lambda exs: sum(getattr(ex, field) == value for ex in exs)  # noqa: E731
            assert abs(count(v11) - count(v18)) < 400, (field, value)


def test_version19_adds_version16s_from_and_product_frames_to_version18():
    """Version 19: version 18 with the frames of version 16 that begin with "From" and "Product", so that no
    held-out question names its operation with a token training never had; its vocabulary is version 11's and
    those words' tokens (a version-11 model continues on it with its vocabulary grown)."""
    assert P.training_family(19) is P.TRAIN_V19 and P.question_version(19) == 11
    assert untrained_operation_words(18) == untrained_operation_words(11) != set()
    assert untrained_operation_words(19) == set()
    trained = P.training_skeletons(19)
    assert P.training_skeletons(18) < trained and not heldout_skeletons() & trained
    v11, v19 = (drawn(v) for v in (11, 19))
    vocab11, vocab19 = ({TOK.decode([i]) for i in D.build_vocab(exs)} for exs in (v11, v19))
    frames = [f for op in OPS for f in P.TRAIN_V19.words[op] if f not in P.TRAIN_V18.words[op]]
    words = {"From", "FROM", "Product", "PRODUCT", "product"}
    assert typed_tokens(P.TRAIN_V19, frames) - {"12", "34", "5"} - vocab11 == words <= vocab19
    assert_from_and_product_frames_answered_as_they_read(v19)


def test_version20_keeps_version19s_comma_frames_that_do_not_read_like_a_follow_up():
    """Version 20: version 19 without the comma frames that say "then" or "it" (`Take {a}, then times {b}`), which
    read like a follow-up on an earlier answer; still a comma after a separated first operand in many questions,
    no held-out skeleton, every operation word trained, and no token version 19's vocabulary lacks."""
    assert P.training_family(20) is P.TRAIN_V20 and P.question_version(20) == 11
    assert D.replies(20) == D.replies(11) and D.thoughts(20) == D.thoughts(11)
    new = [f for op in OPS for f in P.TRAIN_V20.words[op] if f not in P.TRAIN_V11.words[op]]
    assert len(new) == 10 and all("{a}," in f or f.startswith("From") or f.startswith("Product") for f in new)
    assert not any(re.search(r"\b(then|it|that)\b", f, re.I) for f in new)
    assert all(set(P.TRAIN_V11.words[op]) <= set(P.TRAIN_V20.words[op]) for op in OPS)  # version 11's frames kept
    trained = P.training_skeletons(20)
    assert P.training_skeletons(11) < trained and not heldout_skeletons() & trained
    assert untrained_operation_words(20) == set()
    v19, v20 = (drawn(v) for v in (19, 20))
    assert typed_tokens(P.TRAIN_V20, new) - {"12", "34", "5"} <= {TOK.decode([i]) for i in D.build_vocab(v19)}
    arithmetic = ("add", "sub", "mul", "calc")
    assert sum(ex.kind in arithmetic and bool(SEPARATED_THEN_COMMA.search(ex.question)) for ex in v20) > 60
    assert_from_and_product_frames_answered_as_they_read(v20)
    assert_comma_frames_answered_as_they_read(v20, r"\d, (?:add|plus|subtract|minus|multiply by|times) ")


def test_probes_draw_heldout_questions_of_their_shape_with_the_answers_they_read_as():
    """experiments/demo/comma_probe.py and frame_probe.py: each item is a held-out-family question (no training
    skeleton) of the probed shape, and its expected answer is what the question asks."""
    import repo_scripts

    comma, frames = (repo_scripts.load(f"experiments/demo/{name}.py") for name in ("comma_probe", "frame_probe"))
    trained = P.training_skeletons(11)
    items = comma.probe_items(15, seed=3)
    assert [ex.kind for ex in items] == ["sub"] * 15 + ["too_big"] * 15
    for ex in items:
        assert P.skeleton(ex.question) not in trained
        if ex.kind == "sub":  # `From 5,427, subtract 2829.`: the held-out frame, a separated first operand
            assert SEPARATED_THEN_COMMA.search(ex.question) and re.search(r"from [\d,]+, subtract", ex.question, re.I)
            a, b = P.numbers(ex.question)[:2]
            assert a >= 1000 and ex.answer == str(a - b), ex.question
        else:
            assert comma.SEPARATED_BIG.search(ex.question) and ex.answer is None
    per_frame = frames.probe_items(4, seed=3)
    assert len(per_frame) == 4 * 15
    for frame, ex in per_frame:
        assert frame in P.HELDOUT.words[ex.kind] and frames.frame_pattern(frame).search(ex.question)
        assert P.skeleton(ex.question) not in trained
        a, b = P.numbers(ex.question)[:2]
        if "{b}" in frame.split("{a}")[0]:  # `What is {b} subtracted from {a}?`: the numbers in the other order
            a, b = b, a
        assert ex.answer == str({"add": a + b, "sub": a - b, "mul": a * b}[ex.kind]), ex.question


def test_version21_trains_with_between_operands_result_first_and_answer_second_follow_ups():
    """Version 21: version 11's family with training frames in the shapes where run 29's lineage declines held-out
    in-scope questions ("with" between the operands, a question beginning "Result"/"Answer", the earlier answer
    second in a question frame). The held-out frames stay out (skeletons disjoint, and no new frame is a held-out
    frame up to case and end punctuation); the new frames are asked often and answered as they read."""
    assert P.training_family(21) is P.TRAIN_V21 and P.question_version(21) == 11
    assert D.replies(21) == D.replies(11) and D.thoughts(21) == D.thoughts(11)
    trained = P.training_skeletons(21)
    assert P.training_skeletons(11) < trained
    assert not (heldout_skeletons() | heldout_followup_skeletons()) & trained
    bare = lambda frames: {f.rstrip("?.!").casefold() for f in frames}  # noqa: E731
    held = bare(P.HELDOUT.expression) | bare(f for fs in [*P.HELDOUT.words.values(), *P.HELDOUT.followups.values()]
                                             for f in fs)
    new = [f for f in P.TRAIN_V21.expression if f not in P.TRAIN_V11.expression]
    new += [f for op in OPS for f in P.TRAIN_V21.words[op] if f not in P.TRAIN_V11.words[op]]
    new += [f for op in P.TRAIN_V21.followups for f in P.TRAIN_V21.followups[op] if f not in P.TRAIN_V11.followups[op]]
    assert len(new) == 13 and not bare(new) & held
    v21 = drawn(21)
    mul_with = [ex for ex in v21 if ex.kind == "mul" and re.search(r"\d\)?\]?\"? with ", ex.question, re.I)]
    result_first = [ex for ex in v21 if ex.kind in ("add", "sub", "mul")
                    and re.match(r"^(?:\w+[,!:]? )*?(?:the )?(?:result|answer)\b(?! this)", ex.question, re.I)]
    answer_second = [ex for ex in v21 if ex.kind == "followup"
                     and re.search(r"(?:how much is|calculate) [\d,]+ minus|away from [\d,]+\W*$", ex.question, re.I)]
    assert len(mul_with) > 40 and len(result_first) > 100 and len(answer_second) > 15
    for ex in mul_with:  # "with" joins the operands: a × b whichever comes first
        a, b = P.numbers(ex.question)[:2]
        assert ex.answer == str(a * b), ex.question
    assert_own_result(result_first)  # its own numbers' result, not a reference to an earlier answer
    for ex in answer_second:  # the new number first: n − the previous answer
        r, n = previous_and_new(ex)
        assert ex.answer == str(n - r), ex.question
    assert_kind_shares_of_version11(v21)


def test_version22_is_version21_with_version20s_frames():
    """Version 22: version 21's family with the frames version 20 adds to version 11 (a comma after the first
    operand, "From"/"Product" first); still no held-out skeleton, and those frames answered as they read."""
    assert P.training_family(22) is P.TRAIN_V22 and P.question_version(22) == 11
    for op in OPS:
        added = [f for f in P.TRAIN_V20.words[op] if f not in P.TRAIN_V11.words[op]]
        assert P.TRAIN_V22.words[op] == P.TRAIN_V21.words[op] + tuple(added)
    assert P.TRAIN_V22.expression == P.TRAIN_V21.expression and P.TRAIN_V22.followups == P.TRAIN_V21.followups
    trained = P.training_skeletons(22)
    assert P.training_skeletons(21) < trained and P.training_skeletons(20) < trained
    assert not (heldout_skeletons() | heldout_followup_skeletons()) & trained
    v22 = drawn(22)
    assert_from_and_product_frames_answered_as_they_read(v22)
    assert_comma_frames_answered_as_they_read(v22, r"\d, (?:add|plus|subtract|minus|multiply by|times) ")


def test_version23_trains_a_short_word_before_the_expression_and_more_follow_up_frames():
    """Version 23: version 22's family with a short word (`Ok`, `Well`, `Next`, `Also`) right before the
    expression, questions beginning "So ..." with words between "So" and the expression (the held-out `So {e}?`
    puts it right before), and three follow-up frames. No held-out skeleton or frame; the new frames are asked and
    answered as they read: the expression's own result, and n minus the previous answer for `... it from {n}`."""
    assert P.training_family(23) is P.TRAIN_V23 and P.question_version(23) == 11
    assert D.replies(23) == D.replies(11) and D.thoughts(23) == D.thoughts(11)
    assert P.TRAIN_V23.words == P.TRAIN_V22.words
    trained = P.training_skeletons(23)
    assert P.training_skeletons(22) < trained
    assert not (heldout_skeletons() | heldout_followup_skeletons()) & trained
    bare = lambda frames: {f.rstrip("?.!").casefold() for f in frames}  # noqa: E731
    held = bare(P.HELDOUT.expression) | bare(f for fs in P.HELDOUT.followups.values() for f in fs)
    new = [f for f in P.TRAIN_V23.expression if f not in P.TRAIN_V22.expression]
    new_followups = [f for op in P.TRAIN_V23.followups for f in P.TRAIN_V23.followups[op]
                     if f not in P.TRAIN_V22.followups[op]]
    assert len(new) == 6 and len(new_followups) == 3 and not bare(new + new_followups) & held
    assert not any(re.match(r"so\W*\{e\}", f, re.I) for f in new)  # the held-out shape itself stays out
    v23 = drawn(23)
    opener = [ex for ex in v23 if ex.kind in ("add", "sub", "mul")
              and re.match(r"^(?:\w+[,!:]? )*?(?:ok|well|next|also) [\d(\[\"]", ex.question, re.I)]
    so_first = [ex for ex in v23 if ex.kind in ("add", "sub", "mul") and re.match(r"^so,? (?:what's|how much is) ",
                                                                                     ex.question, re.I)]
    it_from = [ex for ex in v23 if ex.kind == "followup" and re.search(r"subtract it from [\d,]+", ex.question, re.I)]
    assert len(opener) > 100 and len(so_first) > 40 and len(it_from) > 10
    assert_own_result(opener + so_first)
    for ex in it_from:
        r, n = previous_and_new(ex)
        assert ex.answer == str(n - r), ex.question
    assert_kind_shares_of_version11(v23)
