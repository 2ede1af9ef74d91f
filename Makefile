# cd4ml — the two commands a fresh clone needs are `make pipeline` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export CD4ML_HOME ?= $(CURDIR)/.cd4ml

.PHONY: help install system-deps pipeline pipeline-favorita test nbtest pytest lab ui serve bento tracking-server export clean-nbs readme check-sync bench bench-scale clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): settings.ini setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip check
	@touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install cd4ml with its dev tools

system-deps: ## apt packages the browser and PostgreSQL tests need (chromium, postgresql)
	@if command -v chromium >/dev/null && command -v psql >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "system-deps: chromium and postgresql already installed"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium postgresql >/dev/null && \
	  echo "system-deps: installed chromium and postgresql"; \
	fi

pipeline: install ## run the whole default pipeline on generated data
	$(BIN)/cd4ml run

PRESET ?= favorita
pipeline-favorita: install ## opt-in, not in CI: the pipeline on the dask engine at Favorita's size, ~125 M rows (PRESET=medium: ~20 M); time and peak RSS
	$(BIN)/python scripts/pipeline_preset.py $(PRESET)

test: install nbtest pytest ## nbdev_test (notebook tests) + pytest (integration, end-to-end)

nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing

PYTEST_WORKERS ?= 2
pytest: install ## pytest on PYTEST_WORKERS processes (default 2; 0: in this one), each test file on one of them
	@$(BIN)/python -m pytest tests -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here, not a pass" >&2; exit 1; fi; exit $$rc

lab: install ## JupyterLab on nbs/ at http://127.0.0.1:$$PORT (default 8888); a step notebook run there binds to the last run
	$(BIN)/jupyter lab nbs --no-browser --ip 127.0.0.1 --port $${PORT:-8888} --ServerApp.port_retries=0 $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

ui: install ## open the MLflow UI on the workspace store
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CD4ML_HOME)/mlflow.db}" --port $${PORT:-5000}

tracking-server: install ## shared MLflow server: PostgreSQL store (CD4ML_DB_URI, default a local cluster in $$CD4ML_HOME/postgres), CD4ML_AUTH=1 for accounts; see deploy/README.md
	scripts/tracking-server

serve: install ## serve the champion: API, web page at http://127.0.0.1:3000/
	$(BIN)/cd4ml serve --port $${PORT:-3000}

bento: install ## package the champion as a Bento (bentoml build; BENTOML_HOME=$$CD4ML_HOME/bentoml)
	$(BIN)/cd4ml bento

export: install ## nbs/ → cd4ml/ (nbdev_export)
	$(BIN)/nbdev_export

clean-nbs: install ## strip outputs and metadata from notebooks (nbdev_clean)
	$(BIN)/nbdev_clean

readme: install ## README.md from nbs/index.ipynb
	$(BIN)/python .ci/readme.py

check-sync: install ## fail if cd4ml/ or README.md are out of sync with nbs/, or notebooks are not clean
	bash .ci/check-sync

bench: install ## benchmarks: simulator speed/memory, pipeline overhead and cache ratios, what each candidate adds on the default data and the 20 M-row preset (7-10 min; the first time +1-2 min and 0.5 GB in $$CD4ML_HOME; CD4ML_BENCH_MEDIUM=0 skips the preset), one model call compiled vs sklearn, serving vs mlflow, weeks to recover from a level shift, gain captured per model against the Bayes floor (15-20 min: three worlds, 40 training origins)
	@for b in bench/bench_*.py; do [ $$b = bench/bench_scale.py ] && continue; echo "== $$b"; $(BIN)/python $$b || exit $$?; done

bench-scale: install ## pandas vs dask engine at 1 M / 20 M rows (CD4ML_BENCH_SIZES=1M,20M,125M adds Favorita's size): time and peak RSS per step, table, plot
	$(BIN)/python bench/bench_scale.py

clean: ## delete the workspace (.cd4ml)
	rm -rf "$(CD4ML_HOME)"
