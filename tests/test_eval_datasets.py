"""gptoss eval reads the datasets' own files: every AIME layout of the common releases (JSONL, Parquet, CSV), GPQA's
CSV, HealthBench's JSONL with its hard and consensus subsets; a missing column is an error naming the file, the
columns accepted and the columns found. The fixtures (tests/data/evals, gptoss/evals/examples) have the releases'
column layouts and dtypes; their questions are ours."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gptoss.evals import datasets, graders
from gptoss.evals.datasets import EvalDataError

DATA = Path(__file__).parent / "data" / "evals"
EXAMPLES = Path(graders.__file__).parent / "examples"
ANSWERS = [24, 24, 210, 391, 998]


@pytest.mark.parametrize("path,ids", [
    (EXAMPLES / "aime2025-I.jsonl", ["1", "2", "3", "4", "5"]),  # opencompass/AIME2025: question, answer (text)
    (DATA / "matharena_aime.parquet", ["1", "2", "3", "4", "5"]),  # MathArena: problem_idx, problem, answer int64
    (DATA / "h4_aime_2024.parquet", ["60", "61", "62", "63", "64"]),  # HF H4: id, problem, answer "024"
    (DATA / "aime_2024_problems.parquet", [f"2024-I-{i}" for i in range(1, 6)]),  # Maxwell-Jia: ID, Problem, Answer
    (DATA / "AIME_Dataset_1983_2024.csv", [f"1983-{i}" for i in range(1, 6)]),  # ID, Year, ..., Question, Answer
])
def test_aime_layouts(path, ids):
    items = datasets.load_items("aime", path)
    assert [i.id for i in items] == ids
    assert [i.fields["answer"] for i in items] == ANSWERS
    assert items[0].fields["question"].startswith("Find the remainder when")
    jobs = datasets.jobs("aime", items, samples=2)
    assert len(jobs) == 10 and [j.sample for j in jobs] == [0] * 5 + [1] * 5
    assert jobs[0].messages == [{"role": "user", "content": graders.aime_prompt(items[0].fields["question"])}]


def test_aime_json_array_and_csv_with_multiline_cells(tmp_path):
    rows = [{"problem": "a\nb", "answer": 7}, {"problem": "c", "answer": "008"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert [i.fields for i in datasets.load_items("aime", tmp_path / "a.json")] == [
        {"question": "a\nb", "answer": 7}, {"question": "c", "answer": 8}]
    items = datasets.load_items("aime", DATA / "AIME_Dataset_1983_2024.csv")
    assert items[1].fields["question"].endswith("\nGive the number.")


@pytest.mark.parametrize("path,n", [(EXAMPLES / "gpqa_diamond.csv", 5), (DATA / "gpqa_main.csv", 3)])
def test_gpqa_csv(path, n):
    items = datasets.load_items("gpqa", path)
    assert len(items) == n and items[0].id == "recG1"
    assert items[0].fields == {"question": "Which particle mediates the electromagnetic force?\n",
                               "correct": "Photon", "incorrect 1": "Gluon", "incorrect 2": "W boson",
                               "incorrect 3": "Graviton"}
    assert items[2].fields["question"].endswith('"by far"?')  # quotes and commas inside a quoted cell


@pytest.mark.parametrize("path,ids", [
    (EXAMPLES / "healthbench.jsonl", ["hb-1", "hb-2", "hb-3"]),
    (DATA / "hard_healthbench.jsonl", ["hb-2", "hb-3"]),
    (DATA / "consensus_healthbench.jsonl", ["hb-2"]),
])
def test_healthbench_jsonl_and_subsets(path, ids):
    items = datasets.load_items("healthbench", path)
    assert [i.id for i in items] == ids
    job = datasets.jobs("healthbench", items, 1)[0]
    assert job.messages[-1]["role"] == "user" and job.expected == items[0].fields["rubrics"]
    assert all(r["tags"] for r in job.expected) and job.extra["example_tags"][0].startswith("theme:")


@pytest.mark.parametrize("task,path,message", [
    ("gpqa", EXAMPLES / "aime2025-I.jsonl", r"aime2025-I.jsonl: no question column for gpqa: expected 'Question' "
                                            r"\(the file's columns: 'question', 'answer'\)"),
    ("aime", EXAMPLES / "gpqa_diamond.csv", r"gpqa_diamond.csv: no answer column for aime: expected 'answer' or "
                                            r"'Answer' \(the file's columns: 'Pre-Revision Question'.*, \.\.\.\)"),
    ("healthbench", EXAMPLES / "aime2025-I.jsonl", r"no prompt column for healthbench: expected 'prompt'"),
    ("aime", DATA / "matharena_aime.parquet", None),
])
def test_a_missing_column_names_the_file_and_the_columns(task, path, message):
    if message is None:
        datasets.load_items(task, path)
        return
    with pytest.raises(EvalDataError, match=message):
        datasets.load_items(task, path)


@pytest.mark.parametrize("task,text,message", [
    ("aime", '{"question": "q", "answer": "1"}\n{"question": "q2"}\n', r"a.txt:2: missing column 'answer'"),
    ("aime", '{"question": "q", "answer": "x1"}\n', r"a.txt:1: column 'answer' must start with an integer"),
    ("aime", '{"question": "q", "answer": ""}\n', r"a.txt:1: column 'answer' is empty"),
    ("aime", '{"question": "q", "answer": 1}\n{not json\n', r"a.txt:2: not valid JSON"),
    ("aime", '{"question": "q", "answer": 1, "id": 3}\n{"question": "r", "answer": 2, "id": 3}\n',
     r"a.txt:2: duplicate id '3' \(also at .*a.txt:1\)"),
    ("aime", "question,answer\nq,1,extra\n", r"a.txt:2: more cells than the header has columns"),
    ("aime", "", r"a.txt: empty file"), ("aime", "question,answer\n", r"a.txt: no rows"),
    ("gpqa", "Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\nq,a,b,,d\n",
     r"a.txt:2: column 'Incorrect Answer 2' is empty"),
    ("healthbench", '{"prompt": [{"role": "nurse", "content": "x"}], "rubrics": [{"criterion": "c", "points": 1}]}',
     r"a.txt:1: prompt\[0\] must be"),
    ("healthbench", '{"prompt": [{"role": "user", "content": "x"}], "rubrics": []}', r"'rubrics' must be a non-empty"),
    ("healthbench", '{"prompt": [{"role": "user", "content": "x"}], "rubrics": [{"criterion": "c", "points": -1}]}',
     r"at least one criterion with positive points"),
])
def test_bad_rows_name_the_row_and_column(tmp_path, task, text, message):
    (tmp_path / "a.txt").write_text(text)
    with pytest.raises(EvalDataError, match=message):
        datasets.load_items(task, tmp_path / "a.txt")


def test_missing_file_folder_and_binary(tmp_path):
    with pytest.raises(EvalDataError, match="nope.jsonl: file not found"):
        datasets.load_items("aime", tmp_path / "nope.jsonl")
    with pytest.raises(EvalDataError, match="is a folder"):
        datasets.load_items("aime", tmp_path)
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(EvalDataError, match="neither a UTF-8 text file"):
        datasets.load_items("aime", tmp_path / "b.bin")


def test_parquet_without_pyarrow_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(EvalDataError, match=r"matharena_aime.parquet: a Parquet file; reading it needs pyarrow: "
                                            r"pip install 'gptoss\[eval\]'"):
        datasets.load_items("aime", DATA / "matharena_aime.parquet")


def test_a_damaged_parquet_file_is_a_clear_error(tmp_path):
    (tmp_path / "cut.parquet").write_bytes((DATA / "matharena_aime.parquet").read_bytes()[:300])
    with pytest.raises(EvalDataError, match=r"cut.parquet: not a readable Parquet file"):
        datasets.load_items("aime", tmp_path / "cut.parquet")


def test_examples_subset_is_the_references_draw():
    import random

    items = datasets.load_items("gpqa", EXAMPLES / "gpqa_diamond.csv")
    rng = random.Random(0)
    want = rng.sample(items, 3)  # gpqa_eval.py / aime_eval.py: rng.sample(examples, num_examples) first
    orders = [rng.sample(range(4), 4) for _ in range(3)]  # then the permutations, from the same rng
    jobs = datasets.jobs("gpqa", items, 1, seed=0, examples=3)
    assert [j.item.id for j in jobs] == [i.id for i in want]
    assert [j.extra["permutation"] for j in jobs] == orders
    assert len(datasets.jobs("healthbench", datasets.load_items("healthbench", EXAMPLES / "healthbench.jsonl"), 1,
                             examples=10)) == 3  # healthbench: all when fewer than asked
    with pytest.raises(EvalDataError, match="--examples 9: the file has only 5 items"):
        datasets.jobs("gpqa", items, 1, examples=9)
