# Two commands on a fresh machine: `make train` (the main job) and `make test` (the whole suite).
# Each builds the environment (.venv) first when it is missing or older than the requirements.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Make variables → dotted config overrides, only for those given (see docs/configuration.md).
CONFIG ?= digits
DEVICE ?= auto
bool = $(if $(filter 1 true yes on,$(1)),true,false)
OVERRIDES = $(if $(MODEL),model.name=$(MODEL)) $(if $(G),model.group_size=$(G)) \
	$(if $(NORM),model.norm=$(NORM)) $(if $(PN),model.proxy_norm=$(call bool,$(PN))) \
	$(if $(REPLICAS),train.replicas=$(REPLICAS)) $(if $(INSTANCES),dist.instances=$(INSTANCES)) \
	$(if $(RES),data.resolution=$(RES)) $(if $(EPOCHS),train.epochs=$(EPOCHS)) \
	$(if $(BATCH),train.micro_batch=$(BATCH)) $(if $(DATA),data.dataset=$(DATA)) \
	$(if $(NNODES),dist.nnodes=$(NNODES)) $(if $(RDZV),dist.rdzv_endpoint=$(RDZV)) \
	$(if $(LAUNCHER_ARGS),'dist.launcher_args=$(LAUNCHER_ARGS)') \
	$(if $(DRY_RUN),dist.dry_run=$(call bool,$(DRY_RUN)))
RUN = $(PY) -m app
EXPERIMENT = $(PY) -m experiments

.PHONY: help train validate finetune plan paper study bench bench-report test test-faults compat conformance \
	lint clean env env-dev env-sdk sdk-python
.DEFAULT_GOAL := train
# CONFIG, when typed on the command line (or exported): a command that reads a run's own
# configuration (resume, validate, finetune) or plans a model's own job uses it only then.
config_given = $(filter command line environment,$(origin CONFIG))

help:
	@echo "Targets (make TARGET VAR=value ...):"
	@echo "  train         train (default: G16-B0 LN+PN on the embedded digits, 32 px); RESUME=runs/<run> continues a run"
	@echo "  validate      top-1 of a run (CKPT=, default the newest in runs/); RESOLUTIONS=64,96 sweeps sizes"
	@echo "  finetune      fine-tune a run at the test resolution (CKPT=, default the newest run)"
	@echo "  plan          IPU memory/pipeline plan of MODEL's own ImageNet job (its grid preset), or of CONFIG/DATA/RES"
	@echo "  paper         the paper's reduced-resolution recipe end to end, in one report; RESUME=runs/paper-… continues one"
	@echo "  study         the paper's claims in miniature (STUDIES=norms groups resolution)"
	@echo "  bench         throughput benchmark; writes runs/bench/ (untracked)"
	@echo "  bench-report  the same, rewriting the committed report in benchmarks/results/"
	@echo "  test          the whole suite (about 20 minutes on 2 CPU cores); test-faults: every fault case"
	@echo "  compat        the suite under the Poplar SDK's Python 3.8 + torch 2.0.1 (.venv-sdk)"
	@echo "  conformance   PopTorch 3.4's own tests on the emulator (POPTORCH_GITDIR=<poptorch clone's .git>)"
	@echo "  lint | env | env-dev | env-sdk | clean"
	@echo "Variables:"
	@echo "  CONFIG=digits|b2-g16-lnpn|file.yaml  DEVICE=auto|cpu|cuda|ipu|ipu-model  MODEL=b0..b7  G=1|16"
	@echo "  NORM=batch|group|layer  PN=1|0  REPLICAS=N  INSTANCES=N  RES=px  EPOCHS=N  BATCH=micro-batch"
	@echo "  DATA=digits|synthetic|/path/to/imagenet  RESUME=runs/<run>  CKPT=runs/<run>  NNODES=N RDZV=host:port"
	@echo "  LAUNCHER_ARGS='...'  DRY_RUN=1  ARGS='section.field=value ...' (any other setting)"
	@echo "The environment lives in .venv: .venv/bin/python -m app --help lists every command and option."

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

env: $(VENV)/.runtime
env-dev: $(VENV)/.dev

# RESUME=runs/<run>: continue that run with its own configuration (only the variables typed change it).
train: $(VENV)/.runtime
	$(RUN) train $(if $(RESUME),--resume $(RESUME) $(if $(config_given),--config $(CONFIG)),--config $(CONFIG)) \
		--device $(DEVICE) $(OVERRIDES) $(ARGS)

# validate / finetune: CKPT= a run folder or checkpoint (default: the newest run in runs/), with that
# run's own configuration unless CONFIG is given. RESOLUTIONS=224,256,288 or 160:320:16: validate
# sweeps them (accuracy-vs-resolution table and plot in the run folder).
validate: $(VENV)/.runtime
	$(RUN) validate $(if $(CKPT),--checkpoint $(CKPT)) $(if $(config_given),--config $(CONFIG)) \
		$(if $(RESOLUTIONS),--resolutions $(RESOLUTIONS)) --device $(DEVICE) $(OVERRIDES) $(ARGS)

finetune: $(VENV)/.runtime
	$(RUN) finetune $(if $(CKPT),--checkpoint $(CKPT)) $(if $(RESUME),--resume $(RESUME)) \
		$(if $(config_given),--config $(CONFIG)) \
		--device $(DEVICE) $(OVERRIDES) $(ARGS)

# Without CONFIG: the model's own ImageNet job (the grid preset of MODEL, G, NORM; app/plan.py).
plan: $(VENV)/.runtime
	$(RUN) plan $(if $(config_given),--config $(CONFIG)) $(OVERRIDES) $(ARGS)

paper: $(VENV)/.runtime
	$(EXPERIMENT) paper $(if $(RESUME),--resume $(RESUME),--config $(CONFIG) --device $(DEVICE) $(OVERRIDES)) $(ARGS)

# The paper's three claims in miniature (experiments/study.py): STUDIES= a subset of norms groups resolution.
# Rows, report and plot of each in benchmarks/results/study-<name>-<dataset>-<device>.*
STUDIES ?= norms groups resolution
study: $(VENV)/.runtime
	set -e; for s in $(STUDIES); do $(EXPERIMENT) study $$s --config $(CONFIG) --device $(DEVICE) $(OVERRIDES) $(ARGS); done

# bench writes to runs/bench/ (untracked); bench-report rewrites the committed benchmarks/results/.
bench: $(VENV)/.dev
	$(PY) -m benchmarks $(ARGS)

bench-report: $(VENV)/.dev
	$(PY) -m benchmarks --results $(ARGS)

test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 --dist loadgroup tests $(ARGS)

# The whole fault-injection matrix (kills, signals, full disks and every other failed write, bad
# files and values; docs/reliability.md); `make test` runs the first case of every family.
test-faults: $(VENV)/.dev
	FAULTS_FULL=1 $(PY) -m pytest -q -n 2 --dist loadgroup -m faults tests $(ARGS)

# The SDK's Python 3.8 + torch 2.0.1: the suite again, peers (timm, torchvision, wandb) skipped.
# A Python 3.8 that really runs (a pyenv shim answers for versions it does not select).
PYTHON_SDK ?= $(firstword $(foreach p,$(shell command -v python3.8) $(wildcard $(HOME)/.pyenv/versions/3.8*/bin/python),\
	$(shell $(p) -c 'import sys; assert sys.version_info[:2] == (3, 8)' >/dev/null 2>&1 && echo $(p))))
VENV_SDK ?= .venv-sdk

$(VENV_SDK)/.installed: requirements-sdk.txt
	@test -n "$(PYTHON_SDK)" || { echo "make compat needs Python 3.8 (set PYTHON_SDK=/path/to/python3.8)"; exit 2; }
	test -x $(VENV_SDK)/bin/python || $(PYTHON_SDK) -m venv $(VENV_SDK)
	$(VENV_SDK)/bin/python -m pip install -q -r requirements-sdk.txt
	touch $@

env-sdk: $(VENV_SDK)/.installed

sdk-python:
	@echo $(PYTHON_SDK)

compat: $(VENV_SDK)/.installed
	$(VENV_SDK)/bin/python -m pytest -q -n 2 --dist loadgroup tests $(ARGS)

# PopTorch 3.4's own test suite on the emulator (docs/emulator-conformance.md). Needs a clone of
# graphcore/poptorch (POPTORCH_GITDIR= its git directory; the tests are read from tag
# sdk/poptorch/3.4.0, never copied here) and the harness (CONFORMANCE_TOOLS). FILES= a subset.
CONFORMANCE_TOOLS ?= ../shared/tools/poptorch_conformance
# The SDK's Python plus torchvision 0.15.2 (torch 2.0.1's), which half_test.py imports: a venv of
# its own, so that `make compat` keeps running without the peers.
VENV_CONF ?= .venv-conformance
$(VENV_CONF)/.installed: requirements-sdk.txt
	@test -n "$(PYTHON_SDK)" || { echo "make conformance needs Python 3.8 (set PYTHON_SDK=/path/to/python3.8)"; exit 2; }
	test -x $(VENV_CONF)/bin/python || $(PYTHON_SDK) -m venv $(VENV_CONF)
	$(VENV_CONF)/bin/python -m pip install -q -r requirements-sdk.txt torchvision==0.15.2
	touch $@

conformance:
	@if [ -z "$(POPTORCH_GITDIR)" ]; then \
		echo "make conformance: skipped: set POPTORCH_GITDIR=<git dir of a graphcore/poptorch clone>"; \
	elif [ ! -f "$(CONFORMANCE_TOOLS)/run_suite.sh" ]; then \
		echo "make conformance: skipped: no harness at $(CONFORMANCE_TOOLS) (set CONFORMANCE_TOOLS=...)"; \
	else \
		$(MAKE) --no-print-directory $(VENV_CONF)/.installed && \
		POPTORCH_GITDIR="$(POPTORCH_GITDIR)" PY="$(CURDIR)/$(VENV_CONF)/bin/python" \
			bash "$(CONFORMANCE_TOOLS)/run_suite.sh"; \
	fi

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
