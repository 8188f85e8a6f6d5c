# g2rpo: `make run` trains the embedded default on CPU, `make test` runs the suite.
# Both create .venv on first use from the committed lock (requirements/lock.txt), so an upstream release
# cannot change what is installed. On a GPU machine install a CUDA build of torch instead; everything else
# still comes from the lock:
#   make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" run
PYTHON ?= python3
VENV   ?= .venv
LOCK   := requirements/lock.txt
TORCH  ?= $(shell grep -m1 '^torch==' requirements/torch.txt)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LATEST := .venv-latest
LOCKER := .venv-lock
PIP_TOOLS := pip-tools==7.7.0

.DEFAULT_GOAL := help
.PHONY: help install lock test-latest run test test-all docs bench bench-gpu gpu-check plans reproduce base-model edit-model unified-model judge-model reward-model arith-model curate-shapes lint format clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-13s %s\n", $$1, $$2}'

$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, so that no dependency resolves it to a multi-GB CUDA build on CPU machines
	$(PY) -m pip install $(TORCH)
	# then everything else at the locked versions; the lock's own torch line (the CPU build) is left out
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(PY) -m pip install -r $(VENV)/lock-without-torch.txt
	$(PY) -m pip install --no-deps -e .
	$(PY) -m pip check
	touch $@

install: $(STAMP) ## Create .venv and install g2rpo with its dev extras, at the versions in requirements/lock.txt

lock: ## Re-resolve requirements/lock.txt after a dependency change in pyproject.toml; ARGS=--upgrade takes the newest releases
	test -x $(LOCKER)/bin/pip-compile || ($(PYTHON) -m venv $(LOCKER) && $(LOCKER)/bin/python -m pip install $(PIP_TOOLS))
	$(LOCKER)/bin/pip-compile --output-file $(LOCK) $(ARGS) pyproject.toml

test-latest: ## Drift check, not in CI: a fresh .venv-latest with the newest releases pyproject.toml allows, then the suite
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install $(TORCH)
	$(LATEST)/bin/python -m pip install -e ".[dev,docs]"
	$(LATEST)/bin/python -m pip check
	$(LATEST)/bin/python requirements/drift.py $(LOCK)
	@echo "Held back by a bound in pyproject.toml, a dependency's bound or the torch pin (newest on the index):"
	-$(LATEST)/bin/python -m pip list --outdated --exclude-editable
	$(LATEST)/bin/python -m pytest -m "not slow" --deselect tests/test_lock.py::test_the_environment_is_the_lock $(ARGS)

run: $(STAMP) ## Train Flow-GRPO on the shapes world, with held-out GenEval tables before/after; make run ARGS="seed=1"
	$(PY) -m g2rpo.run experiment=quickstart $(ARGS)

test: $(STAMP) ## Run the test suite (fast tests; slow and GPU tests are skipped)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: $(STAMP) ## Run every test, slow ones included
	$(PY) -m pytest $(ARGS)

docs: $(STAMP) ## Build the manual (docs/) into site/ with mkdocs --strict
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench: $(STAMP) ## Framework overhead and peak memory (tiny SD3, shapes base), then each speed lever on/off and make run's iteration (~10 min)
	$(PY) -m experiments.bench model=tiny_sd3 $(ARGS)
	$(PY) -m experiments.bench model=shapes $(ARGS)
	$(PY) -m experiments.levers $(ARGS)

GPU_ALGOS := flow_grpo dance_grpo mix_grpo g2rpo dgpo
bench-gpu: $(STAMP) ## GPU only (else it says it skipped): SD3.5-M-shaped random model, 512 px, LoRA, groups of 24, per algorithm
	for algo in $(GPU_ALGOS); do $(PY) -m experiments.bench model=sd35_medium_random trainer=gpu algo=$$algo --images 48 $(ARGS) || exit 1; done
	$(PY) -m experiments.levers model=sd35_medium_random trainer=gpu reward=jpeg_compressibility data=animals curriculum.prompts_per_iteration=2 curriculum.group_size=24 algo.rollout_batch_size=8 --iterations 0 $(ARGS)

gpu-check: $(STAMP) ## First minutes on a GPU (~8 min; else it says it skipped): every algorithm, 2 checked iterations of an SD3.5-M-sized model
	$(PY) -m experiments.gpu_check $(ARGS)

plans: $(STAMP) ## Plan every paper preset on fake weights, and validate the planner against real CPU executions
	$(PY) -m experiments.plans $(ARGS)

reproduce: $(STAMP) ## Run the experiment suites and regenerate the result tables and curves
	$(PY) -m experiments.reproduce $(ARGS)

BASE_STEPS := 12000
base-model: $(STAMP) ## Regenerate the shapes base model in g2rpo/shapes/weights/base (deterministic; see its README)
	$(PY) -m g2rpo.shapes.training.base --steps $(BASE_STEPS) --threads 2 --out g2rpo/shapes/weights/base

EDIT_STEPS := 3000
edit-model: $(STAMP) ## Regenerate the shapes editing model in g2rpo/shapes/weights/edit from the base (deterministic; see its README)
	$(PY) -m g2rpo.shapes.training.edit --steps $(EDIT_STEPS) --threads 2 --out g2rpo/shapes/weights/edit

UNIFIED_STEPS := 5000
unified-model: $(STAMP) ## Regenerate the shapes world's unified model in g2rpo/shapes/weights/unified (see its README)
	$(PY) -m g2rpo.shapes.training.unified --steps $(UNIFIED_STEPS) --out g2rpo/shapes/weights/unified

judge-model: $(STAMP) ## Regenerate the shapes judge in g2rpo/shapes/weights/judge from the unified model (format cold start, then token GRPO; see its README)
	$(PY) -m g2rpo.shapes.training.judge --threads 2 --out g2rpo/shapes/weights/judge

ARITH_STEPS := 2300
arith-model: $(STAMP) ## Regenerate the arithmetic world's small Llama in g2rpo/reasoning/weights/arithmetic (deterministic; see its README)
	$(PY) -m g2rpo.reasoning.training --steps $(ARITH_STEPS) --threads 2 --out g2rpo/reasoning/weights/arithmetic

REWARD_STEPS := 400
reward-model: $(STAMP) ## Regenerate the shapes_score model in g2rpo/shapes/weights/shapes_score
	$(PY) -m g2rpo.shapes.training.score --steps $(REWARD_STEPS) --out g2rpo/shapes/weights/shapes_score

CURATE_PROMPTS := 256
curate-shapes: $(STAMP) ## Curate the shapes train prompts with the shipped base (256 x 8 ODE samples, GenEval-shapes >= 0.9) into outputs/curated/shapes
	$(PY) -m g2rpo.curate model=shapes reward=geneval_shapes data=shapes curate.max_prompts=$(CURATE_PROMPTS) curate.samples_per_prompt=8 curate.num_steps=10 curate.guidance_scale=4.5 curate.threshold=0.9 curate.output=outputs/curated/shapes $(ARGS)

lint: $(STAMP) ## Ruff lint and format check
	$(PY) -m ruff check g2rpo experiments tests requirements
	$(PY) -m ruff format --check g2rpo experiments tests requirements

format: $(STAMP) ## Apply ruff fixes and formatting
	$(PY) -m ruff check --fix g2rpo experiments tests requirements
	$(PY) -m ruff format g2rpo experiments tests requirements

clean: ## Remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun wandb lightning_logs .pytest_cache .ruff_cache site
