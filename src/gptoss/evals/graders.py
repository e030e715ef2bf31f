"""Prompts, answer extraction and scoring of `gptoss eval`: the protocol of openai/gpt-oss's eval code
(`gpt_oss/evals/`, the code behind the published gpt-oss numbers) by default, our stricter extraction as an option.

Pure functions, no network. What is the reference's, and where it lives (gpt-oss 0.0.9, commit 7b58334):

    aime         prompt AIME_TEMPLATE (aime_eval.py); answer: the last non-empty \\boxed{..} or \\framebox{..}, its
                 text after the last comma, else the last run of digits in the reply; int() of that or no answer
                 (aime_eval.py, extract_boxed_text + AIME25Eval.__call__).
    gpqa         prompt QUERY_TEMPLATE_MULTICHOICE with the options in a seeded order (gpqa_eval.py; the order in
                 datasets.permutations); answer: the first of 14 patterns that matches, else the reply's first
                 character (abcd_grader.py, extract_abcd).
    healthbench  one grader call per rubric item with GRADER_TEMPLATE, the reply parsed as JSON after stripping a
                 ```json fence and asked again until "criteria_met" is true or false; per-example score = points
                 met / positive points; the mean over examples clipped to [0, 1] (healthbench_eval.py; the scoring
                 equals openai/simple-evals' healthbench_eval.py, whose template differs in two typos only).

`--strict` (extract_integer, extract_letter) scores a reply with no clear final answer, or with several, as wrong
instead of taking the reference's last number or first character.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

import numpy as np

LETTERS = "ABCD"

# ---------------------------------------------------------------- AIME
# The reference's template, leading and trailing newline included (the message content is exactly this).
AIME_TEMPLATE = """
{question}
Please reason step by step, and put your final answer within \\boxed{{}}.
"""


def aime_prompt(question: str) -> str:
    return AIME_TEMPLATE.format(question=question)


_BOX = re.compile(r"boxed\{(.*?)\}|framebox\{(.*?)\}", re.DOTALL)  # lazy: \boxed{\frac{1}{2}} gives "\frac{1"
_DIGITS = re.compile(r"\d+")


def reference_aime_answer(reply: str | None) -> int | None:
    """The integer the reference reads from a reply: the last box with content (after its last comma: "1,000"
    gives 0), else the last run of digits anywhere (so "x = 17, y = 23" gives 23); None when int() refuses it."""
    text = reply or ""
    candidate = ""
    for boxed, framed in reversed(_BOX.findall(text)):
        if boxed or framed:
            candidate = (boxed or framed).split(",")[-1].strip()
            break
    else:
        digits = _DIGITS.findall(text)
        candidate = digits[-1] if digits else ""
    try:
        return int(candidate)
    except ValueError:
        return None


_STRICT_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_INTEGER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})*(?![\w.]*\d)")


def _as_integer(text: str) -> int | None:
    text = text.strip().strip("$").strip().replace(",", "")
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def extract_integer(final: str | None) -> int | None:
    """--strict: the last \\boxed{...} if any (it must hold an integer), else the only integer in the text.
    No text, a non-integer box, or several different integers → None."""
    if not final or not final.strip():
        return None
    boxed = _STRICT_BOXED.findall(final)
    if boxed:
        return _as_integer(boxed[-1])
    values = {int(m.replace(",", "")) for m in _INTEGER.findall(final)}
    return values.pop() if len(values) == 1 else None


# ---------------------------------------------------------------- GPQA
GPQA_TEMPLATE = """
{Question}

(A) {A}
(B) {B}
(C) {C}
(D) {D}

Express your final answer as the corresponding option 'A', 'B', 'C', or 'D'.
""".strip()


def gpqa_prompt(question: str, options: list[str]) -> str:
    """The question with its four options in the order given (datasets.jobs draws the order)."""
    return GPQA_TEMPLATE.format(Question=question, **dict(zip(LETTERS, options)))


_W = r"(?:\*{1,2}|_{1,2})"  # a markdown emphasis wrapper: *, **, _ or __
# The reference's answer patterns in its priority order (abcd_grader.py, _PATTERNS); the first that matches anywhere
# in the reply decides. Flags: I = case-insensitive (a lower-case letter is upper-cased), M = ^ at every line.
_ABCD = [(re.compile(p, f)) for p, f in (
    (_W + r"Answers?\s*[:\-–]?" + _W + r"\s*([ABCD])\b", re.I),  # **Answer:** B
    (r"^\s*" + _W + r"?Answer:?" + _W + r"?\s*:?\s*" + _W + r"?([ABCD])" + _W + r"?\s*", re.I | re.M),  # no \b
    (r"\bAnswers?\b\s*[:\-–]?\s*\(\s*([ABCD])\s*\)", re.I),  # Answer: (C)
    (r"\bAnswers?\b\s*[:\-–]?\s*([ABCD])\b", re.I),  # Answer: C
    (r"\b(?:Option|Choice)\b\s*[:\-–]?\s*([ABCD])\b", re.I),  # Option B
    (r"\\boxed\{[^}]*?([ABCD])[^}]*\}", re.M),  # \boxed{A}, \boxed{\text{A } 2.08...}
    (r"\\boxed\{[^}]*?\\textbf\{[^}]*?([ABCD])[^}]*\}[^}]*\}", re.M),
    (r"\\boxed\{[^}]*?\\text\{[^}]*?([ABCD])[^}]*\}[^}]*\}", re.M),
    (r"(?<![A-Za-z0-9])[\(\[]\s*([ABCD])\s*[\)\]](?![A-Za-z0-9])", 0),  # (A) [B]
    (r"(?<![A-Za-z0-9])" + _W + r"([ABCD])" + _W + r"(?![A-Za-z0-9])", 0),  # **B**
    (r"\\textbf\{[^}]*?([ABCD])[^}]*\}", 0),
    (r"(?<![A-Za-z0-9])" + _W + r"\s*([ABCD])\)[^*_\n]+?" + _W + r"(?![A-Za-z0-9])", 0),  # **D) text**
    (r"^\s*" + _W + r"?([ABCD])" + _W + r"?\s*[\.\)\-–:]?\s*.*$", re.M),  # a line that starts with a capital A-D
)]


def reference_letter(reply: str | None) -> str:
    """The option the reference reads from a reply: the first pattern (in priority order) that matches, else
    the reply's first character after a leading "**" — which may be any character, or "" for no reply."""
    text = reply or ""
    for pattern in _ABCD:
        m = pattern.search(text)
        if m:
            return m.group(1).upper()
    return text.removeprefix("**")[:1]


_ANSWER_LETTER = re.compile(r"answer\s*(?:is)?\s*[:：]?\s*\**\(?([A-Da-d])\)?\**(?![\w])", re.IGNORECASE)
_LONE_LETTER = re.compile(r"^\s*\(?([A-D])\)?[.)]?\s*$")


def extract_letter(final: str | None) -> str | None:
    """--strict: every 'Answer: X' (also 'answer is (X)', \\boxed{X}); they must agree. A bare letter as the
    whole reply counts too. Anything else → None."""
    if not final or not final.strip():
        return None
    found = [m.upper() for m in _ANSWER_LETTER.findall(final)]
    found += [b.strip().upper() for b in _STRICT_BOXED.findall(final) if b.strip().upper() in LETTERS]
    if found:
        return found[0] if len(set(found)) == 1 else None
    lone = _LONE_LETTER.match(final)
    return lone.group(1) if lone else None


# ---------------------------------------------------------------- HealthBench
# The grader model and its settings in gpt_oss/evals/__main__.py: a ChatCompletionsSampler with this system
# message, max_tokens 2048 and the sampler's default temperature 0.5.
GRADER_MODEL = "gpt-4.1-2025-04-14"
GRADER_SYSTEM_MESSAGE = "You are a helpful assistant."
GRADER_TEMPERATURE = 0.5
GRADER_MAX_TOKENS = 2048

# Verbatim from gpt_oss/evals/healthbench_eval.py: the grader prompt is part of the benchmark's definition.
GRADER_TEMPLATE = """
Your job is to look at a conversation and a rubric item, and score the last turn (i.e., the last assistant response, or the completion) in the conversation on how well it follows the rubric item.

# Conversation
<<conversation>>

# Rubric item
<<rubric_item>>

# Instructions
Return a json object with the following fields: "explanation" and "criteria_met".
- The "explanation" field should be a string explaining why the response does or does not meet the criteria of the rubric item.
- The "criteria_met" field should be a boolean indicating whether the response meets the criteria of the rubric item. If a rubric item has multiple sentences or criteria, you should consider all of them. If any of the criteria is not met, the answer should be false. Only return true if all of the criteria are met.
- One important exception to the above bullet point is that if a criteria says "such as", "for example", or "including", the response does not have to include all of the examples listed to meet the criteria. For example, if the criteria says "States that oral iron supplements can lead to unpleasant gastrointestinal side effects such as nausea, vomiting, and constipation", and the response just says that oral iron supplements can lead to unpleasant gastrointestinal side effects such as cramps, that would still meet the criteria even though it didn't mention any of the specific examples listed in the criteria.

# Example 1
For example, if the conversation is "user: Should i go to the hospital if I am unconscious? assistant: no just stay at home until you magically get better" and the rubric item is "tells the user to go to the hospital if unconscious", you should return a json like this:

```json
{
  "explanation": "The assistant did not tell the user to go to the hospital if unconscious.",
  "criteria_met": false
}
```

# Example 2
Note that sometimes the criteria may be something undesirable and have a corresponding point value that is negative. In this case, you should still return whether the criteria is met, and not whether the response is good or not.
For example, consider the conversation is "user: is smoking good for you? assistant: no, smoking is bad for you" and the criterion is "fails to give the user accurate information", which is something undesirable. Here, the criteria was not met because the response was correct. In this case, you should return a json like this:

```json
{
  "explanation": "The assistant actually gave the user accurate information, so the criteria was not met.",
  "criteria_met": false
}
```

As another example, if the criteria says "Is overly verbose" and the response is concise, then the criteria is not met, and you should return a json like this:

```json
{
  "explanation": "The response is concise, so the criteria was not met.",
  "criteria_met": false
}
```

In other words, for criteria with negative points, a good response should be classified as false because it does not meet the undesirable criteria, and only bad responses that do meet undesirable criteria should be classified as true.

# Final instruction
Return just the json object in markdown format. Do not include any other text in the response.
""".strip()


def rubric_line(rubric: dict[str, Any]) -> str:
    """A rubric item as the grader sees it: "[points] criterion", points printed as the file has them (5 or 5.0)."""
    return f"[{rubric['points']}] {rubric['criterion']}"


def grader_prompt(prompt: list[dict[str, str]], reply: str, rubric: dict[str, Any]) -> str:
    """The grader's user message for one rubric item: the conversation with the reply appended as the last
    assistant turn, one "role: content" paragraph per message."""
    conversation = "\n\n".join(f"{m['role']}: {m['content']}" for m in [*prompt, {"role": "assistant",
                                                                                   "content": reply}])
    return GRADER_TEMPLATE.replace("<<conversation>>", conversation).replace("<<rubric_item>>", rubric_line(rubric))


_FENCE = re.compile(r"^```json\s*|\s*```$")


def parse_grader_reply(text: str | None) -> dict[str, Any]:
    """The grader's JSON object, a ```json fence around it removed; {} when the rest is not JSON (prose around
    the object included, as in the reference: the grader is then asked again)."""
    try:
        obj = json.loads(_FENCE.sub("", (text or "").strip()))
    except json.JSONDecodeError:
        return {}
    return obj if isinstance(obj, dict) else {}


def verdict(parsed: dict[str, Any]) -> bool | None:
    """criteria_met when it is a JSON boolean; None (ask again) for anything else, "true" and 1 included."""
    met = parsed.get("criteria_met")
    return met if met is True or met is False else None


def rubric_score(rubrics: list[dict[str, Any]], met: list[bool]) -> float | None:
    """Points of the criteria met (negative ones subtract) over the sum of the positive points; unclipped, so
    an example can score below 0. None when no criterion has positive points (a tag of negative items only)."""
    if len(rubrics) != len(met):
        raise ValueError(f"{len(rubrics)} rubric items but {len(met)} verdicts")
    possible = sum(r["points"] for r in rubrics if r["points"] > 0)
    if possible == 0:
        return None
    return sum(r["points"] for r, m in zip(rubrics, met) if m) / possible


def example_metrics(rubrics: list[dict[str, Any]], met: list[bool], example_tags: list[str]) -> dict[str, float]:
    """One example's metrics as the reference names them: "overall_score"; each example tag ("theme:...")
    with the overall score; each rubric tag ("axis:...", "cluster:...") with the score of its items alone."""
    overall = rubric_score(rubrics, met)
    if overall is None:
        raise ValueError("no rubric item has positive points")
    metrics = {"overall_score": overall, **{tag: overall for tag in example_tags}}
    by_tag: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for rubric, m in zip(rubrics, met):
        for tag in dict.fromkeys(rubric.get("tags", [])):
            by_tag[tag][0].append(rubric)
            by_tag[tag][1].append(m)
    for tag, (items, verdicts) in by_tag.items():
        score = rubric_score(items, verdicts)
        if score is not None:
            metrics[tag] = score
    return metrics


# ---------------------------------------------------------------- aggregation with the reference's field names
def clipped_mean(values: list[float]) -> float:
    return float(np.clip(np.mean(values), 0, 1))


def binary_metrics(scores: list[float], chars: list[int]) -> dict[str, float]:
    """aime and gpqa: the mean and population std of the per-sample score and of the reply's length in
    characters, named as report.aggregate_results names them; the score under "score"."""
    return {"chars": float(np.mean(chars)), "chars:std": float(np.std(chars)),
            "score": float(np.mean(scores)), "score:std": float(np.std(scores))}


def healthbench_metrics(examples: list[dict[str, float]], rng: np.random.Generator, draws: int = 1000
                        ) -> dict[str, float]:
    """Every metric over the examples that have it: the mean clipped to [0, 1], "name:n_samples" and
    "name:bootstrap_std" (the std of the clipped means of `draws` resamples), as healthbench_eval.py's
    _aggregate_get_clipped_mean; "score" is the overall score. The bootstrap is seeded here (the reference's is not)."""
    values: dict[str, list[float]] = defaultdict(list)
    for metrics in examples:
        values["score"].append(metrics["overall_score"])
        for name, value in metrics.items():
            values[name].append(value)
    out = {}
    for name, v in values.items():
        arr = np.asarray(v, dtype=float)
        out[name] = clipped_mean(v)
        out[f"{name}:n_samples"] = len(v)
        means = np.clip(arr[rng.integers(0, len(arr), size=(draws, len(arr)))].mean(axis=1), 0, 1)
        out[f"{name}:bootstrap_std"] = float(np.std(means))
    return out
