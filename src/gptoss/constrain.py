"""Constrained decoding: answers and tool arguments that match a JSON schema, inside Harmony's structure.

A `Constraint` is a grammar of the whole completion (the tokens after the prompt), compiled by llguidance
(https://github.com/guidance-ai/llguidance; Lark syntax with `%json {schema}` and special tokens), and a
`Guide` walks it for one request: before each sample it masks the logits to the tokens the grammar allows
next, and after it the grammar consumes the sampled token. Why llguidance and not xgrammar: see
benchmarks/RESULTS.md (issue 21): its mask costs tens of µs a token on the 201,088-token vocabulary with no
precompilation step, and its wheel has no dependencies (xgrammar's pulls triton).

Harmony-aware (gpt-oss/docs and the Harmony guide: the model reasons on `analysis`, answers on `final`, calls
tools on `commentary` with `<|constrain|>json`): the grammar of a completion is

    start:    analysis? answer
    analysis: <|channel|>analysis<|message|> (free text) <|end|><|start|>assistant
    answer:   <|channel|>final<|message|> (JSON of the schema, or free text) <|return|>
            | a call to a declared function, either header order, then (its arguments) <|call|>

so the reasoning stays free and only the final message's content (and strict tools' arguments) is held
to the schema. A model that never ends its reasoning is not left to run into max_tokens: after
`reasoning_budget` analysis tokens (when set) `<|end|>` is forced, and the grammar then forces the final
header. Near max_tokens (the last `close_reserve` tokens) the guide closes the answer: the analysis ends,
and within the JSON it prefers the tokens that close strings, arrays and objects (then short values and
separators), so the output still parses; the finish reason is then "length" (the content was cut), as
OpenAI reports a truncated structured answer.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import GenerationError, GptOssError
from .tokenizer import Tokenizer, get_tokenizer

# JSON whitespace, bounded: a run of at most 16 at each place JSON allows it. Unbounded whitespace is how
# constrained models loop (newline after newline); 16 still allows indented, pretty-printed output.
WHITESPACE = r"[\x20\x0A\x0D\x09]{1,16}"
FREE_TEXT = r"/(?s:.*)/"


class ConstraintError(GptOssError, ValueError):
    """A schema or grammar the constraint library cannot compile; `keyword` names what it does not support
    (a JSON-Schema keyword, a format, a regex feature) where the message says so."""

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its arguments are held to `parameters` when `strict`."""
    name: str
    parameters: dict[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True)
class Constraint:
    """What a completion must look like: an llguidance Lark grammar of all its tokens, plus the budgets.

    reasoning_budget: analysis tokens before `<|end|>` is forced (None: the model ends its reasoning itself,
    or max_tokens does). close_reserve: in the last that many tokens before max_tokens the guide closes the
    answer (None: min(64, max_tokens // 4); 0: never, the output is cut wherever max_tokens falls)."""
    grammar: str
    reasoning_budget: int | None = None
    close_reserve: int | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def json_schema(cls, schema: dict[str, Any], *, harmony: bool = True, strict: bool = True,
                    reasoning_budget: int | None = None, close_reserve: int | None = None) -> Constraint:
        """The answer is JSON matching `schema`: with harmony, the final message's content after optional
        free reasoning; without, the whole completion (a raw completion, ended by <|endoftext|>).
        strict=False ignores keywords the library does not implement instead of refusing the schema."""
        body = json_rule(schema, strict)
        if not harmony:
            return cls(f"start: body <|endoftext|>\nbody: {body}\n", reasoning_budget, close_reserve)
        return cls.harmony(answer=schema, strict=strict, reasoning_budget=reasoning_budget,
                           close_reserve=close_reserve)

    @classmethod
    def harmony(cls, *, answer: dict[str, Any] | None = None, strict: bool = True, tools: Sequence[ToolSpec] = (),
                forced: str = "", reasoning_budget: int | None = None,
                close_reserve: int | None = None) -> Constraint:
        """A Harmony completion after `<|start|>assistant` (and after `forced`, a forced call header the prompt
        ends with). answer: the final message's JSON schema (None: free text). tools: the functions the model
        may call (strict ones get their arguments held to their schema, the others' to any JSON object).
        forced: "" (the model may reason, then answer or call), " to=functions" (it must call one of
        `tools`: the name is held to theirs), or "function" (the whole header is in the prompt: only the
        arguments of tools[0] and <|call|> are left)."""
        rules = [f"ANALYSIS: {FREE_TEXT}", f"TEXT: {FREE_TEXT}"]
        for i, t in enumerate(tools):
            if not _plain_name(t.name):
                raise ConstraintError(f"tool name {t.name!r}: only letters, digits, '_' and '-' can appear in a "
                                      "grammar")
            # a strict tool's arguments follow its schema; any other's are a JSON object (what the API returns)
            body = json_rule(t.parameters or {"type": "object"}, True) if t.strict else json_rule({"type": "object"})
            rules.append(f"args_{i}: {body}")
        header = '<|channel|> "commentary " <|constrain|> "json" <|message|>'
        if forced == "function":
            if len(tools) != 1:
                raise ConstraintError("a forced function call needs exactly one tool")
            start = "start: args_0 <|call|>"
        elif forced == " to=functions":
            if not tools:
                raise ConstraintError("tool_choice 'required' needs tools")
            start = "start: " + " | ".join(f'".{t.name}" {header} args_{i} <|call|>' for i, t in enumerate(tools))
        elif forced == "":
            final = f"final: <|channel|> \"final\" <|message|> {'answer_body' if answer is not None else 'TEXT'} " \
                    "<|return|>"
            if answer is not None:
                rules.append(f"answer_body: {json_rule(answer, strict)}")
            calls = []
            for i, t in enumerate(tools):
                calls.append(f'<|channel|> "commentary to=functions.{t.name} " <|constrain|> "json" <|message|> '
                             f"args_{i} <|call|>")
                calls.append(f'" to=functions.{t.name}" {header} args_{i} <|call|>')
            start = "start: analysis? answer\nanswer: " + " | ".join(["final", *calls])
            rules += [final, 'analysis: <|channel|> "analysis" <|message|> ANALYSIS <|end|> <|start|> "assistant"']
        else:
            raise ConstraintError(f"forced must be '', ' to=functions' or 'function', got {forced!r}")
        return cls("\n".join([start, *rules]) + "\n", reasoning_budget, close_reserve)

    # ------------------------------------------------------------------ checking
    def check(self, tokenizer: Tokenizer | None = None) -> None:
        """Raise ConstraintError, naming the unsupported keyword where there is one, if it cannot compile."""
        _fresh_matcher(self.grammar, tokenizer or get_tokenizer())


def json_rule(schema: Any, strict: bool = True) -> str:
    """`%json {...}` for a Lark grammar: the schema with llguidance's options (bounded whitespace; lenient,
    i.e. unknown keywords ignored, unless strict)."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
    options = {"whitespace_pattern": WHITESPACE, "lenient": not strict}
    return "%json " + json.dumps({**schema, "x-guidance": {**options, **schema.get("x-guidance", {})}})


def read_schema(path: str) -> dict[str, Any]:
    """A JSON schema from a file (`--json-schema FILE`); ConstraintError naming the file if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise ConstraintError(f"--json-schema {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ConstraintError(f"--json-schema {path}: not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"--json-schema {path}: a JSON schema is an object, got {type(schema).__name__}")
    return schema


def _plain_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "_-" for c in name) and name.isascii()


# ---------------------------------------------------------------------------------------------- compiling
@functools.lru_cache(maxsize=4)
def ll_tokenizer(tokenizer: Tokenizer):
    """llguidance's view of o200k_harmony (≈ 1 s to build, so once per process)."""
    import llguidance

    enc = tokenizer.encoding
    # <|endofprompt|> shares its id with <|reserved_200018|> in tiktoken's table: one name per id
    specials = {name: i for name, i in enc._special_tokens.items() if name != "<|endofprompt|>"}
    return llguidance.LLTokenizer.from_tiktoken(encoder=enc._mergeable_ranks, special_tokens=specials,
                                                pattern=enc._pat_str, eos_token=tokenizer.endoftext,
                                                n_vocab=tokenizer.n_vocab)


def _keyword(message: str) -> str | None:
    """The unsupported keyword in an llguidance error ('Unimplemented keys: ["uniqueItems"]', 'Unknown
    format: foo', a regex look-around)."""
    if "Unimplemented keys:" in message:
        try:
            keys = json.loads(message.split("Unimplemented keys:", 1)[1].strip().split("\n")[0])
            return ", ".join(keys)
        except ValueError:
            return None
    if "Unknown format:" in message:
        return "format"
    if "look-around" in message or "regex parse error" in message:
        return "pattern"
    if "$ref" in message or "Resource '" in message:
        return "$ref"
    return None


def _refuse(message: str) -> None:
    # llguidance appends the grammar around the error: its first line says what failed
    short = message.split("\n")[0].split("failed to compile JSON schema: ")[-1]
    keyword = _keyword(message)
    if keyword is not None:
        raise ConstraintError(f"unsupported JSON-Schema keyword '{keyword}' ({short})", keyword)
    raise ConstraintError(f"the schema cannot be enforced: {short}")


@functools.lru_cache(maxsize=128)
def _fresh_matcher(grammar: str, tokenizer: Tokenizer):
    """A compiled grammar at its start (requests copy it: compiling a schema costs ms, a copy µs)."""
    import llguidance

    lltok = ll_tokenizer(tokenizer)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error:
        _refuse(messages[0] if messages else "invalid grammar")
    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    if matcher.is_error():
        _refuse(matcher.get_error())
    return matcher


# ---------------------------------------------------------------------------------------------- masks
def unpack_bitmask(bits: torch.Tensor, n: int) -> torch.Tensor:
    """llguidance's bitmask (int32 [ceil(n/32)] on the CPU: bit j of word w allows token 32·w + j, words
    little-endian) → bool [n] of allowed tokens. numpy's unpackbits does it in ≈ 15 µs for 201,088 tokens
    (a torch table lookup took ≈ 1 ms)."""
    return torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), bitorder="little", count=n)).view(torch.bool)


def apply_bitmask(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf, in place (logits [V], bits int32 [ceil(V/32)] on the CPU)."""
    allowed = unpack_bitmask(bits, logits.shape[-1]).to(logits.device)
    return logits.masked_fill_(~allowed, float("-inf"))


@functools.lru_cache(maxsize=4)
def closing_tiers(tokenizer: Tokenizer, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """Bool [V] masks, in the order the guide prefers them when it closes an answer: tokens that end a string
    (`"`, `"}`, `"]}`: a quote first, then only `}` and `]`), tokens that end arrays and objects (only `}` and
    `]`), short values and separators (a digit, `,`, `:`, `""`, `[]`, `{}`, true, false, null). Inside a
    string `}` is just a character, so the quote tier comes first; outside one, a quote is allowed only where
    a string may begin (`""` then closes it)."""
    quote, brackets, short = (torch.zeros(tokenizer.n_vocab, dtype=torch.bool) for _ in range(3))
    values = {b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9", b",", b":", b'""', b"[]", b"{}",
              b"true", b"false", b"null"}
    for text, i in tokenizer.encoding._mergeable_ranks.items():
        if text[:1] == b'"' and not text[1:].strip(b"}]"):
            quote[i] = True
        elif text and not text.strip(b"}]"):
            brackets[i] = True
        elif text in values:
            short[i] = True
    return quote.to(device), brackets.to(device), short.to(device)


class Guide:
    """One request's walk through its Constraint: mask before each sample, advance after it.

    max_tokens: the request's limit (the guide closes the answer in its last close_reserve tokens). `cut`
    turns True once that closing has begun: the answer parses but was shortened (finish reason "length")."""

    def __init__(self, constraint: Constraint, max_tokens: int, tokenizer: Tokenizer | None = None):
        self.tok = tok = tokenizer or get_tokenizer()
        self.constraint = constraint
        self.matcher = _fresh_matcher(constraint.grammar, tok).deep_copy()
        self.max_tokens = max_tokens
        reserve = constraint.close_reserve
        self.reserve = min(64, max_tokens // 4) if reserve is None else reserve
        self.bits = torch.zeros((tok.n_vocab + 31) // 32, dtype=torch.int32)
        self.generated = 0
        self.cut = False
        # Where the completion is in Harmony terms (the grammar decides what is allowed; this tracks only
        # what the budgets need): the channel being named, and whether an analysis message is open.
        self._channel: list[int] | None = None
        self.analysis_open = False
        self.analysis_tokens = 0

    @property
    def closing(self) -> bool:
        return self.reserve > 0 and self.max_tokens - self.generated <= self.reserve

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] with every token the grammar does not allow next at -inf (in place); near max_tokens,
        restricted further to the tokens that close the answer soonest."""
        tok = self.tok
        self.matcher.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)
        if self.matcher.is_error():
            raise GenerationError(f"constraint: {self.matcher.get_error()}")
        allowed = unpack_bitmask(self.bits, logits.shape[-1]).to(logits.device)
        end_reasoning = self.analysis_open and (self.closing or (self.constraint.reasoning_budget is not None and
                                                self.analysis_tokens >= self.constraint.reasoning_budget))
        if end_reasoning and bool(allowed[tok.end]):
            allowed = torch.zeros_like(allowed)
            allowed[tok.end] = True
        elif self.closing and not self.analysis_open:
            self.cut = True
            ends = torch.zeros_like(allowed)
            ends[[tok.return_, tok.call]] = allowed[[tok.return_, tok.call]]
            for tier in (ends, *closing_tiers(tok, allowed.device)):
                narrowed = allowed & tier
                if bool(narrowed.any()):
                    allowed = narrowed
                    break
        logits.masked_fill_(allowed.logical_not(), float("-inf"))
        if logits.max() == float("-inf"):  # the model gives every allowed token -inf (a vocabulary subset
            logits.masked_fill_(allowed, 0.0)  # without them): choose among them uniformly
        return logits

    def advance(self, token: int) -> None:
        """The sampled token: the grammar consumes it (GenerationError if it does not allow it)."""
        if not self.matcher.consume_token(token):
            raise GenerationError(f"constraint: token {token} is not allowed here ({self.matcher.get_error()})")
        self.generated += 1
        tok = self.tok
        if self.analysis_open:
            if token == tok.end:
                self.analysis_open = False
            else:
                self.analysis_tokens += 1
        elif token == tok.channel:
            self._channel = []
        elif token == tok.message and self._channel is not None:
            self.analysis_open = tok.decode(self._channel).strip() == "analysis"
            self._channel = None
        elif self._channel is not None:
            self._channel.append(token)
