# slimdiff set-up and main jobs. Everything installs into .venv/ at the repository root.
# TORCH pins the torch build first so that no other package pulls a CUDA build;
# override it on other hardware, e.g. `make test TORCH="torch==2.5.1"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench teacher judge clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/slimdiff demo -o runs/demo

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The full bench of the README (long: run it in the background; rerun to resume).
bench: install
	$(BIN)/slimdiff bench --model digits-dit --budgets 0.5,0.25 -o bench/digits

# Reproduce the shipped default teacher and judge (long: run in the background).
teacher: install
	$(BIN)/slimdiff train --data digits --model DiT-T/2 --steps 8000 --batch-size 64 --lr 5e-4 \
		--warmup 200 --ema 0.999 --checkpoint-every 250 -o runs/digits-dit
	$(BIN)/python scripts/ship_teacher.py runs/digits-dit/model

judge: install
	$(BIN)/python scripts/train_judge.py

clean:
	rm -rf $(VENV) runs
