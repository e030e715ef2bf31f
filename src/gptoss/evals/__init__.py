"""`gptoss eval`: AIME-, GPQA- and HealthBench-style tasks against the local engine or any OpenAI-compatible
endpoint (graders.py: reading tasks, extraction, scoring; runner.py: requests, cache, summary, plot)."""
