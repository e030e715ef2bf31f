"""A checkpoint larger than memory: decode speed and time to the first token under memory limits, gptoss
(experts streamed, gptoss/streaming.py) against llama.cpp, paired, from a cold page cache.

    python benchmarks/bench_streaming.py /data/gpt-oss-20b --gguf /data/gpt-oss-20b.gguf \\
        --llama-bin /path/to/llama.cpp/build/bin --fractions 1 0.7 0.5 0.4 --rounds 3 --json out.json

Each run is a fresh process in a memory cgroup of its own (v2 `memory.max` or v1 `memory.limit_in_bytes`,
limit = fraction × the checkpoint's bytes; fraction 1 means no limit) after the page cache was dropped, so
that it starts as on a machine with that much memory. Runs alternate between the programs and the limits
within a round. Needs root (cgroups, drop_caches).

- gptoss: under a limit, `load_model` with its defaults (it decides alone whether to stream and with what
  pool); with no limit, the checkpoint mapped whole (as on a machine with room for it, whatever else runs
  beside the benchmark). A prompt of --prompt-tokens random ids, --tokens greedy tokens. TTFT is from the process's start to the first
  token (loading included); decode is the median step after the first.
- llama.cpp: `llama-bench -p P -n N -r 1 --no-warmup` with each flag set of --llama-flags (its default, and
  mmap without repacking, which is what works under a limit); decode is its tg rate, TTFT the process's
  wall time less the tg test's time (loading and the prompt).
The disk's sequential read bandwidth is measured in the same run (a 2 GiB read after dropping the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


# ---------------------------------------------------------------- the child: one gptoss run
def child(args: argparse.Namespace) -> None:
    start = float(os.environ.get("BENCH_START", time.time()))
    import torch

    from gptoss.generate import SamplingParams, generate
    from gptoss.loading import load_model
    from gptoss.vocab import unwrap

    torch.manual_seed(0)
    model = load_model(args.checkpoint, device="cpu", progress=False, memory_budget_gib=args.memory_budget)
    loaded = time.time()
    prompt = torch.randint(1000, 100000, (args.prompt_tokens,)).tolist()
    stamps = []
    pool = getattr(unwrap(model), "expert_pool", None)
    if pool is not None:
        pool.predict = not args.no_predict
    prefill_bytes = 0
    for _ in generate(model, [prompt], SamplingParams(temperature=0.0, max_tokens=args.tokens)):
        stamps.append(time.time())
        if pool is not None and len(stamps) == 1:  # decode's own traffic from here on
            from gptoss.streaming import StreamStats

            prefill_bytes, pool.stats = pool.stats.bytes_read, StreamStats()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    out = {"load_s": loaded - start, "ttft_s": stamps[0] - start, "prefill_s": stamps[0] - loaded,
           "decode_tok_s": 1 / statistics.median(steps), "steps_s": steps, "streaming": pool is not None,
           "rss_anon_gib": int(status["RssAnon"].split()[0]) / 2**20, "vm_hwm_gib": int(status["VmHWM"].split()[0]) / 2**20}
    if pool is not None:
        s = pool.stats
        out |= {"pool_slots": pool.slots, "pool_gib": pool.nbytes() / 2**30, "prefill_bytes": prefill_bytes,
                "bytes_read": s.bytes_read, "summary": s.summary(), "prefetched": s.prefetched,
                "prefetch_hits": s.prefetch_hits, "prefetch_wasted": s.prefetch_wasted,
                "mb_per_token": s.bytes_per_token() / 1e6, "hit_rate": s.hits / max(s.hits + s.misses, 1),
                "read_gb_s": s.bytes_read / s.read_seconds / 1e9 if s.read_seconds else None}
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- the parent
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_cgroup(name: str, limit: int | None) -> Path | None:
    """A fresh memory cgroup with `limit` bytes (None: no cgroup)."""
    if limit is None:
        return None
    if (CGROUP_V1 / "memory.limit_in_bytes").exists():
        cg = CGROUP_V1 / name
        cg.mkdir(exist_ok=True)
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        return cg
    cg = CGROUP_V2 / name
    cg.mkdir(exist_ok=True)
    (cg / "memory.max").write_text(str(limit))
    (cg / "memory.swap.max").write_text("0")
    return cg


def run_in(cg: Path | None, cmd: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    """Run cmd inside cgroup cg; (exit code, output, wall seconds). A run past `timeout` is killed (code -9)."""
    shell = f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))} && exec " if cg else "exec "
    start = time.time()
    env = env | {"BENCH_START": repr(start)}
    p = subprocess.Popen(["sh", "-c", shell + " ".join(map(shlex.quote, cmd))], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        return -9, out, time.time() - start
    return p.returncode, out, time.time() - start


def oom_killed(cg: Path | None) -> bool:
    if cg is None:
        return False
    for name in ("memory.oom_control", "memory.events"):
        f = cg / name
        if f.exists():
            for line in f.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("oom_kill", "oom_kill ") and int(value or 0) > 0:
                    return True
    return False


def disk_bandwidth(files: list[Path], nbytes: int = 2 * 2**30) -> float:
    drop_caches()
    buf = bytearray(64 * 2**20)
    done, start = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while done < nbytes:
                n = fh.readinto(buf)
                if not n:
                    break
                done += n
        if done >= nbytes:
            break
    return done / (time.perf_counter() - start)


def pool_read_bandwidth(checkpoint: Path, experts: int = 96, threads: int = 4, seed: int = 0) -> dict:
    """The disk's ceiling for the pool's own reads: `experts` random whole experts (one decoded token's worth on
    the 20b) read by an ExpertPool's reader threads (O_DIRECT where allowed), (a) all in flight at once, the most
    that overlap can get, and (b) 4 at a time as a layer without prefetch asks for them. Bytes/s of each."""
    import random

    import torch

    from gptoss.checkpoint import CheckpointReader
    from gptoss.streaming import ExpertPool, expert_extents

    reader = CheckpointReader(checkpoint)
    c = reader.config
    biases = [(torch.zeros(c.num_experts, 2 * c.intermediate_size), torch.zeros(c.num_experts, c.hidden_size))
              for _ in range(c.num_hidden_layers)]
    rng = random.Random(seed)
    result = {}
    for name, group in (("all_in_flight", experts), ("four_at_a_time", c.experts_per_token)):
        drop_caches()
        pool = ExpertPool(c, expert_extents(reader), biases, experts, threads=threads)
        for t in pool.targets.values():  # fault the slots' pages in first: a running pool's slots are reused
            t.zero_()
        try:
            picks = [(rng.randrange(c.num_hidden_layers), e)
                     for _ in range(experts // c.experts_per_token)
                     for e in rng.sample(range(c.num_experts), c.experts_per_token)]
            start = time.perf_counter()
            if group == experts:
                for layer, e in picks:  # a prefetch per expert: all reads queued before any is waited for
                    pool.prefetch(layer, [e])
                for layer in sorted({layer for layer, _ in picks}):
                    pool.lookup(layer, sorted({e for l2, e in picks if l2 == layer}))
            else:
                for i in range(0, len(picks), group):
                    layer = picks[i][0]
                    pool.lookup(layer, sorted({e for _, e in picks[i:i + group]}))
            seconds = time.perf_counter() - start
            result[name] = pool.stats.bytes_read / seconds
            result["direct_io"] = all(direct for _, direct in pool._fds.values())
        finally:
            pool.close()
    return result


def gptoss_run(args, cg) -> dict:
    cmd = [sys.executable, __file__, "--child", str(args.checkpoint), "--prompt-tokens", str(args.prompt_tokens),
           "--tokens", str(args.tokens)] + (["--no-predict"] if args.no_predict else [])
    if cg is None:  # no limit: the machine has room for the checkpoint (whatever else runs beside it now)
        cmd += ["--memory-budget", "1e6"]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE"}
    code, out, wall = run_in(cg, cmd, env, args.timeout)
    result = {"code": code, "wall_s": wall, "oom": oom_killed(cg)}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result |= json.loads(line[7:])
        elif line.startswith("gptoss: streaming"):
            result["message"] = line
    if "decode_tok_s" not in result:
        result["error"] = out[-2000:]
    return result


def llama_run(args, cg, flags: str) -> dict:
    binary = Path(args.llama_bin) / "llama-bench"
    cmd = [str(binary), "-m", str(args.gguf), "-p", str(args.prompt_tokens), "-n", str(args.tokens), "-r", "1",
           "--no-warmup", "-t", str(args.threads), "-o", "json", *shlex.split(flags)]
    env = os.environ | {"LD_LIBRARY_PATH": str(args.llama_bin)}
    code, out, wall = run_in(cg, cmd, env, args.timeout)
    result = {"code": code, "wall_s": wall, "oom": oom_killed(cg), "flags": flags}
    try:
        tests = json.loads(out[out.index("["):out.rindex("]") + 1])
        tg = next(t for t in tests if t["n_gen"] > 0)
        result["decode_tok_s"] = tg["avg_ts"]
        result["ttft_s"] = wall - tg["avg_ns"] / 1e9
    except (ValueError, StopIteration, KeyError):
        result["error"] = out[-2000:]
    return result


def summarize(runs: list[dict], ceiling: float | None = None) -> str:
    """A markdown table; with `ceiling` (bytes/s the pool's reads reach), the share of it a streamed decode used."""
    rows = ["| program | limit | decode tok/s (median, min–max) | TTFT s (median, min–max) | runs ok | MB read/token |"
            " of the disk's ceiling |",
            "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["program"], r["fraction"]) for r in runs}, key=lambda k: (-k[1], k[0]))
    for program, fraction in keys:
        group = [r for r in runs if r["program"] == program and r["fraction"] == fraction]
        ok = [r for r in group if "decode_tok_s" in r]
        if ok:
            d = [r["decode_tok_s"] for r in ok]
            t = [r["ttft_s"] for r in ok]
            mb = [r["mb_per_token"] for r in ok if "mb_per_token" in r]
            head = (f"| {program} | {fraction:g}× | {statistics.median(d):.2f} ({min(d):.2f}–{max(d):.2f}) | "
                    f"{statistics.median(t):.1f} ({min(t):.1f}–{max(t):.1f}) | {len(ok)}/{len(group)} | ")
            if mb:
                used = statistics.median(m * 1e6 * r["decode_tok_s"] for m, r in zip(mb, ok))
                share = f"{used / ceiling:.0%}" if ceiling else "–"
                rows.append(head + f"{statistics.median(mb):.0f} | {share} |")
            else:
                rows.append(head + "– | – |")
        else:
            why = "OOM-killed" if any(r["oom"] for r in group) else ("timeout" if any(r["code"] == -9 for r in group)
                                                                      else "failed")
            rows.append(f"| {program} | {fraction:g}× | – ({why}) | – | 0/{len(group)} | – | – |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-budget", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-predict", action="store_true", help="gptoss: no prefetching of the next layer's experts")
    p.add_argument("--gguf", type=Path, default=None, help="the same model for llama.cpp (omit: gptoss only)")
    p.add_argument("--llama-bin", default=None, help="folder with llama-bench and its libraries")
    p.add_argument("--llama-flags", nargs="*", default=["", "--repack 0 -lm mmap"],
                   help="llama-bench flag sets to run (default: its defaults, and mmap without repacking)")
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.4],
                   help="memory limits as fractions of the checkpoint's size (1: no limit)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--timeout", type=float, default=420.0, help="seconds before a run counts as failed")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    files = sorted(args.checkpoint.glob("*.safetensors"))
    ckpt_bytes = sum(f.stat().st_size for f in files)
    programs = [("gptoss", None)] + [(f"llama.cpp {f or 'defaults'}", f) for f in args.llama_flags if args.gguf]
    bandwidth, pool_bandwidth = [], []
    runs = []
    for rnd in range(args.rounds):
        bandwidth.append(disk_bandwidth(files))
        pool_bandwidth.append(pool_read_bandwidth(args.checkpoint))
        print(f"round {rnd + 1}: disk {bandwidth[-1] / 1e9:.2f} GB/s (one buffered stream); the pool's reads "
              f"{pool_bandwidth[-1]['all_in_flight'] / 1e9:.2f} GB/s all in flight, "
              f"{pool_bandwidth[-1]['four_at_a_time'] / 1e9:.2f} GB/s 4 at a time "
              f"(O_DIRECT: {pool_bandwidth[-1]['direct_io']})", flush=True)
        for fraction in args.fractions:
            limit = None if fraction >= 1 else int(fraction * ckpt_bytes)
            order = programs if rnd % 2 == 0 else programs[::-1]
            for name, flags in order:
                drop_caches()
                cg = make_cgroup(f"gptoss-bench-{os.getpid()}-{len(runs)}", limit)
                try:
                    r = gptoss_run(args, cg) if flags is None else llama_run(args, cg, flags)
                finally:
                    if cg is not None:
                        time.sleep(0.5)
                        try:
                            cg.rmdir()
                        except OSError:
                            pass
                r |= {"program": name, "fraction": fraction, "round": rnd, "limit_bytes": limit}
                runs.append(r)
                print(f"  {name:28s} {fraction:g}×: " + (f"{r['decode_tok_s']:.2f} tok/s, TTFT {r['ttft_s']:.1f} s"
                      if "decode_tok_s" in r else f"no result ({'OOM' if r['oom'] else r['code']})")
                      + (f", {r['mb_per_token']:.0f} MB/token" if "mb_per_token" in r else ""), flush=True)
    k = "all_in_flight"
    ceiling = statistics.median(b[k] for b in pool_bandwidth)
    table = summarize(runs, ceiling)
    bw = statistics.median(bandwidth)
    print(f"\ncheckpoint {ckpt_bytes / 2**30:.1f} GiB, disk read {bw / 1e9:.2f} GB/s (median of "
          f"{', '.join(f'{b / 1e9:.2f}' for b in bandwidth)}), the pool's reads all in flight {ceiling / 1e9:.2f} "
          f"GB/s (median of {', '.join(f'{b[k] / 1e9:.2f}' for b in pool_bandwidth)})\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint_bytes": ckpt_bytes, "disk_bandwidth": bandwidth,
                                         "pool_bandwidth": pool_bandwidth, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
