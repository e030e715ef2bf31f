"""`gptoss experiment NAME` (issue 9) at a tiny size: tables, plots and runs.json are written, numbers are sane."""

from __future__ import annotations

import json
import math

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
