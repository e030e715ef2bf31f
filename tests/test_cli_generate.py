"""`gptoss generate` as a user runs it: streamed text equals the library's greedy tokens, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import gptoss
from gptoss import synthetic
from gptoss.checkpoint import write_checkpoint
from gptoss.config import preset
from gptoss.generate import SamplingParams, generate_tokens
from gptoss.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = preset("tiny").replace(vocab_size=201_088)
    path = tmp_path_factory.mktemp("gen") / "tiny"
    write_checkpoint(dict(synthetic.random_tensors(config, seed=5, dtype=torch.float32)), config, path, "hf")
    return path


def run(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "gptoss", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_streams_the_greedy_completion(checkpoint):
    tok = get_tokenizer()
    prompt = "The capital of France is"
    expected = generate_tokens(gptoss.load(checkpoint, dtype=torch.float32), tok.encode(prompt),
                               SamplingParams(temperature=0, max_tokens=12, stop_tokens=(tok.endoftext,)))
    done = run("generate", "-m", str(checkpoint), prompt, "--temperature", "0", "--max-tokens", "12",
               "--dtype", "float32", "-q")
    assert done.returncode == 0, done.stderr
    assert done.stdout == tok.decode(expected) + "\n"
    piped = run("generate", "-m", str(checkpoint), "--temperature", "0", "--max-tokens", "12", "--dtype", "float32",
                "-q", stdin=prompt)
    assert piped.stdout == done.stdout


def test_generate_int8_unembedding(checkpoint):
    """--int8-unembedding: the CLI streams what the library gives after model.quantize_unembedding()."""
    tok = get_tokenizer()
    prompt = "The capital of France is"
    model = gptoss.load(checkpoint, dtype=torch.float32)
    model.quantize_unembedding()
    expected = generate_tokens(model, tok.encode(prompt),
                               SamplingParams(temperature=0, max_tokens=12, stop_tokens=(tok.endoftext,)))
    done = run("generate", "-m", str(checkpoint), prompt, "--temperature", "0", "--max-tokens", "12",
               "--dtype", "float32", "-q", "--int8-unembedding")
    assert done.returncode == 0, done.stderr
    assert done.stdout == tok.decode(expected) + "\n"


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "bad sampling option: top_p must be in (0, 1]"),
    (["--temperature", "-1"], "bad sampling option: temperature must be >= 0"),
    (["--max-tokens", "5000"], "exceeds the context limit of 2048"),
])
def test_generate_bad_options_are_one_line_errors(checkpoint, args, message):
    done = run("generate", "-m", str(checkpoint), "hello", "-q", *args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


def test_missing_model_folder(tmp_path):
    done = run("generate", "-m", str(tmp_path / "nope"), "hello", "-q")
    assert done.returncode == 2 and "not a checkpoint directory" in done.stderr
