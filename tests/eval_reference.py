"""The grading logic of openai/gpt-oss's evals (gpt-oss 0.0.9, gpt_oss/evals/, commit 7b58334), reproduced from
the source as a test oracle for gptoss.evals.graders. Kept close to the original text on purpose (it is the
oracle, not our implementation), each function citing its file and function.

The `gpt-oss` package itself declares Requires-Python >= 3.12 and so does not install on this project's 3.11; where
it is importable (e.g. `pip install --no-deps --ignore-requires-python gpt-oss==0.0.9 pandas` plus blobfile and
jinja2), PACKAGE holds its real modules and the tests compare against them too (test_eval_reference.py).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

try:  # the real reference, where it is installed
    from gpt_oss.evals import abcd_grader as _pkg_abcd
    from gpt_oss.evals import aime_eval as _pkg_aime
    from gpt_oss.evals import gpqa_eval as _pkg_gpqa
    from gpt_oss.evals import healthbench_eval as _pkg_hb

    PACKAGE = {"abcd": _pkg_abcd, "aime": _pkg_aime, "gpqa": _pkg_gpqa, "healthbench": _pkg_hb}
except ImportError:
    PACKAGE = None


# ---------------------------------------------------------------- aime_eval.py
def extract_boxed_text(text):
    """aime_eval.py, extract_boxed_text."""
    pattern = r'boxed{(.*?)}|framebox{(.*?)}'
    matches = re.findall(pattern, text, re.DOTALL)
    if matches:
        for match in matches[::-1]:
            for group in match:
                if group != "":
                    return group.split(',')[-1].strip()
    pattern = r'\d+'
    matches = re.findall(pattern, text, re.DOTALL)
    if matches:
        return matches[-1]
    return ""


def normalize_number(s):
    """aime_eval.py, normalize_number."""
    match = re.match(r"\d+", s)
    if not match:
        return None
    return match.group(0)


def aime_score(response_text: str, answer) -> tuple[int | None, float]:
    """aime_eval.py, AIME25Eval.__init__ (the answer column) and AIME25Eval.__call__.fn (extraction and score)."""
    answer = normalize_number(answer) if isinstance(answer, str) else answer
    extracted_answer = extract_boxed_text(response_text)
    correct_answer = int(answer)
    try:
        extracted_answer = int(extracted_answer)
    except (ValueError, TypeError):
        extracted_answer = None
    return extracted_answer, 1.0 if extracted_answer == correct_answer else 0.0


# ---------------------------------------------------------------- abcd_grader.py
_PATTERNS = [
    re.compile(
        r'''(?ix)                   # case-insensitive, ignore-space
        (?:\*{1,2}|_{1,2})          # leading *...*  or _..._
        Answer[s]?                  #   Answer or Answers
        \s*[:\-–]?                  #   optional separator
        (?:\*{1,2}|_{1,2})          # closing wrapper
        \s*                         # optional space
        ([ABCD])\b                  # the actual letter
        ''',
        re.X
    ),
    re.compile(r'''(?ix)           # ignore case, allow verbose mode
        ^\s*                      # optional leading whitespace
        (?:\*{1,2}|_{1,2})?       # optional markdown wrapper
        Answer:?                   # the word 'answer' with an optional colon
        (?:\*{1,2}|_{1,2})?       # optional markdown wrapper again
        \s*:?\s*                  # optional colon with optional spaces
        (?:\*{1,2}|_{1,2})?       # optional markdown wrapper before letter
        ([ABCD])                 # capture the letter
        (?:\*{1,2}|_{1,2})?       # optional markdown wrapper after letter
        \s*                     # optional trailing whitespace, end of line
    ''', re.MULTILINE),
    re.compile(r'(?ix)\bAnswer[s]?\b\s*[:\-–]?\s*\(\s*([ABCD])\s*\)'),
    re.compile(r'(?ix)\bAnswer[s]?\b\s*[:\-–]?\s*([ABCD])\b'),
    re.compile(r'(?ix)\b(?:Option|Choice)\b\s*[:\-–]?\s*([ABCD])\b'),
    re.compile(r'(?x)\\boxed\{[^}]*?([ABCD])[^}]*\}', re.MULTILINE),
    re.compile(r'(?x)\\boxed\{[^}]*?\\textbf\{[^}]*?([ABCD])[^}]*\}[^}]*\}', re.MULTILINE),
    re.compile(r'(?x)\\boxed\{[^}]*?\\text\{[^}]*?([ABCD])[^}]*\}[^}]*\}', re.MULTILINE),
    re.compile(r'(?x)(?<![A-Za-z0-9])[\(\[]\s*([ABCD])\s*[\)\]](?![A-Za-z0-9])'),
    re.compile(r'(?x)(?<![A-Za-z0-9])(?:\*{1,2}|_{1,2})([ABCD])(?:\*{1,2}|_{1,2})(?![A-Za-z0-9])'),
    re.compile(r'(?x)\\textbf\{[^}]*?([ABCD])[^}]*\}'),
    re.compile(r'''(?x)                        # ignore whitespace in pattern
        (?<![A-Za-z0-9])            # not preceded by word-char
        (?:\*{1,2}|_{1,2})          # opening ** or __ or * or _
        \s*([ABCD])\)               # capture letter plus ")"
        [^*_\n]+?                   # some text inside wrapper
        (?:\*{1,2}|_{1,2})          # closing wrapper
        (?![A-Za-z0-9])             # not followed by word-char
    '''),
    re.compile(r'''(?x)^\s*
        (?:\*{1,2}|_{1,2})?     # optional markdown wrapper
        ([ABCD])                # capture group for letter
        (?:\*{1,2}|_{1,2})?     # optional closing markdown
        \s*[\.\)\-–:]?          # optional separator after the letter
        \s*.*$                  # allow any following text
    ''', re.MULTILINE),
]


def extract_abcd(text: str) -> str | None:
    """abcd_grader.py, extract_abcd."""
    matches = []
    for prio, pat in enumerate(_PATTERNS):
        m = pat.search(text)
        if m:
            letter = m.group(1).upper()
            if letter in 'ABCD':
                matches.append((prio, m, letter))
    matches.sort(key=lambda triple: (triple[0], len(triple[1].group(0))))
    for _, match, letter in matches:
        return letter
    return text.removeprefix('**')[:1]


def gpqa_layout(rows: list[dict], n_repeats: int, seed: int = 0) -> list[tuple[str, str]]:
    """gpqa_eval.py, GPQAEval.__init__ (repeat, then one permutation per entry from random.Random(0)) and
    GPQAEval.__call__.fn (the prompt and the correct letter): (prompt, correct letter) per entry, in order."""
    import random

    rng = random.Random(seed)
    examples = rows * n_repeats
    examples = [example | {"permutation": rng.sample(range(4), 4)} for example in examples]
    out = []
    for row in examples:
        choices = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"],
                   row["Incorrect Answer 3"]]
        choices = [choices[i] for i in row["permutation"]]
        correct_index = choices.index(row["Correct Answer"])
        choices_dict = dict(A=choices[0], B=choices[1], C=choices[2], D=choices[3], Question=row["Question"])
        out.append((QUERY_TEMPLATE_MULTICHOICE.format(**choices_dict), "ABCD"[correct_index]))
    return out


QUERY_TEMPLATE_MULTICHOICE = """
{Question}

(A) {A}
(B) {B}
(C) {C}
(D) {D}

Express your final answer as the corresponding option 'A', 'B', 'C', or 'D'.
""".strip()


# ---------------------------------------------------------------- healthbench_eval.py
def parse_json_to_dict(json_string: str) -> dict:
    """healthbench_eval.py, parse_json_to_dict."""
    json_cleaned = re.sub(r"^```json\s*|\s*```$", "", json_string.strip())
    try:
        return json.loads(json_cleaned)
    except json.JSONDecodeError:
        return {}


def calculate_score(rubric_items: list[dict], grading_response_list: list[dict]) -> float | None:
    """healthbench_eval.py, calculate_score (rubric items as dicts)."""
    total_possible_points = sum(r["points"] for r in rubric_items if r["points"] > 0)
    if total_possible_points == 0:
        return None
    achieved_points = sum(r["points"] for r, g in zip(rubric_items, grading_response_list, strict=True)
                          if g["criteria_met"])
    return achieved_points / total_possible_points


def grade_sample(prompt: list[dict], response_text: str, example_tags: list[str], rubric_items: list[dict],
                 grader) -> tuple[dict, list[str]]:
    """healthbench_eval.py, HealthBenchEval.grade_sample: the metrics of one example and the grader prompts sent
    (one per rubric item, each asked until the reply parses to a boolean criteria_met). `grader(prompt)` returns
    the grader's reply text; the template is read from PACKAGE when present, else given by the caller's module."""
    from gptoss.evals.graders import GRADER_TEMPLATE as template  # checked against the package's in the tests

    convo_with_response = prompt + [dict(content=response_text, role="assistant")]
    sent, grading_response_list = [], []
    for rubric_item in rubric_items:
        convo_str = "\n\n".join([f"{m['role']}: {m['content']}" for m in convo_with_response])
        grader_prompt = template.replace("<<conversation>>", convo_str).replace(
            "<<rubric_item>>", f"[{rubric_item['points']}] {rubric_item['criterion']}")
        while True:
            sent.append(grader_prompt)
            grading_response_dict = parse_json_to_dict(grader(grader_prompt))
            if "criteria_met" in grading_response_dict:
                label = grading_response_dict["criteria_met"]
                if label is True or label is False:
                    break
        grading_response_list.append(grading_response_dict)
    overall_score = calculate_score(rubric_items, grading_response_list)
    metrics = {"overall_score": overall_score}
    metrics.update({tag: overall_score for tag in example_tags})
    rubric_tag_items_grades = defaultdict(list)
    for rubric_item, grading_response in zip(rubric_items, grading_response_list):
        for tag in rubric_item["tags"]:
            rubric_tag_items_grades[tag].append((rubric_item, grading_response))
    for tag, items_grades in rubric_tag_items_grades.items():
        items, grades = zip(*items_grades)
        score = calculate_score(items, grades)
        if score is not None:
            metrics[tag] = score
    return metrics, sent


def clipped_mean(values: list[float]) -> float:
    """healthbench_eval.py, _compute_clipped_stats(values, "mean")."""
    import numpy as np

    return float(np.clip(np.mean(values), 0, 1))
