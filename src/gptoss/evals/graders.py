"""Tasks of `gptoss eval`: reading the JSONL files, building the prompts, extracting and scoring answers.

Pure functions, no network: the runner (runner.py) sends the prompts and calls `grade`. Expected JSONL
fields (one object per line; `id` optional everywhere, the line number otherwise):

    aime         {"id", "problem": str, "answer": int 0..999}
    gpqa         {"id", "question": str, "correct_answer": str, "incorrect_answers": [str, str, str]}
    healthbench  {"prompt_id", "prompt": [{"role", "content"}, ...], "rubrics": [{"criterion": str,
                  "points": number ≠ 0, "tags": [...]}, ...]}

Extraction is strict on purpose: a reply with no final answer, with several different answers, or with an
answer in the wrong format scores as wrong, never as a guess.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GptOssError

LETTERS = "ABCD"


class EvalDataError(GptOssError):
    """A task file that is missing, not JSONL, or lacks a field; the message names the file, line and field."""


@dataclass
class Item:
    """One question of a task, ready to send: the chat messages and what grading needs."""

    id: str
    messages: list[dict[str, str]]
    reference: Any  # aime: int; gpqa: the correct letter; healthbench: the rubric list
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading task files
def read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise EvalDataError(f"{path}: not a UTF-8 text file") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise EvalDataError(f"{path}:{number}: each line must be a JSON object, got {type(obj).__name__}")
        rows.append((number, obj))
    if not rows:
        raise EvalDataError(f"{path}: no items")
    return rows


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in obj:
        raise EvalDataError(f"{where}: missing field '{name}'")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise EvalDataError(f"{where}: field '{name}' must be {names}, got {type(value).__name__}")
    return value


def load_items(task: str, path: str | Path, seed: int = 0, sample: int = 0) -> list[Item]:
    """The items of `task` from `path`. gpqa's options are shuffled per (seed, item id, sample)."""
    loaders = {"aime": _aime_item, "gpqa": _gpqa_item, "healthbench": _healthbench_item}
    if task not in loaders:
        raise EvalDataError(f"unknown task {task!r}; known: {', '.join(loaders)}")
    items, seen = [], set()
    for number, obj in read_jsonl(path):
        where = f"{path}:{number}"
        item = loaders[task](obj, where, str(obj.get("id", obj.get("prompt_id", number))), seed, sample)
        if item.id in seen:
            raise EvalDataError(f"{where}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    return items


# ---------------------------------------------------------------- AIME: an integer 0..999
AIME_INSTRUCTION = "Solve the problem. Put the final answer, an integer from 0 to 999, in \\boxed{}."


def _aime_item(obj: dict[str, Any], where: str, id: str, seed: int, sample: int) -> Item:
    problem = _field(obj, "problem", str, where)
    answer = _field(obj, "answer", (int, str), where)
    try:
        answer = int(str(answer).strip())
    except ValueError:
        raise EvalDataError(f"{where}: field 'answer' must be an integer, got {answer!r}") from None
    if not 0 <= answer <= 999:
        raise EvalDataError(f"{where}: field 'answer' must lie in 0..999 (AIME), got {answer}")
    return Item(id, [{"role": "user", "content": f"{problem}\n\n{AIME_INSTRUCTION}"}], answer)


_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_INTEGER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})*(?![\w.]*\d)")


def _as_integer(text: str) -> int | None:
    text = text.strip().strip("$").strip().replace(",", "")
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def extract_integer(final: str | None) -> int | None:
    """The integer answer of a final-channel reply: the last \\boxed{...} if any (it must hold an integer),
    else the only integer in the text. No text, a non-integer box, or several different integers → None."""
    if not final or not final.strip():
        return None
    boxed = _BOXED.findall(final)
    if boxed:
        return _as_integer(boxed[-1])
    values = {int(m.replace(",", "")) for m in _INTEGER.findall(final)}
    return values.pop() if len(values) == 1 else None


# ---------------------------------------------------------------- GPQA: multiple choice
GPQA_INSTRUCTION = "Answer with the letter of the correct option on the last line, as 'Answer: X'."


def shuffled_options(correct: str, incorrect: list[str], seed: int, id: str, sample: int) -> tuple[list[str], str]:
    """The four options in a per-(seed, id, sample) order, and the correct one's letter."""
    options = [correct, *incorrect]
    random.Random(f"gpqa:{seed}:{id}:{sample}").shuffle(options)
    return options, LETTERS[options.index(correct)]


def _gpqa_item(obj: dict[str, Any], where: str, id: str, seed: int, sample: int) -> Item:
    question = _field(obj, "question", str, where)
    correct = _field(obj, "correct_answer", str, where)
    incorrect = _field(obj, "incorrect_answers", list, where)
    if len(incorrect) != 3 or not all(isinstance(x, str) for x in incorrect):
        raise EvalDataError(f"{where}: field 'incorrect_answers' must be a list of 3 strings")
    options, letter = shuffled_options(correct, incorrect, seed, id, sample)
    body = "\n".join(f"{L}) {o}" for L, o in zip(LETTERS, options))
    return Item(id, [{"role": "user", "content": f"{question}\n\n{body}\n\n{GPQA_INSTRUCTION}"}], letter,
                {"options": options})


_ANSWER_LETTER = re.compile(r"answer\s*(?:is)?\s*[:：]?\s*\**\(?([A-Da-d])\)?\**(?![\w])", re.IGNORECASE)
_LONE_LETTER = re.compile(r"^\s*\(?([A-D])\)?[.)]?\s*$")


def extract_letter(final: str | None) -> str | None:
    """The chosen option of a final-channel reply: every 'Answer: X' (also 'answer is (X)', \\boxed{X});
    they must agree. A bare letter as the whole reply counts too. Anything else → None."""
    if not final or not final.strip():
        return None
    found = [m.upper() for m in _ANSWER_LETTER.findall(final)]
    found += [b.strip().upper() for b in _BOXED.findall(final) if b.strip().upper() in LETTERS]
    if found:
        return found[0] if len(set(found)) == 1 else None
    lone = _LONE_LETTER.match(final)
    return lone.group(1) if lone else None


# ---------------------------------------------------------------- HealthBench: rubric points
def _healthbench_item(obj: dict[str, Any], where: str, id: str, seed: int, sample: int) -> Item:
    prompt = _field(obj, "prompt", list, where)
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise EvalDataError(f"{where}: prompt[{i}] must be {{'role': system|developer|user|assistant, "
                                f"'content': str}}")
    rubrics = _field(obj, "rubrics", list, where)
    if not rubrics:
        raise EvalDataError(f"{where}: field 'rubrics' is empty")
    for i, r in enumerate(rubrics):
        if not isinstance(r, dict) or not isinstance(r.get("criterion"), str) \
                or not isinstance(r.get("points"), (int, float)) or isinstance(r.get("points"), bool) or r["points"] == 0:
            raise EvalDataError(f"{where}: rubrics[{i}] must be {{'criterion': str, 'points': nonzero number}}")
    if not any(r["points"] > 0 for r in rubrics):
        raise EvalDataError(f"{where}: rubrics need at least one criterion with positive points")
    return Item(id, [{"role": m["role"], "content": m["content"]} for m in prompt], rubrics)


GRADER_TEMPLATE = """You are grading one reply of an AI assistant in a health conversation against one rubric item.

# Conversation
{conversation}

# Reply to grade
{reply}

# Rubric item
{criterion}

Does the reply meet the rubric item? If the item describes something undesirable, "met" means the reply
does that undesirable thing. Answer with JSON only: {{"explanation": "<one sentence>", "criteria_met": true or false}}"""


def grader_prompt(conversation: list[dict[str, str]], reply: str, criterion: str) -> str:
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in conversation)
    return GRADER_TEMPLATE.format(conversation=text, reply=reply or "(no reply)", criterion=criterion)


def parse_grader_verdict(text: str | None) -> bool | None:
    """criteria_met from the grader's reply (a JSON object, possibly inside a code fence); None if absent."""
    if not text:
        return None
    for match in re.finditer(r"\{.*?\}", text, re.DOTALL):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("criteria_met"), bool):
            return obj["criteria_met"]
    return None


def rubric_score(rubrics: list[dict[str, Any]], met: list[bool]) -> float:
    """HealthBench's per-example score: points of the criteria met (negative ones subtract) over the sum of
    the positive points. Unclipped here; the task score is the mean over examples, clipped to [0, 1]."""
    possible = sum(r["points"] for r in rubrics if r["points"] > 0)
    return sum(r["points"] for r, m in zip(rubrics, met) if m) / possible


def clip01(x: float) -> float:
    return min(1.0, max(0.0, x))
