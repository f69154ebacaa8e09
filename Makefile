# llama_mp: `make install`, `make test`, `make demo`, `make bench`.
# CPU build of torch by default; `make install TORCH=torch` (or a CUDA wheel spec) for a GPU machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: install test test-quick demo bench bench-serve gpu-check clean
BENCH_ARGS ?= --new_tokens 256 --runs 3

install: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The edit-test loop: every in-process test, none that starts torchrun, a launcher or ranks (marks: pytest.ini).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not spawn and not slow" tests

demo: $(STAMP)
	@test -f $(DEMO)/params.json || $(PY) -m llama_mp synth $(DEMO) --mp 2
	$(VENV)/bin/torchrun --nproc_per_node 2 --master_port 29517 launch/text_completion.py \
		--ckpt_dir $(DEMO) --tokenizer_path $(DEMO)/tokenizer.model --max_gen_len 32 --backend gloo --device cpu

# Decode speed on this machine (docs/performance.md): llama2.c's 15M and 110M shapes, 1 and 2 ranks.
bench: $(STAMP)
	$(PY) -m llama_mp bench --dim 288 --n_layers 6 --n_heads 6 --multiple_of 32 $(BENCH_ARGS) --compare transformers
	$(VENV)/bin/torchrun --nproc_per_node 2 --master_port 29518 launch/bench.py --dim 288 --n_layers 6 --n_heads 6 \
		--multiple_of 32 --backend gloo --device cpu $(BENCH_ARGS)
	$(PY) -m llama_mp bench --dim 768 --n_layers 12 --n_heads 12 --multiple_of 32 $(BENCH_ARGS) --compare transformers

# Server throughput (README "Server"): a 2-rank CPU server on llama2.c's 15M shape, driven by 1, 4 and 8
# concurrent clients with 16-token answers; SIGTERM then stops it (its ranks exit 0).
SERVE_DIR ?= build/bench15m
SERVE_PORT ?= 8019
bench-serve: $(STAMP)
	@test -f $(SERVE_DIR)/params.json || $(PY) -m llama_mp synth $(SERVE_DIR) --dim 288 --n_layers 6 --n_heads 6 --mp 2
	@$(VENV)/bin/torchrun --nproc_per_node 2 --master_port 29519 launch/serve.py --ckpt_dir $(SERVE_DIR) \
		--tokenizer_path $(SERVE_DIR)/tokenizer.model --port $(SERVE_PORT) --max_batch_size 8 --max_seq_len 256 \
		--backend gloo --device cpu & server=$$!; \
	for i in $$(seq 240); do curl -sf http://127.0.0.1:$(SERVE_PORT)/health >/dev/null && break; sleep 0.5; done; \
	$(PY) -m llama_mp bench-serve --url http://127.0.0.1:$(SERVE_PORT) --concurrency 1,4,8 --max_tokens 16; \
	status=$$?; pkill -TERM -P $$server; wait $$server; exit $$status

# Everything we check on a GPU (tests/gpu/ lane, bandwidth, bench of the 7B/8B shapes): one report in build/gpu-check/
# (or $OUT). Needs no install step: the venv's Python if there is one, else $(PYTHON) with the checkout on PYTHONPATH.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) -m llama_mp.tools.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
