"""The demo's synthetic training data: the hand-worked arithmetic is right, the tool round trips use the real
tools, the loss mask covers exactly what the model writes, the held-out set is disjoint from training."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from gptoss import harmony
from gptoss.demo import data as D
from gptoss.demo.eval import call_matches, final_number, heldout, same_number
from gptoss.demo.tools import DEMO_TOOLS
from gptoss.tokenizer import get_tokenizer
from gptoss.tools import run_tool

TOK = get_tokenizer()


def replay_columns(work: str, op: str) -> list[int]:
    """Re-check every column line of a worked answer; returns the digits written, least significant first."""
    digits = []
    carry = 0
    for line in work.splitlines():
        line = line.split(": ", 1)[-1].split(",")[0]
        if op == "+" and (m := re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d+)", line)):
            x, y, c, t = map(int, m.groups())
            assert c == carry and t == x + y + c
            digits.append(t % 10)
            carry = t // 10
        elif op == "-" and (m := re.fullmatch(r"(\d+)-(\d)-(\d)=(\d)", line)):
            top, y, b, d = map(int, m.groups())
            assert b == carry and d == top - y - b and 0 <= d <= 9 and (top < 10 or top - 10 - b < y)
            digits.append(d)
            carry = int(top >= 10)
        elif op == "*" and (m := re.fullmatch(r"(\d)\*(\d)=(\d+)\+(\d)=(\d+)", line)):
            x, y, p, c, t = map(int, m.groups())
            assert p == x * y and c == carry and t == p + c
            digits.append(t % 10)
            carry = t // 10
    return digits + ([carry] if carry and op != "-" else [])


@pytest.mark.parametrize("effort", D.EFFORTS)
def test_worked_arithmetic_is_right_column_by_column(effort):
    rng = random.Random(7)
    for _ in range(300):
        a, b, m = D.number(rng), D.number(rng), rng.randint(0, 9)
        for op, (work, result), want in [("+", D.work_add(a, b, effort), a + b), ("-", D.work_sub(a, b, effort), a - b),
                                         ("*", D.work_mul(a, m, effort), a * m)]:
            assert result == want
            written = int("".join(map(str, replay_columns(work, op)[::-1])))
            assert written == abs(want), (work, want)
            spelled = work.splitlines()[-1 if effort == "low" else -2].removeprefix("digits: ")
            assert int(spelled.replace(" ", "")) == abs(want) if op != "-" or a >= b else True


def test_reasoning_length_follows_the_effort():
    lengths = {e: [] for e in D.EFFORTS}
    rng = random.Random(0)
    for _ in range(200):
        a, b = D.number(rng), D.number(rng)
        for e in D.EFFORTS:
            lengths[e].append(len(TOK.encode(D.work_add(a, b, e)[0])))
    mean = {e: sum(v) / len(v) for e, v in lengths.items()}
    assert mean["low"] * 1.5 < mean["medium"] and mean["medium"] * 1.3 < mean["high"], mean


def test_examples_answer_correctly_and_tools_answer_what_the_data_says():
    for ex in D.generate(seed=3, n=600):
        last = ex.messages[-1]
        assert last["role"] == "assistant" and last["channel"] == "final"
        if ex.kind in ("add", "sub", "mul"):
            a, op, b, result = re.fullmatch(r"(\d+) ([-+×]) (\d+) = (-?\d+)", last["content"]).groups()
            assert int(result) == {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
            assert sorted(re.findall(r"\d+", ex.question)[:2]) == sorted([a, b]) and result == ex.answer
        elif ex.kind in ("calc", "convert"):
            call, result = ex.messages[-3], ex.messages[-2]
            assert call["recipient"] == f"functions.{ex.call['name']}" and call["content_type"] == "json"
            assert call_matches({"name": ex.call["name"], "arguments": call["content"]}, ex.call)
            assert run_tool(DEMO_TOOLS[ex.call["name"]], call["content"]) == result["content"]  # the real tool
            assert ex.call["name"] in ex.tools and same_number(final_number(last["content"]), ex.answer)
        else:
            assert re.search(r"I don't know|I can't", last["content"]) or ex.kind == "greeting"


def test_training_mask_covers_what_the_model_writes():
    ex = next(e for e in D.generate(seed=4, n=200) if e.kind == "calc" and not e.history)
    tokens, mask = D.to_document(ex, TOK)
    assert len(tokens) == len(mask)
    written = TOK.decode([t for t, m in zip(tokens, mask) if m])
    # the analysis, then <|start|>assistant of the call (the model starts that message itself), the final
    assert written.startswith("<|channel|>analysis<|message|>") and "<|end|><|start|>assistant to=functions." in written
    assert written.endswith("<|channel|>final<|message|>" + ex.messages[-1]["content"] + "<|return|>")
    assert ex.messages[-2]["content"] not in written  # the tool's result is context, not a target
    prompt = harmony.render_conversation_for_completion([D.message(m) for m in ex.messages[:-1]], "assistant", TOK)
    assert tokens[:len(prompt)] == prompt and not any(mask[len(prompt) - 2:len(prompt)])


def test_heldout_is_disjoint_from_training_and_vocab_covers_it():
    train = list(D.generate(seed=0, n=3000))
    held = heldout(20, seed=1, train_seed=0, train_n=3000)
    assert len(held) == 20 * 7
    assert not {D.question_key(e) for e in train} & {D.question_key(e) for e in held}
    vocab = set(D.build_vocab(train))
    for ex in held:
        if not D.user_free_text(ex):
            tokens, _ = D.to_document(ex, TOK)
            assert set(tokens) <= vocab, TOK.decode(sorted(set(tokens) - vocab))


def test_cli_writes_jsonl(tmp_path):
    assert D.main(["--out", str(tmp_path), "--seed", "5", "--n", "50"]) == 0
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == 50 and all("messages" in json.loads(line) for line in lines)
    assert len(json.loads((tmp_path / "vocab.json").read_text())) > 1110  # numbers 0..999 + the rest


class Oracle(torch.nn.Module):
    """Predicts the true next token from the teacher-forced input, except (when `slip`) before digit tokens."""

    def __init__(self, slip: bool):
        super().__init__()
        self.slip, self.device = slip, torch.device("cpu")

    def forward(self, tokens):
        nxt = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)
        if self.slip:
            digit = torch.tensor([TOK.decode([t]).isdigit() for t in nxt[0].tolist()])
            nxt = torch.where(digit, torch.full_like(nxt, TOK.endoftext), nxt)
        return torch.nn.functional.one_hot(nxt, 201_088).float()


def test_teacher_forced_counts_every_slip_on_what_the_model_writes():
    from gptoss.demo.eval import teacher_forced

    right = teacher_forced(Oracle(False), n=3, train_n=2000)
    assert right["conversations"] == 9 and right["all_right"] == 9 and right["token_errors"] == 0
    slips = teacher_forced(Oracle(True), n=3, train_n=2000)
    written_digits = 0
    for ex in heldout(3, train_n=2000):
        if ex.kind in ("add", "sub", "mul"):
            tokens, mask = D.to_document(ex, TOK, current_turn_only=True)
            written_digits += sum(m and TOK.decode([t]).isdigit() for t, m in zip(tokens, mask))
    assert slips["token_errors"] == written_digits > 9 and slips["all_right"] == 0
    assert slips["tokens"] == right["tokens"]
    assert all(want.isdigit() and got == "<|endoftext|>" for _, want, got in slips["errors"])


def test_version_3_restates_the_request_first_and_changes_nothing_else():
    """Version 3's analysis opens with the request in canonical form (the numbers of the question without
    separators, in its order, and the operation), then says exactly what version 2 says; the questions and
    everything else are version 2's, draw for draw."""
    v2, v3 = list(D.generate(seed=5, n=400, version=2)), list(D.generate(seed=5, n=400, version=3))
    seen = set()
    for a, b in zip(v2, v3):
        assert (a.question, a.answer, a.call, a.kind) == (b.question, b.answer, b.call, b.kind)
        first2 = next(m for m in a.messages if m.get("channel") == "analysis" and m not in a.history)
        first3 = next(m for m in b.messages if m.get("channel") == "analysis" and m not in b.history)
        if b.kind == "general" or b.kind == "greeting":
            assert first3 == first2
            continue
        request, _, rest = first3["content"].partition("\n")
        assert rest == first2["content"] or first3["content"] == first2["content"]  # nothing else changed
        if b.kind in ("convert", "no_converter"):
            value = request.split()[0]
            assert re.fullmatch(r"-?[\d.]+ \w+ to \w+", request) and value.lstrip("-") in b.question
        else:
            x, op, y = request.split(" ")
            numbers = [n.replace(",", "") for n in re.findall(r"\d[\d,]*", b.question)]
            assert op in "+-*/" and sorted([x, y]) == sorted(numbers[:2]), (b.question, request)
            if b.kind in ("add", "sub", "mul"):
                assert b.messages[-1]["content"].replace("×", "*").startswith(f"{x} {op} {y} =")
        seen.add(b.kind)
    assert seen >= {"add", "sub", "mul", "calc", "convert", "too_big"}


def test_version_4_json_answers_follow_their_declared_schema():
    """Version 4's "json" kind: the developer message declares a response format (rendered as Harmony's
    "# Response Formats"), the analysis works the sum as version 3 does, and the final answer is a JSON object
    that validates against the declared schema and holds the right number."""
    jsonschema = pytest.importorskip("jsonschema")
    examples = [ex for ex in D.generate(seed=7, n=600, version=4) if ex.kind == "json"]
    assert len(examples) > 20 and {ex.messages[1]["content"]["response_format"]["name"] for ex in examples} >= {
        "arithmetic", "answer"}
    for ex in examples:
        fmt = ex.messages[1]["content"]["response_format"]
        answer = json.loads(ex.messages[-1]["content"])
        jsonschema.validate(answer, fmt["schema"])
        result_field = [k for k, v in fmt["schema"]["properties"].items() if v["type"] == "integer"][0]
        x, op, y = re.match(r"(\d+) ([-+*]) (\d+)", ex.messages[-2]["content"]).groups()
        assert answer[result_field] == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        text = TOK.decode(D.to_document(ex)[0])
        assert f"# Response Formats\n\n## {fmt['name']}\n\n" in text and text.endswith("}<|return|>")
    # versions 1-3 never draw the kind, nor any extra random number for it
    assert [ex.question for ex in D.generate(seed=7, n=200, version=3)] == \
        [ex.question for ex in D.generate(seed=7, n=200, version=2)]


def test_eval_scores_json_answers_on_heldout_phrasing():
    """From data version 4 the eval asks arithmetic with a declared response format too (held-out phrasing
    included): a structured answer counts when it is one JSON object of the schema's fields whose integer
    field is the exact result; the earlier kinds' held-out questions are the ones they were before."""
    from gptoss.demo import eval as E
    from gptoss.demo import phrasing as P

    items = E.heldout(4, train_n=2000, family="heldout", version=5)
    assert [ex.kind for ex in items][:-4] == [ex.kind for ex in E.heldout(4, train_n=2000, family="heldout",
                                                                        version=3)]
    json_items = [ex for ex in items if ex.kind == "json"]
    assert len(json_items) == 4
    trained = P.training_skeletons()
    for ex in json_items:
        assert P.skeleton(ex.question) not in trained
        fmt = E.response_format(ex)
        field = next(k for k, v in fmt["schema"]["properties"].items() if v["type"] == "integer")
        right = json.loads(ex.messages[-1]["content"])
        assert E.json_answer(ex, json.dumps(right))
        assert not E.json_answer(ex, json.dumps({**right, field: right[field] + 1}))  # wrong number
        assert not E.json_answer(ex, json.dumps({**right, field: str(right[field])}))  # a string, not an integer
        assert not E.json_answer(ex, json.dumps({**right, "extra": 1}))
        assert not E.json_answer(ex, json.dumps(right)[:-1])  # cut before it closes
        r = E.score(ex, E.Result(ex.kind, "heldout", ex.question, [], ex.answer, None, final=json.dumps(right)))
        assert r.correct and not r.repeated


def test_version_11_trains_only_what_the_model_writes_in_the_current_turn():
    """Earlier turns' answers end with <|end|> in the history (as the chat renders them), but the model wrote
    <|return|> there: from version 11 the recipe keeps them out of the loss, so that every final answer the
    model learns to write ends with <|return|>. Versions before 11 train as they did."""
    from gptoss.demo.recipe import documents

    examples = [ex for ex in D.generate(seed=0, n=400, version=11) if ex.history]
    assert len(examples) > 30
    for ex in examples:
        full, full_mask = D.to_document(ex, TOK)
        tokens, mask = D.to_document(ex, TOK, current_turn_only=True)
        assert tokens == full
        last_user = max(i for i, t in enumerate(tokens) if TOK.decode(tokens[i:i + 2]) == "<|start|>user")
        assert not any(mask[:last_user]) and mask[last_user:] == full_mask[last_user:]
        assert any(full_mask[:last_user])  # the earlier answers were targets before
        written = TOK.decode([t for t, m in zip(tokens, mask) if m])
        assert written.endswith("<|return|>") and written.count("<|channel|>final") == 1, written
    old = documents(examples, 4096, len(examples), version=10)
    new = documents(examples, 4096, len(examples), version=11)
    assert sum(sum(d.targets) for d in new) < sum(sum(d.targets) for d in old)


def test_version_12_conversations_carry_up_to_four_earlier_turns_and_are_shortened_to_fit():
    """Version 12: about 30 % of conversations have 1 to 4 earlier turns, each a user question followed by the
    final answer the chat keeps; a calculator never sits beside a declined "too big" turn; free-text history
    questions stay out of the vocabulary; the recipe drops the earliest turns of a conversation that does not fit
    seq_len instead of the whole conversation, and keeps the current turn's targets unchanged."""
    from gptoss.demo.recipe import fitted

    examples = list(D.generate(seed=0, n=1500, version=12))
    turns = [len(ex.history) // 2 for ex in examples]
    assert 0.22 < sum(t > 0 for t in turns) / len(examples) < 0.38
    assert max(turns) >= 4 and sum(t >= 3 for t in turns) > 30
    too_big = D.make_example(random.Random(0), "too_big", version=12).messages[-1]["content"]
    for ex in examples:
        roles = [m["role"] for m in ex.history]
        assert roles == ["user", "assistant"] * (len(ex.history) // 2)
        assert all(m.get("channel") == "final" for m in ex.history[1::2])
        if "calculator" in ex.tools:
            assert not any(m["content"] == too_big for m in ex.history[1::2])
        assert set(ex.free_history) <= {m["content"] for m in ex.history[::2]}
    with_free = [ex for ex in examples if ex.free_history and ex.question not in ex.free_history]
    assert with_free
    for ex in with_free[:20]:  # a free-text earlier question's own words are not in the vocabulary
        vocab = set(D.build_vocab([ex], TOK))
        others = set()
        for m in ex.messages:
            if m["role"] != "user" or m["content"] not in ex.free_history:
                others.update(harmony.render_message(D.message(m), TOK, has_function_tools=bool(ex.tools)))
        own = {t for q in ex.free_history for t in TOK.encode_ordinary(q)} - others
        own = {t for t in own if not TOK.decode([t]).strip().isdigit()}  # number tokens are always known
        assert own and not own & vocab, ex.free_history
    long = [ex for ex in examples if len(ex.history) >= 6]
    for ex in long[:20]:
        full, full_mask = D.to_document(ex, TOK, current_turn_only=True)
        seq_len = len(full) - 1
        tokens, mask = fitted(ex, TOK, seq_len, version=12)
        assert len(tokens) <= seq_len < len(full)
        assert TOK.decode([t for t, m in zip(tokens, mask) if m]) == TOK.decode([t for t, m in zip(full, full_mask) if m])
        shorter = D.without_earliest_turn(ex)
        assert shorter.history == ex.history[2:]
        assert shorter.messages == [m for m in ex.messages if m is not ex.history[0] and m is not ex.history[1]]
        assert fitted(ex, TOK, seq_len, version=11) == (full, full_mask)  # version 11 is left as it was


def _reasoning(ex) -> str:
    return "\n".join(m["content"] for m in ex.messages if m.get("channel") == "analysis" and m not in ex.history)


def test_version_13_restates_results_without_leading_zeros_and_trains_more_of_them():
    """Version 13: a result whose digits start with zeros (4050 − 3974: 0 0 7 6) is restated without them on a
    line of its own right before the answer, at every effort and in negated subtractions; about a fifth of
    training subtractions are such close pairs (version 11: about a tenth, nearly all with one zero); the
    held-out family draws its numbers as before; and version 12's long histories are not carried over."""
    for effort in D.EFFORTS:
        text, r = D.work_sub(4050, 3974, effort, 13)
        lines = text.split("\n")
        assert r == 76 and lines[-2:] == (["0 0 7 6", "7 6"] if effort == "low" else
                                         ["without leading zeros: 7 6", "so 4050 - 3974 = 76"]), lines
        neg, r = D.work_sub(3974, 4050, effort, 13)
        assert r == -76 and ("7 6\n" in neg) and "0 0 7 6" in neg
        assert D.work_sub(4050, 3974, effort, 12)[0] == text.replace("\n7 6", "").replace(
            "\nwithout leading zeros: 7 6", "")  # the one line added; version 12 as it was
        for work, x, y in ((D.work_sub, 9754, 1827), (D.work_add, 8, 5), (D.work_mul, 685, 7)):
            assert work(x, y, effort, 13) == work(x, y, effort, 12)  # no leading zero: unchanged
        zero, r = D.work_mul(685, 0, effort, 13)
        assert r == 0 and (zero.endswith("0 0 0\n0") if effort == "low" else
                           zero.endswith("without leading zeros: 0\nso 685 * 0 = 0"))

    def leading_zeros(examples) -> list[int]:
        out = []
        for ex in examples:
            if ex.kind == "sub":
                m = re.search(r"digits: ([0-9 ]+)\n", _reasoning(ex))
                if m:  # medium and high effort name the digits
                    ds = m.group(1).split()
                    out.append(next(i for i, d in enumerate(ds + ["1"]) if d != "0"))
        return out

    v11, v13 = (leading_zeros(D.generate(0, 6000, version=v)) for v in (11, 13))
    assert sum(z > 0 for z in v11) / len(v11) < 0.13 and sum(z > 1 for z in v11) / len(v11) < 0.01
    assert 0.22 < sum(z > 0 for z in v13) / len(v13) < 0.36 and sum(z > 1 for z in v13) / len(v13) > 0.05
    for ex in D.generate(0, 6000, version=13):
        if ex.kind == "sub":
            text = _reasoning(ex)
            m = re.search(r"digits: ([0-9 ]+)\n(without leading zeros: ([0-9 ]+)\n)?so .* = (-?[0-9]+)$", text)
            if m:
                assert m.group(1).startswith("0 ") == bool(m.group(2))
                shown = (m.group(3) or m.group(1)).split()
                assert "".join(shown) == str(abs(int(m.group(4))))  # the digits written are the answer's
    long12 = sum(len(ex.history) > 2 for ex in D.generate(0, 1500, version=12))
    long13 = sum(len(ex.history) > 2 for ex in D.generate(0, 1500, version=13))
    assert long12 > 150 and long13 == sum(len(ex.history) > 2 for ex in D.generate(0, 1500, version=11)) == 0

    def close_share(version: int) -> float:  # held-out subtractions whose result is shorter than its first number
        rng = random.Random(5)
        exs = [D.make_example(rng, "sub", phrasing="heldout", version=version) for _ in range(1500)]
        pairs = [tuple(map(int, re.match(r"(\d+) - (\d+) = ", ex.messages[-1]["content"]).groups())) for ex in exs]
        return sum(len(str(abs(a - b))) < len(str(max(a, b))) for a, b in pairs) / len(pairs)

    share11 = close_share(11)
    assert abs(close_share(13) - share11) < 0.04 < share11  # drawn as in version 11, not 20 % more
