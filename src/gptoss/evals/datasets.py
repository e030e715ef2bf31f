"""Reading the task files as their publishers ship them, and laying out the (item, sample) jobs as the reference does.

No conversion step and no download: the file the user has is read as it is.

    aime         JSONL, JSON, CSV or Parquet with a question column ("question" as in opencompass/AIME2025, the
                 file openai/gpt-oss reads; "problem" as in MathArena/aime_*, HuggingFaceH4/aime_2024,
                 AI-MO/aimo-validation-aime; "Question" as in the AIME_1983_2024 CSV; "Problem" as in
                 Maxwell-Jia/AIME_2024) and an answer column ("answer" or "Answer", an integer or a string that
                 starts with one); the id from "id", "ID" or "problem_idx" when present, else the row number.
    gpqa         the CSV of the GPQA release (gpqa_diamond.csv, gpqa_main.csv, gpqa_extended.csv, or the copy that
                 openai/simple-evals hosts): "Question", "Correct Answer", "Incorrect Answer 1".."3", "Record ID".
    healthbench  the JSONL of openai/simple-evals (the full set and the hard and consensus subsets share one layout):
                 "prompt_id", "prompt" [{role, content}], "rubrics" [{criterion, points, tags}], "example_tags".

The format is read from the content, not the file name: Parquet's magic bytes, a JSON object per line, a JSON
array, else CSV. Parquet needs pyarrow, an optional dependency (the eval extra).
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GptOssError
from . import graders

TASKS = ("aime", "gpqa", "healthbench")
LETTERS = graders.LETTERS

# task → role → the column names accepted, in order of preference (the first the file has is used).
COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "aime": {"question": ("question", "problem", "Question", "Problem"), "answer": ("answer", "Answer")},
    "gpqa": {"question": ("Question",), "correct": ("Correct Answer",), "incorrect 1": ("Incorrect Answer 1",),
             "incorrect 2": ("Incorrect Answer 2",), "incorrect 3": ("Incorrect Answer 3",)},
    "healthbench": {"prompt": ("prompt",), "rubrics": ("rubrics",)},
}
ID_COLUMNS = {"aime": ("id", "ID", "problem_idx"), "gpqa": ("Record ID",), "healthbench": ("prompt_id",)}
ROLES = ("system", "developer", "user", "assistant")


class EvalDataError(GptOssError, ValueError):
    """A task file that is missing, unreadable, or lacks a column; the message names the file, row and column."""


@dataclass
class Item:
    """One question of a task file: its id, where it came from (file:row) and the columns grading needs."""

    id: str
    where: str
    fields: dict[str, Any]


@dataclass
class Job:
    """One (item, sample): the chat messages to send and what the reply is graded against."""

    item: Item
    sample: int
    messages: list[dict[str, str]]
    expected: Any  # aime: int; gpqa: the correct letter; healthbench: the rubric list
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading a table
def read_rows(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a JSONL, JSON-array, CSV or Parquet file; `where` is "file:line" for text
    formats and "file row N" for Parquet."""
    path = Path(path)
    try:
        head = path.open("rb").read(4)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise EvalDataError(f"{path}: is a folder; give the task's file") from None
    if head == b"PAR1":
        return _parquet_rows(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # the BOM that spreadsheet exports put first
    except UnicodeDecodeError:
        raise EvalDataError(f"{path}: neither a UTF-8 text file (JSONL, JSON, CSV) nor Parquet") from None
    start = text.lstrip()[:1]
    if not start:
        raise EvalDataError(f"{path}: empty file")
    if start == "[":
        rows = _json_array_rows(path, text)
    elif start == "{":
        rows = _jsonl_rows(path, text)
    else:
        rows = _csv_rows(path, text)
    if not rows:
        raise EvalDataError(f"{path}: no rows")
    return rows


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{number}: not valid JSON ({e.msg}); JSONL needs one object per line") from None
        if not isinstance(obj, dict):
            raise EvalDataError(f"{path}:{number}: each line must be a JSON object, got {type(obj).__name__}")
        rows.append((f"{path}:{number}", obj))
    return rows


def _json_array_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    bad = next((i for i, obj in enumerate(data) if not isinstance(obj, dict)), None)
    if bad is not None:
        raise EvalDataError(f"{path}: element {bad} of the JSON array is not an object")
    return [(f"{path} element {i}", obj) for i, obj in enumerate(data)]


def _csv_rows(path: Path, text: str) -> list[tuple[str, dict[str, Any]]]:
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise EvalDataError(f"{path}: empty CSV (no header row)")
    rows = []
    for row in reader:
        if None in row:  # more cells than header names
            raise EvalDataError(f"{path}:{reader.line_num}: more cells than the header has columns")
        rows.append((f"{path}:{reader.line_num}", row))
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalDataError(f"{path}: a Parquet file; reading it needs pyarrow: pip install 'gptoss[eval]' "
                            "(or pip install pyarrow)") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's ArrowInvalid and OSError for a damaged file
        raise EvalDataError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path} row {i}", obj) for i, obj in enumerate(records)]


def _pick(path: Path, rows: list[tuple[str, dict[str, Any]]], task: str, role: str) -> str:
    """The column of the file that plays `role`; an error naming the file, the columns accepted and those found."""
    names = COLUMNS[task][role]
    columns = list(rows[0][1])
    for name in names:
        if name in rows[0][1]:
            return name
    found = ", ".join(repr(c) for c in columns[:12]) + (", ..." if len(columns) > 12 else "")
    raise EvalDataError(f"{path}: no {role} column for {task}: expected {' or '.join(repr(n) for n in names)} "
                        f"(the file's columns: {found})")


def _value(row: dict[str, Any], column: str, where: str) -> Any:
    if column not in row:
        raise EvalDataError(f"{where}: missing column {column!r}")
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()) or value != value:  # None, "", NaN
        raise EvalDataError(f"{where}: column {column!r} is empty")
    return value


# ---------------------------------------------------------------- the items of each task
def load_items(task: str, path: str | Path) -> list[Item]:
    """The items of `task` from the file at `path`, in file order."""
    if task not in TASKS:
        raise EvalDataError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    path = Path(path)
    rows = read_rows(path)
    columns = {role: _pick(path, rows, task, role) for role in COLUMNS[task]}
    id_column = next((c for c in ID_COLUMNS[task] if c in rows[0][1]), None)
    items, seen = [], {}
    for number, (where, row) in enumerate(rows, 1):
        values = {role: _value(row, column, where) for role, column in columns.items()}
        fields = {"aime": _aime_fields, "gpqa": _gpqa_fields, "healthbench": _healthbench_fields}[task](
            values, columns, row, where)
        id = str(row.get(id_column)) if id_column and row.get(id_column) not in (None, "") else str(number)
        if id in seen:
            raise EvalDataError(f"{where}: duplicate id {id!r} (also at {seen[id]})")
        seen[id] = where
        items.append(Item(id, where, fields))
    return items


def parse_answer(value: Any, where: str, column: str) -> int:
    """An AIME answer as the reference reads it: an integer, or a string whose leading digits are the answer
    (gpt_oss/evals/aime_eval.py, normalize_number: "070" → 70, "33 (mod 1000)" → 33)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise EvalDataError(f"{where}: column {column!r} must be an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise EvalDataError(f"{where}: column {column!r} must be an integer, got {value}")
        return int(value)
    if isinstance(value, int):
        return value
    digits = re.match(r"\d+", value)
    if not digits:
        raise EvalDataError(f"{where}: column {column!r} must start with an integer, got {value!r}")
    return int(digits.group(0))


def _aime_fields(values: dict[str, Any], columns: dict[str, str], row: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(values["question"], str):
        raise EvalDataError(f"{where}: column {columns['question']!r} must be text")
    return {"question": values["question"], "answer": parse_answer(values["answer"], where, columns["answer"])}


def _gpqa_fields(values: dict[str, Any], columns: dict[str, str], row: dict[str, Any], where: str) -> dict[str, Any]:
    # CSV cells are text already; other formats may hold numbers (an option "2"): the reference formats them with
    # str.format, which is str() for these.
    return {role: str(v) for role, v in values.items()}


def _healthbench_fields(values: dict[str, Any], columns: dict[str, str], row: dict[str, Any],
                        where: str) -> dict[str, Any]:
    prompt, rubrics = values["prompt"], values["rubrics"]
    if not isinstance(prompt, list) or not prompt:
        raise EvalDataError(f"{where}: column 'prompt' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise EvalDataError(f"{where}: prompt[{i}] must be {{'role': {'|'.join(ROLES)}, 'content': str}}")
    if not isinstance(rubrics, list) or not rubrics:
        raise EvalDataError(f"{where}: column 'rubrics' must be a non-empty list")
    for i, r in enumerate(rubrics):
        points = r.get("points") if isinstance(r, dict) else None
        if not isinstance(r, dict) or not isinstance(r.get("criterion"), str) \
                or not isinstance(points, (int, float)) or isinstance(points, bool) \
                or not isinstance(r.get("tags", []), list):
            raise EvalDataError(f"{where}: rubrics[{i}] must be {{'criterion': str, 'points': number, 'tags': [str]}}")
    if not any(r["points"] > 0 for r in rubrics):
        raise EvalDataError(f"{where}: rubrics need at least one criterion with positive points (the score's "
                            "denominator)")
    tags = row.get("example_tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise EvalDataError(f"{where}: column 'example_tags' must be a list of strings")
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
            "rubrics": [{"criterion": r["criterion"], "points": r["points"], "tags": list(r.get("tags", []))}
                        for r in rubrics],
            "example_tags": list(tags)}


# ---------------------------------------------------------------- jobs, in the reference's order
def select(items: list[Item], task: str, examples: int | None, rng: random.Random) -> list[Item]:
    """The reference's subset: `examples` items drawn by rng.sample (healthbench: all when there are fewer)."""
    if not examples:
        return items
    if examples < 1:
        raise EvalDataError(f"--examples must be ≥ 1, got {examples}")
    if examples >= len(items) and task == "healthbench":  # healthbench_eval.py samples only when fewer are asked
        return items
    if examples > len(items):
        raise EvalDataError(f"--examples {examples}: the file has only {len(items)} items")
    return rng.sample(items, examples)


def permutations(n_items: int, samples: int, rng: random.Random) -> list[list[int]]:
    """The option order of every (sample, item), drawn as gpt_oss/evals/gpqa_eval.py (GPQAEval.__init__) draws
    them: the item list repeated `samples` times, then one rng.sample(range(4), 4) per entry, in that order.
    Entry s·n_items + i is sample s of item i."""
    return [rng.sample(range(4), 4) for _ in range(n_items * samples)]


def jobs(task: str, items: list[Item], samples: int, seed: int = 0, examples: int | None = None,
         limit: int | None = None) -> list[Job]:
    """Every (item, sample) to ask, sample-major as the reference repeats its list. seed 0 and no `examples`
    give the reference's GPQA option orders exactly; `limit` keeps the first items of that full layout (their
    orders unchanged)."""
    rng = random.Random(seed)
    chosen = select(items, task, examples, rng)
    orders = permutations(len(chosen), samples, rng)
    out = []
    for sample in range(samples):
        for i, item in enumerate(chosen[:limit]):
            f = item.fields
            if task == "aime":
                out.append(Job(item, sample, [{"role": "user", "content": graders.aime_prompt(f["question"])}],
                               f["answer"]))
            elif task == "gpqa":
                order = orders[sample * len(chosen) + i]
                options = [(f["correct"], f["incorrect 1"], f["incorrect 2"], f["incorrect 3"])[j] for j in order]
                letter = LETTERS[options.index(f["correct"])]
                out.append(Job(item, sample, [{"role": "user", "content": graders.gpqa_prompt(f["question"], options)}],
                               letter, {"permutation": order}))
            else:
                out.append(Job(item, sample, f["prompt"], f["rubrics"], {"example_tags": f["example_tags"]}))
    return out
