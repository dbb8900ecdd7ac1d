# mlscore_jax: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# make train CONFIG=configs/vp/cifar10_ddpmpp_continuous.py WORKDIR=runs/cifar10_vp ARGS="--config.x=y"
CONFIG  ?= configs/cpu/digits_ddpmpp.py
WORKDIR ?= runs/$(basename $(notdir $(CONFIG)))
ARGS    ?=
MAIN    := $(PY) -m mlscore_jax.main
STAMP  := $(VENV)/.installed

.PHONY: install install-torch test test-slow lint format clean train train-deq eval demo bench \
	convert nll reproduce reproduce-scoreflow \
	reproduce-scoresde-vp-cifar10 reproduce-scoresde-vp-cifar10-deep \
	reproduce-scoresde-subvp-cifar10 reproduce-scoresde-subvp-cifar10-deep \
	reproduce-scoreflow-vp-cifar10 reproduce-scoreflow-vp-cifar10-deep \
	reproduce-scoreflow-subvp-cifar10 reproduce-scoreflow-subvp-cifar10-deep \
	reproduce-scoreflow-vp-imagenet32 reproduce-scoreflow-vp-imagenet32-deep \
	reproduce-scoreflow-subvp-imagenet32 reproduce-scoreflow-subvp-imagenet32-deep \
	table-digits table-mnist train-digits train-digits-mlp train-mnist train-toy2d \
	train-vp-cifar10 train-vp-cifar10-deep train-subvp-cifar10 train-subvp-cifar10-deep \
	train-vp-imagenet32 train-vp-imagenet32-deep train-subvp-imagenet32 train-subvp-imagenet32-deep

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# The tests also read the official PyTorch checkpoint fixture, so they need the torch extra.
# TORCH pins the release to install with it: 2.13.0 is the one whose CPU build (190 MB) lies on
# this project's machines; elsewhere pip fetches it from PyPI (add the CPU index for a small one).
TORCH ?= torch==2.13.0
TORCH_STAMP := $(VENV)/.installed-torch

install-torch: $(TORCH_STAMP)

$(TORCH_STAMP): $(STAMP)
	$(PY) -m pip install -e '.[dev,torch]' '$(TORCH)'
	touch $(TORCH_STAMP)

# Test files run in TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so its
# module fixtures are built once): the tests are mostly XLA compiles, one core each.
TEST_WORKERS ?= 2

# Two tiers (tests/conftest.py): `make test` the fast one, `make test-slow` the end-to-end,
# multi-process and kill/resume runs and the rest of the closed-form grids; CI runs both.
test: install install-torch
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

test-slow: install install-torch
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow tests

lint: install
	$(VENV)/bin/ruff check mlscore_jax tests experiments configs
	$(VENV)/bin/ruff format --check mlscore_jax tests experiments configs

format: install
	$(VENV)/bin/ruff format mlscore_jax tests experiments configs
	$(VENV)/bin/ruff check --fix mlscore_jax tests experiments configs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache

# The main job on the embedded default (scikit-learn digits), offline, about 5 min on 2 CPU cores.
demo: install
	$(PY) experiments/demo.py --workdir runs/demo

# Likelihood solver: this project's diffrax ODE NLL vs the official scipy RK45 method.
bench: install
	$(PY) experiments/bench_likelihood.py --workdir runs/bench_likelihood_digits

train: install
	$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=train $(ARGS)

# The variational dequantizer of a trained score model (second stage, WORKDIR/dequantizer).
train-deq: install
	$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=train_deq $(ARGS)

eval: install
	$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=eval $(ARGS)

# Small configurations for a CPU.
train-digits:     ; $(MAKE) train CONFIG=configs/cpu/digits_ddpmpp.py WORKDIR=runs/digits_ddpmpp
train-digits-mlp: ; $(MAKE) train CONFIG=configs/cpu/digits_mlp.py WORKDIR=runs/digits_mlp
train-mnist:      ; $(MAKE) train CONFIG=configs/cpu/mnist_ddpmpp.py WORKDIR=runs/mnist_ddpmpp
train-toy2d:      ; $(MAKE) train CONFIG=configs/cpu/toy2d_mlp.py WORKDIR=runs/toy2d_mlp

# The paper's rows (likelihood weighting + importance sampling), on every local device.
train-vp-cifar10:            ; $(MAKE) train CONFIG=configs/vp/cifar10_ddpmpp_continuous.py WORKDIR=runs/cifar10_vp
train-vp-cifar10-deep:       ; $(MAKE) train CONFIG=configs/vp/cifar10_ddpmpp_deep_continuous.py WORKDIR=runs/cifar10_deep_vp
train-subvp-cifar10:         ; $(MAKE) train CONFIG=configs/subvp/cifar10_ddpmpp_continuous.py WORKDIR=runs/cifar10_subvp
train-subvp-cifar10-deep:    ; $(MAKE) train CONFIG=configs/subvp/cifar10_ddpmpp_deep_continuous.py WORKDIR=runs/cifar10_deep_subvp
train-vp-imagenet32:         ; $(MAKE) train CONFIG=configs/vp/imagenet32_ddpmpp_continuous.py WORKDIR=runs/imagenet32_vp
train-vp-imagenet32-deep:    ; $(MAKE) train CONFIG=configs/vp/imagenet32_ddpmpp_deep_continuous.py WORKDIR=runs/imagenet32_deep_vp
train-subvp-imagenet32:      ; $(MAKE) train CONFIG=configs/subvp/imagenet32_ddpmpp_continuous.py WORKDIR=runs/imagenet32_subvp
train-subvp-imagenet32-deep: ; $(MAKE) train CONFIG=configs/subvp/imagenet32_ddpmpp_deep_continuous.py WORKDIR=runs/imagenet32_deep_subvp

# The paper's table at CPU scale (experiments/paper_table.py): trains and evaluates what is
# missing of every row x seed in runs/table_<dataset>, then writes experiments/results/<dataset>.md
# and its plots. A killed run resumes: run the same target again. TABLE_ARGS="--jobs 1" etc.
TABLE_ARGS ?= --jobs 2
MNIST_NPZ ?= ../shared/data
table-digits: install
	$(PY) experiments/paper_table.py --dataset digits $(TABLE_ARGS)
# --no-deq: on 28x28 the dequantizer stages cost more than this 2-core machine has (configs/table/rows.py)
table-mnist: install
	$(PY) experiments/paper_table.py --dataset mnist --rows vp_sigma2,vp_g2_is --seeds 1 --no-deq \
		$(if $(wildcard $(MNIST_NPZ)/mnist_train.npz),--mnist-npz $(MNIST_NPZ)) $(TABLE_ARGS)

# Released checkpoints (README "Released checkpoints"): convert one into WORKDIR, then evaluate.
# make convert CONFIG=configs/vp/cifar10_ddpmpp_deep_continuous.py SCORE=.../checkpoint_19 \
#     [DEQ=.../flowpp_dequantizer/checkpoints/checkpoint_6] WORKDIR=$(RELEASED)/...
SCORE ?=
DEQ   ?=
# .pth files need torch (the torch extra): installed when SCORE ends in .pth
convert: install
	@test -n "$(SCORE)" || { echo "usage: make convert CONFIG=... SCORE=PATH [DEQ=PATH] WORKDIR=..."; exit 2; }
	$(if $(filter %.pth,$(SCORE)),$(MAKE) install-torch)
	$(PY) -m mlscore_jax.convert --config=$(CONFIG) --workdir=$(WORKDIR) --score=$(SCORE) \
		$(if $(DEQ),--dequantizer=$(DEQ)) $(ARGS)

# Per-image bits/dim of image files: make nll CONFIG=... WORKDIR=... FILES="a.png b.png"
FILES ?=
nll: install
	$(PY) -m mlscore_jax.nll --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS) $(FILES)

# The paper's evaluation settings: test split, ODE at rtol = atol = 1e-5 with Dopri5 (the official
# RK45 tableau; not the faster default Bosh3 at 5e-5), REPEATS repeats (CIFAR-10 5, ImageNet 32
# 1), bound with 1000 time draws.
REPEATS ?= 5
PAPER_EVAL = --config.eval.bpd_dataset=test --config.eval.solver=dopri5 \
	--config.eval.rtol=1e-5 --config.eval.atol=1e-5 --config.eval.num_repeats=$(REPEATS)

# A score_sde model (lambda = sigma^2): ODE, uniform dequantization, no bound (score SDE Table 2).
reproduce: convert
	$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=eval $(PAPER_EVAL) \
		--config.eval.bound=False --config.eval.dequantization=uniform $(ARGS)

# A score_flow model: ODE and bound with uniform dequantization, then (with DEQ) variational.
reproduce-scoreflow: convert
	$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=eval $(PAPER_EVAL) \
		--config.eval.dequantization=uniform $(ARGS)
	$(if $(DEQ),$(MAIN) --config=$(CONFIG) --workdir=$(WORKDIR) --mode=eval $(PAPER_EVAL) \
		--config.eval.dequantization=variational $(ARGS))

# One target per released model row (paper numbers: README "Released checkpoints"), each in
# its own workdir under RELEASED.
RELEASED ?= runs/released
reproduce-scoresde-vp-cifar10:         ; $(MAKE) reproduce CONFIG=configs/vp/cifar10_ddpmpp_continuous.py WORKDIR=$(RELEASED)/scoresde_vp_cifar10
reproduce-scoresde-vp-cifar10-deep:    ; $(MAKE) reproduce CONFIG=configs/vp/cifar10_ddpmpp_deep_continuous.py WORKDIR=$(RELEASED)/scoresde_vp_cifar10_deep
reproduce-scoresde-subvp-cifar10:      ; $(MAKE) reproduce CONFIG=configs/subvp/cifar10_ddpmpp_continuous.py WORKDIR=$(RELEASED)/scoresde_subvp_cifar10
reproduce-scoresde-subvp-cifar10-deep: ; $(MAKE) reproduce CONFIG=configs/subvp/cifar10_ddpmpp_deep_continuous.py WORKDIR=$(RELEASED)/scoresde_subvp_cifar10_deep
reproduce-scoreflow-vp-cifar10:           ; $(MAKE) reproduce-scoreflow CONFIG=configs/vp/cifar10_ddpmpp_continuous.py WORKDIR=$(RELEASED)/scoreflow_vp_cifar10
reproduce-scoreflow-vp-cifar10-deep:      ; $(MAKE) reproduce-scoreflow CONFIG=configs/vp/cifar10_ddpmpp_deep_continuous.py WORKDIR=$(RELEASED)/scoreflow_vp_cifar10_deep
reproduce-scoreflow-subvp-cifar10:        ; $(MAKE) reproduce-scoreflow CONFIG=configs/subvp/cifar10_ddpmpp_continuous.py WORKDIR=$(RELEASED)/scoreflow_subvp_cifar10
reproduce-scoreflow-subvp-cifar10-deep:   ; $(MAKE) reproduce-scoreflow CONFIG=configs/subvp/cifar10_ddpmpp_deep_continuous.py WORKDIR=$(RELEASED)/scoreflow_subvp_cifar10_deep
reproduce-scoreflow-vp-imagenet32:        ; $(MAKE) reproduce-scoreflow REPEATS=1 CONFIG=configs/vp/imagenet32_ddpmpp_continuous.py WORKDIR=$(RELEASED)/scoreflow_vp_imagenet32
reproduce-scoreflow-vp-imagenet32-deep:   ; $(MAKE) reproduce-scoreflow REPEATS=1 CONFIG=configs/vp/imagenet32_ddpmpp_deep_continuous.py WORKDIR=$(RELEASED)/scoreflow_vp_imagenet32_deep
reproduce-scoreflow-subvp-imagenet32:     ; $(MAKE) reproduce-scoreflow REPEATS=1 CONFIG=configs/subvp/imagenet32_ddpmpp_continuous.py WORKDIR=$(RELEASED)/scoreflow_subvp_imagenet32
reproduce-scoreflow-subvp-imagenet32-deep:; $(MAKE) reproduce-scoreflow REPEATS=1 CONFIG=configs/subvp/imagenet32_ddpmpp_deep_continuous.py WORKDIR=$(RELEASED)/scoreflow_subvp_imagenet32_deep
