# dpo-lora: `make demo` trains the embedded default; `make test` runs the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= models/SmolLM2-135M-Instruct

.PHONY: setup demo test lint bench scale clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a CPU wheel here, the matching CUDA wheel elsewhere.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[plot,demo]"
	touch $@

# The tests also need the service's packages and the test tools (the demo does not wait for them).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,plot,demo,serve]"
	touch $@

setup: $(VENV)/.installed

$(MODEL_DIR)/.dpo-lora-complete: | setup
	$(VENV)/bin/dpo-lora fetch-default-model $(MODEL_DIR)

# Train, then show what changed: held-out prompts sampled from the reference and the policy,
# scored by the judge that labelled the pairs (mean reward, win rate, KL).
demo: setup $(MODEL_DIR)/.dpo-lora-complete
	$(VENV)/bin/dpo-lora train configs/demo.yaml --overwrite
	$(VENV)/bin/dpo-lora generate runs/demo --prompts data/sentiment/eval.jsonl --n 1 --max-new-tokens 32 --batch-size 64 \
		--reward data.sentiment_scorer:score

test: $(VENV)/.installed-test $(MODEL_DIR)/.dpo-lora-complete
	$(VENV)/bin/ruff check dpo_lora tests data bench examples && $(VENV)/bin/ruff format --check dpo_lora tests data bench examples
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 -n $(or $(JOBS),2) --dist loadgroup --no-loadscope-reorder

# dpo-lora against TRL's DPOTrainer on the same work (WORKLOAD=short|long); prints ratios.
bench: setup $(MODEL_DIR)/.dpo-lora-complete
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/compare_trl.py --workload $(or $(WORKLOAD),short)

# A random model of Llama-2-7B and of Llama-3-8B geometry written, trained, exported and loaded
# (GEOMETRY=llama2-7b|llama3-8b; ~1 h each on 2 cores, ~3x the model on disk); not run by CI.
scale: setup
	$(PY) bench/scale.py --geometry $(or $(GEOMETRY),llama2-7b)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check dpo_lora tests data bench examples && $(VENV)/bin/ruff format --check dpo_lora tests data bench examples

clean:
	rm -rf runs
