# tf-landmarks: `make demo` sets everything up and runs the main job on the synthetic data
# (synthetic set → shards → scratch stand-in → bottleneck → fine-tune → DELF);
# `make test` sets up and runs the default test suite (what CI runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DATA ?= data/synthetic
DEMO_RECORDS ?= records/synthetic
DEMO_RUNS ?= runs

.PHONY: install install-gpu demo test test-all bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,beam]'
	touch $(STAMP)

install: $(STAMP)

# tensorflow[and-cuda] and tensorflow-cpu ship the same `tensorflow` package: install the CUDA build
# last so that its files are the ones left on disk.
install-gpu: $(STAMP)
	$(BIN)/pip install --quiet -e '.[gpu]'
	$(BIN)/pip uninstall --yes tensorflow-cpu
	$(BIN)/pip install --quiet --force-reinstall --no-deps 'tensorflow~=2.21.0'

demo: $(STAMP)
	$(BIN)/tfl-synth --flagfile=configs/synthetic_data.flags --output_dir=$(DEMO_DATA)
	$(BIN)/tfl-build-records --flagfile=configs/synthetic_records.flags \
	  --train_csv=$(DEMO_DATA)/train.csv --test_csv=$(DEMO_DATA)/test.csv \
	  --image_dir=$(DEMO_DATA)/images --output_dir=$(DEMO_RECORDS)
	$(BIN)/tfl-inspect-records --records_dir=$(DEMO_RECORDS)
	@echo '== Stage 1: a stand-in backbone trained from scratch (no ImageNet download here)'
	$(BIN)/tfl-train --flagfile=configs/demo_scratch.flags --records_dir=$(DEMO_RECORDS) \
	  --workdir=$(DEMO_RUNS)/demo_scratch --noprogress
	@echo '== Stage 2: bottleneck: that backbone frozen, its features cached, a new head trained'
	$(BIN)/tfl-train --flagfile=configs/demo_bottleneck.flags --records_dir=$(DEMO_RECORDS) \
	  --weights=$(DEMO_RUNS)/demo_scratch/backbone.weights.h5 --workdir=$(DEMO_RUNS)/demo_bottleneck \
	  --noprogress
	@echo '== Stage 3: fine-tune: the bottleneck head on its backbone, upper blocks unfrozen'
	$(BIN)/tfl-train --flagfile=configs/demo_finetune.flags --records_dir=$(DEMO_RECORDS) \
	  --init_from=$(DEMO_RUNS)/demo_bottleneck --workdir=$(DEMO_RUNS)/demo_finetune --noprogress
	@echo '== Stage 4: DELF attention over the stand-in backbone (local features for verification)'
	$(BIN)/tfl-train --flagfile=configs/demo_delf.flags --records_dir=$(DEMO_RECORDS) \
	  --init_from=$(DEMO_RUNS)/demo_scratch --workdir=$(DEMO_RUNS)/demo_delf --noprogress

# The benchmarks recorded in BUILD_NOTES.md (about 5 minutes on 2 cores; run on a quiet machine).
bench: demo
	$(BIN)/python bench/bench_synthetic.py
	$(BIN)/python bench/bench_records.py
	$(BIN)/python bench/bench_input_pipeline.py --records_dir=$(DEMO_RECORDS)
	if [ -d ../shared/data/landmarks-real ]; then \
	  $(BIN)/tfl-build-records --flagfile=configs/landmarks_real.flags --noprogress && \
	  $(BIN)/python bench/bench_input_pipeline.py --records_dir=records/landmarks_real; fi

test: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow' -q -n 2

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_RECORDS) $(DEMO_RUNS) .pytest_cache
