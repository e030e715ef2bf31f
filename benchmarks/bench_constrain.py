"""Per-token grammar mask cost on the 201,088-token o200k_harmony vocabulary (CPU): llguidance vs xgrammar.

    python benchmarks/bench_constrain.py                       # llguidance (a gptoss dependency)
    PYTHONPATH=/tmp/xgr python benchmarks/bench_constrain.py   # and xgrammar, where it is importable

xgrammar is not a gptoss dependency (its wheel pulls triton); install it aside to compare:
`pip install --target /tmp/xgr --no-deps xgrammar apache-tvm-ffi`.

For each JSON schema, a document that validates against it is tokenized with o200k_harmony; then, token by
token, the library computes the bitmask of allowed next tokens (what the engine does before sampling) and
accepts the token. Reported per schema: the grammar compile time (first use; gptoss caches compiled
grammars) and the median / p90 / max mask time per token, plus the cost of applying a mask to a [201088]
fp32 logits row in torch (the same for both libraries). Each timing is the best of `--repeats` passes over
the document, per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from gptoss.tokenizer import VOCAB_SIZE, get_tokenizer

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                             "email": {"type": "string"}},
              "required": ["name", "age", "email"], "additionalProperties": False},
             {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com"}),
    "nested": ({"type": "object", "properties": {
        "order": {"type": "object", "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
                "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                                                 "price": {"type": "number"}},
                "required": ["sku", "qty", "price"], "additionalProperties": False}},
            "status": {"enum": ["open", "shipped", "closed"]}},
            "required": ["id", "items", "status"], "additionalProperties": False}},
        "required": ["order"], "additionalProperties": False},
        {"order": {"id": "ABC-1234", "items": [{"sku": "pencil-hb", "qty": 12, "price": 0.35},
                                              {"sku": "eraser", "qty": 2, "price": 1.2}], "status": "shipped"}}),
    "free text field": ({"type": "object", "properties": {"summary": {"type": "string"}},
                         "required": ["summary"], "additionalProperties": False},
                        {"summary": "The quick brown fox jumps over the lazy dog, then naps in the sun for "
                                    "a while before going home to its den by the river."}),
}


def document_tokens(tok, doc) -> list[int]:
    return tok.encode_ordinary(json.dumps(doc))


def time_llguidance(tok, schema, tokens, repeats: int, keep: list | None = None) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.torch as llt

    from gptoss.constrain import ll_tokenizer

    lltok = ll_tokenizer(tok)
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t
    assert not matcher.is_error(), matcher.get_error()
    mask = llt.allocate_token_bitmask(1, VOCAB_SIZE)
    best = [float("inf")] * (len(tokens) + 1)
    for _ in range(repeats):
        matcher.reset()
        for i, token in enumerate([*tokens, None]):
            t = time.perf_counter()
            llt.fill_next_token_bitmask(matcher, mask, 0)
            best[i] = min(best[i], time.perf_counter() - t)
            if keep is not None and _ == 0:
                keep.append(mask[0].clone())
            if token is not None:
                assert matcher.consume_token(token), matcher.get_error()
    return compile_s, best


def time_xgrammar(tok, schema, tokens, repeats: int, _cache={}) -> tuple[float, list[float]]:
    import xgrammar as xgr

    if "info" not in _cache:
        vocab = [tok.decode_bytes([i]) for i in range(VOCAB_SIZE)]
        _cache["info"] = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=VOCAB_SIZE,
                                           stop_token_ids=[tok.return_])
    info = _cache["info"]
    t = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(schema))
    matcher = xgr.GrammarMatcher(compiled)
    compile_s = time.perf_counter() - t
    mask = xgr.allocate_token_bitmask(1, VOCAB_SIZE)
    best = [float("inf")] * (len(tokens) + 1)
    for _ in range(repeats):
        matcher.reset()
        for i, token in enumerate([*tokens, None]):
            t = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            best[i] = min(best[i], time.perf_counter() - t)
            if token is not None:
                assert matcher.accept_token(token)
    return compile_s, best


def time_apply(masks: list[torch.Tensor], repeats: int) -> list[float]:
    """Applying each of `masks` (the bitmasks met on the documents) to an fp32 logits row [201088], as
    gptoss.constrain does (numpy unpackbits, masked_fill_): the best of `repeats` per mask."""
    from gptoss.constrain import apply_bitmask

    logits = torch.randn(VOCAB_SIZE)
    best = [float("inf")] * len(masks)
    for _ in range(repeats):
        for i, bits in enumerate(masks):
            row = logits.clone()
            t = time.perf_counter()
            apply_bitmask(row, bits)
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[int(0.9 * (len(xs) - 1))]
    return f"median {statistics.median(xs) * 1e6:7.1f} µs  p90 {p90 * 1e6:7.1f} µs  max {xs[-1] * 1e6:8.1f} µs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = get_tokenizer()
    libraries = {"llguidance": time_llguidance}
    try:
        import xgrammar  # noqa: F401
        libraries["xgrammar"] = time_xgrammar
    except ImportError:
        print("(xgrammar not importable: llguidance only)")
    masks: list[torch.Tensor] = []
    for name, (schema, doc) in SCHEMAS.items():
        tokens = document_tokens(tok, doc)
        for lib, fn in libraries.items():
            kw = {"keep": masks} if lib == "llguidance" else {}
            compile_s, per_token = fn(tok, schema, tokens, args.repeats, **kw)
            print(f"{name:16s} {lib:10s} {len(tokens):3d} tokens  compile {compile_s * 1e3:7.1f} ms  mask: "
                  f"{summary(per_token)}")
    print(f"{'apply the masks':16s} {'torch':10s} {len(masks):3d} masks                   apply: "
          f"{summary(time_apply(masks, args.repeats))}")


if __name__ == "__main__":
    main()
