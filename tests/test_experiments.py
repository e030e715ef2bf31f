"""`gptoss experiment NAME` (issue 9) at a tiny size: tables, plots and runs.json are written, numbers are sane."""

from __future__ import annotations

import json
import math

import pytest

from gptoss.cli import main
from gptoss.experiments import EXPERIMENTS, run_experiment
from gptoss.experiments.runner import BEST_LOSS, N_TRAIN, VOCAB, clustered_markov


def test_the_task_is_seeded_and_clustered():
    a, b = clustered_markov(n_docs=20), clustered_markov(n_docs=20)
    assert [d.tokens for d in a] == [d.tokens for d in b]
    for d in a:  # one cluster of 16 ids per document
        assert len({t // 16 for t in d.tokens}) == 1 and max(d.tokens) < VOCAB
    assert 0.69 < BEST_LOSS < 0.70
    # the held-out documents continue the stream: the training documents are the first N_TRAIN of a longer draw
    assert [d.tokens for d in clustered_markov(N_TRAIN + 5)[:N_TRAIN]] == [d.tokens for d in clustered_markov()]


def test_routing_from_a_collapsed_router_via_the_cli(tmp_path, capsys):
    out = tmp_path / "routing"
    assert main(["experiment", "routing", "--steps", "3", "--seeds", "0", "1", "--start", "collapsed",
                 "--out", str(out), "-q"]) == 0
    assert "results.md" in capsys.readouterr().out
    for f in ("results.md", "runs.json", "load_heatmap.png", "load_entropy.png", "loss.png"):
        assert (out / f).stat().st_size > 0, f
    assert not (out / "work").exists()
    text = (out / "results.md").read_text()
    assert "held-out loss" in text and "| none |" in text and "| aux 0.01 |" in text and "| bias 1e-3 |" in text
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 6 and {r["seed"] for r in runs} == {0, 1}
    for r in runs:
        assert len(r["metrics"]) == 3 and 0 < r["heldout_loss"] < math.log(VOCAB) + 1
        first = r["metrics"][0]
        assert max(first["load_entropy"]) < 0.75  # collapsed onto experts 0 and 1: ≈ log 2
        for m in r["metrics"]:
            assert all(0 <= e <= math.log(8) + 1e-6 for e in m["load_entropy"])
            assert math.isfinite(m["loss"]) and m["dropped_pct"] == [0.0, 0.0]  # no capacity limit here
    # the same seed gives every method the same initialisation and data: identical first-step loss
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r["seed"], set()).add(round(r["metrics"][0]["loss"], 6))
    assert all(len(v) == 1 for v in by_seed.values())


def test_capacity_drops(tmp_path):
    out = tmp_path / "capacity"
    run_experiment("capacity", str(out), seeds=(0,), steps=3, start="collapsed", size="test", progress=False)
    for f in ("results.md", "dropped.png", "loss.png"):
        assert (out / f).stat().st_size > 0, f
    runs = {r["label"]: r["metrics"] for r in json.loads((out / "runs.json").read_text())}
    assert set(runs) == {"cf 1.0", "cf 1.25", "cf 2.0", "cf ∞"}
    assert all(m["dropped_pct"] == [0.0, 0.0] for m in runs["cf ∞"])
    # every token routed to experts 0 and 1: capacity ⌈512·2/8 · f⌉ keeps 2·128·f of 1024 assignments, so
    # step 1 drops 75 % at f = 1.0, 68.75 % at 1.25, 50 % at 2.0
    first = {k: sum(v[0]["dropped_pct"]) / 2 for k, v in runs.items()}
    assert abs(first["cf 1.0"] - 75) < 1e-6 and abs(first["cf 1.25"] - 68.75) < 1e-6
    assert abs(first["cf 2.0"] - 50) < 1e-6
    assert "tokens/s" in (out / "results.md").read_text()


def test_every_experiment_is_registered_with_a_description():
    from gptoss.experiments import get

    for name in EXPERIMENTS:
        m = get(name)
        assert m.NAME == name and m.DESCRIPTION and m.RUNS >= 3 * 2


def test_contextual_markov_hides_the_cluster_and_far_copy_repeats_beyond_the_window():
    from gptoss.experiments.runner import ALPHABET, COPY_IDS, contextual_markov, far_copy, markov_optimum

    docs = contextual_markov(50, 64)
    assert all(len(d.tokens) == 64 and max(d.tokens) < ALPHABET for d in docs)
    assert contextual_markov(50, 64) is docs  # cached
    opt = markov_optimum(docs)
    assert opt[0] > 2 * BEST_LOSS and all(abs(x - BEST_LOSS) < 0.05 for x in opt[8:])  # a few transitions tell
    for d in far_copy(20, 64, 20):
        x = d.tokens
        assert len(x) == 64 and min(x) >= ALPHABET and max(x) < VOCAB and x[20:] == (x[:20] * 3)[:44]
    assert len(COPY_IDS) == VOCAB - ALPHABET


def test_stability_via_the_cli(tmp_path):
    from gptoss.experiments.stability import VARIANTS, spike_steps
    from gptoss.train.stability import SpikeMeter

    out = tmp_path / "stability"
    assert main(["experiment", "stability", "--steps", "12", "--seeds", "0", "--out", str(out), "-q"]) == 0
    for f in ("results.md", "loss.png", "grad_norm.png"):
        assert (out / f).stat().st_size > 0, f
    text = (out / "results.md").read_text()
    assert all(f"| {v} |" in text for v in VARIANTS) and "7 sd" in text
    runs = {r["label"]: r for r in json.loads((out / "runs.json").read_text())}
    assert set(runs) == set(VARIANTS)
    for r in runs.values():  # the replayed meter agrees with the trainer's logged score (window 10 at 12 steps)
        grads = [m["grad_norm"] for m in r["metrics"]]
        assert 100 * len(spike_steps(grads, 10)) / len(grads) == r["metrics"][-1]["spike_score_grad_norm"]
    # the norm variants change the forward, not the data: same targets, different first-step gradients
    first = {k: r["metrics"][0] for k, r in runs.items()}
    assert len({m["targets"] for m in first.values()}) == 1 and len({m["grad_norm"] for m in first.values()}) == 4
    values = [1.0 + 0.01 * (i % 3) for i in range(30)] + [5.0] + [1.0] * 5
    assert spike_steps(values, 30) == [30] and spike_steps(values, 1000) == []  # no full 1000-value window
    meter = SpikeMeter(30)
    assert [meter.add(v) for v in values][30] == 100 / 31


def test_ladder_rungs_and_smoke(tmp_path):
    from gptoss.config import ModelConfig
    from gptoss.config import VARIANTS as FLAGS
    from gptoss.experiments.ladder import RUNGS, rung_models
    from gptoss.train import TrainConfig
    from gptoss.experiments.runner import model_shape

    configs = {k: TrainConfig.from_dict({"model": {**model_shape(), **m}}).model_config()
               for k, m in rung_models().items()}
    gpt2, gptoss = configs["GPT-2"], configs[RUNGS[-1]]
    assert (gpt2.dropout, gpt2.norm_type, gpt2.position_embedding, gpt2.mlp_type, gpt2.attention_sinks) == \
        (0.1, "layer", "learned", "gelu", False)
    assert gpt2.num_key_value_heads == gpt2.num_attention_heads and set(gpt2.layer_types) == {"full_attention"}
    assert all(getattr(gptoss, f) == getattr(ModelConfig, f) for f in FLAGS)  # the top rung is GPT-oss
    assert gptoss == TrainConfig.from_dict({"model": model_shape()}).model_config().replace(
        max_position_embeddings=64)
    names = list(configs)
    for a, b in zip(names, names[1:]):  # one change per rung (RoPE/SwiGLU/MoE also set their FFN width)
        diff = {f for f in ModelConfig.__dataclass_fields__ if getattr(configs[a], f) != getattr(configs[b], f)}
        assert 1 <= len(diff - {"intermediate_size"}) <= 2, (b, diff)
    # the same FFN weights per token on every rung: GELU 2·D·I, SwiGLU 3·D·I, MoE k·3·D·I
    per_token = {k: {"gelu": 2, "swiglu": 3, "moe": 3 * c.experts_per_token}[c.mlp_type] * c.intermediate_size
                 for k, c in configs.items()}
    assert len(set(per_token.values())) == 1, per_token

    out = tmp_path / "ladder"
    run_experiment("ladder", str(out), seeds=(0,), steps=3, size="test", progress=False)
    for f in ("results.md", "loss_vs_step.png", "loss_vs_time.png", "heldout.png"):
        assert (out / f).stat().st_size > 0, f
    text = (out / "results.md").read_text()
    assert all(f"| {r} |" in text for r in RUNGS) and "Bayes-optimal held-out loss 0.7" in text
    runs = {r["label"]: r for r in json.loads((out / "runs.json").read_text())}
    moe = runs["+ MoE"]["eval"]
    assert moe["params"] > 2 * moe["active_params"] and runs["+ SwiGLU"]["eval"]["active_params"] == \
        runs["+ SwiGLU"]["eval"]["params"]
    assert all(math.isfinite(r["heldout_loss"]) for r in runs.values())


def test_sliding_window_smoke(tmp_path):
    from gptoss.experiments.sliding_window import VARIANTS, kv_20b

    out = tmp_path / "sw"
    run_experiment("sliding-window", str(out), seeds=(0,), steps=3, size="test", progress=False)
    for f in ("results.md", "loss_by_position.png", "loss.png", "decode.png"):
        assert (out / f).stat().st_size > 0, f
    text = (out / "results.md").read_text()
    assert all(f"| {v} |" in text for v in VARIANTS) and "ms / token" in text
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == len(VARIANTS) and all(len(r["eval"]["by_position"]) == 63 for r in runs)
    assert "copy learned at step" in text and "| – |" in text  # 3 steps: never
    # GPT-oss-20b: 12 windowed layers hold 128 positions, 12 global ones the whole context; 2 KiB per position
    per_position = 2 * 8 * 64 * 2  # keys and values, 8 kv heads of 64, bf16
    assert kv_20b(4096, True) == (12 * 4096 + 12 * 128) * per_position / 2**30
    assert kv_20b(4096, False) == 24 * 4096 * per_position / 2**30


def test_routing_layers_smoke_pooled_loss_is_blind_to_staggered_collapse(tmp_path):
    """3 steps from the staggered start (layer 0 on experts {0, 1}, layer 1 on {2, 3}): the pooled aux loss has no
    gradient there, so both pooled arms train exactly like no balancing (up to rounding), while the per-layer
    loss already moves the weights; the summary carries the paired tests."""
    from gptoss.experiments.routing_layers import METHODS

    out = tmp_path / "rl"
    assert main(["experiment", "routing-layers", "--steps", "3", "--seeds", "0", "1", "--out", str(out), "-q"]) == 0
    text = (out / "results.md").read_text()
    assert all(f"| {m} |" in text for m in METHODS) and "sign test" in text and "start: staggered" in text
    runs = json.loads((out / "runs.json").read_text())
    by = {(r["label"], r["seed"]): r["metrics"] for r in runs}
    for seed in (0, 1):
        first = by[("none", seed)][0]["expert_load"]
        assert first[0][:2] == [0.5, 0.5] and first[1][2:] == [0.5, 0.5]  # collapsed apart at the start
        none = [m["loss"] for m in by[("none", seed)]]

        def drift(label: str) -> float:  # largest relative loss difference from "none"
            return max(abs(m["loss"] - x) / x for m, x in zip(by[(label, seed)], none))

        for label in ("pooled 0.01", "pooled 0.02"):  # bf16 autocast: rounding of a ~0 gradient only
            assert drift(label) < 5e-5, (label, drift(label))
            assert [m["aux_loss"] for m in by[(label, seed)]] == pytest.approx([2.0] * 3, abs=1e-3)  # k: "balanced"
        per_layer = by[("per-layer 0.01", seed)]
        assert per_layer[0]["aux_loss"] > 7.0  # ≈ 2 layers × E·(P_0 + P_1) ≈ 2·4·0.88
        assert drift("per-layer 0.01") > 10 * max(drift("pooled 0.01"), drift("pooled 0.02"))
