"""`gptoss generate --json-schema FILE` and `gptoss chat --json-schema FILE` as a user runs them: the output
validates against the schema (jsonschema), equals the library's constrained generation, and bad schema
files are one-line errors. The demo model, asked an arithmetic question with a JSON schema, answers JSON."""

from __future__ import annotations

import json

import jsonschema
import pytest

from gptoss import demo
from gptoss.constrain import Constraint
from gptoss.generate import SamplingParams, generate_tokens
from gptoss.tokenizer import get_tokenizer
from test_cli_generate import checkpoint, run  # noqa: F401 (a fixture)

TOK = get_tokenizer()
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
          "properties": {"city": {"enum": ["Paris", "Rome"]},
                         "days": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 40}}}}
ARITHMETIC = {"type": "object", "additionalProperties": False, "required": ["expression", "result"],
              "properties": {"expression": {"type": "string", "maxLength": 24}, "result": {"type": "integer"}}}


def test_generate_json_schema(checkpoint, tmp_path):
    schema_file = tmp_path / "weather.json"
    schema_file.write_text(json.dumps(SCHEMA))
    prompt = "The forecast, as JSON:"
    done = run("generate", "-m", str(checkpoint), prompt, "--json-schema", str(schema_file), "--temperature", "0",
               "--max-tokens", "80", "--dtype", "float32", "-q", timeout=300)
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), SCHEMA)  # the whole output, <|endoftext|> not printed


def test_bad_schema_files_are_one_line_errors(checkpoint, tmp_path, capsys):
    """Refused before the model loads, in one line that names the file or the unsupported keyword."""
    from gptoss.cli import main

    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "unique.json").write_text('{"type": "array", "uniqueItems": true}')
    for args, message in [(["generate", "x", "--json-schema", str(tmp_path / "bad.json")], "bad.json: not valid JSON"),
                          (["chat", "--json-schema", str(tmp_path / "unique.json")], "keyword 'uniqueItems'"),
                          (["generate", "x", "--json-schema", str(tmp_path / "nope.json")], "nope.json: cannot read")]:
        assert main([*args, "-m", str(checkpoint), "-q"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


@pytest.mark.skipif(not (demo.folder() / "model.safetensors").exists(), reason="the demo model is not shipped")
def test_chat_json_schema_with_the_demo_model(tmp_path):
    """`gptoss chat --json-schema` on the embedded demo model: its reasoning stays free (it works the sum out
    as it was trained to), its answer is JSON of the schema."""
    schema_file = tmp_path / "arithmetic.json"
    schema_file.write_text(json.dumps(ARITHMETIC))
    done = run("chat", "--json-schema", str(schema_file), "--temperature", "0", "--show-reasoning", "--max-tokens", "300",
               stdin="What is 4821 + 937?\n/exit\n", timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    body = out.removeprefix(">>> What is 4821 + 937?\n").split(">>> /exit")[0].rstrip("\n")
    reasoning, _, answer = body.rpartition("\n")  # the answer is the last line
    assert reasoning.startswith("[thinking] ") and len(reasoning) > 30  # free text, not JSON
    answer = json.loads(answer)
    jsonschema.validate(answer, ARITHMETIC)


@pytest.mark.skipif(not (demo.folder() / "model.safetensors").exists(), reason="the demo model is not shipped")
def test_demo_model_answers_arithmetic_as_json_with_the_right_number():
    from gptoss import harmony as h

    model = demo.load()
    stops = (TOK.return_, TOK.call, TOK.endoftext)
    for question, result in [("What is 4821 + 937?", 5758)]:
        fmt = h.ResponseFormat("arithmetic", ARITHMETIC)
        prompt = h.render_conversation_for_completion(
            [h.Message.system(h.SystemContent()), h.Message.developer(h.DeveloperContent(None, [], fmt)),
             h.Message.user(question)], "assistant", TOK)
        tokens = generate_tokens(model, prompt, SamplingParams(temperature=0, max_tokens=300, stop_tokens=stops,
                                                               constraint=Constraint.json_schema(ARITHMETIC)))
        answer = json.loads(h.parse_messages(tokens)[-1].text)
        jsonschema.validate(answer, ARITHMETIC)  # always holds: the constraint
        assert answer["result"] == result  # what the model must know
