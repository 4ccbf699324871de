# cvgraph — the two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CVGRAPH_HOME ?= $(CURDIR)/.cvgraph
export DAGSTER_HOME ?= $(CVGRAPH_HOME)/dagster
export DAGSTER_MAX_PARTITIONS_FOR_DA_TIMESTAMP_FETCH ?= 256

.PHONY: install demo test ui bench lint clean

install: $(STAMP)

# torch first, pinned: any other torch requirement would pull several GB of CUDA wheels.
$(STAMP): pyproject.toml
	@# Spark (the optional table writer, and its test) needs a JVM.
	command -v java >/dev/null || (apt-get update -q && apt-get install -y -q --no-install-recommends openjdk-17-jre-headless)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/cvgraph demo

test: install
	$(BIN)/pytest -q

ui: install
	$(BIN)/python -c 'from orchestration.profiles import dagster_home; dagster_home()'
	$(BIN)/dagster dev -w workspace.yaml

bench: install
	$(BIN)/python -m bench.run

clean:
	rm -rf $(CVGRAPH_HOME)
