# tf-landmarks: `make demo` sets everything up and runs the main job on the synthetic data
# (synthetic set → shards → EfficientNet-Lite0 bottleneck on ImageNet weights → fine-tune → DELF →
# index → export → predict → evaluate);
# `make test` sets up and runs the default test suite (what CI runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DATA ?= data/synthetic
DEMO_RECORDS ?= records/synthetic
DEMO_RUNS ?= runs
DEMO_EXPORT ?= exports/demo
DEMO_PREDICTIONS ?= predictions/demo

.PHONY: install install-gpu demo demo-real test test-all bench clean

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
	@echo '== Stage 1: bottleneck: EfficientNet-Lite0 with ImageNet weights, frozen; its features cached, a head trained'
	$(BIN)/tfl-train --flagfile=configs/demo_bottleneck.flags --records_dir=$(DEMO_RECORDS) \
	  --workdir=$(DEMO_RUNS)/demo_bottleneck --noprogress
	@echo '== Stage 2: fine-tune: the bottleneck head on its backbone, upper blocks unfrozen'
	$(BIN)/tfl-train --flagfile=configs/demo_finetune.flags --records_dir=$(DEMO_RECORDS) \
	  --init_from=$(DEMO_RUNS)/demo_bottleneck --workdir=$(DEMO_RUNS)/demo_finetune --noprogress
	@echo '== Stage 3: DELF attention over the fine-tuned backbone (local features for verification)'
	$(BIN)/tfl-train --flagfile=configs/demo_delf.flags --records_dir=$(DEMO_RECORDS) \
	  --init_from=$(DEMO_RUNS)/demo_finetune --workdir=$(DEMO_RUNS)/demo_delf --noprogress
	@echo '== Stage 4: the index: DELF features and global descriptors of the train and validation images'
	$(BIN)/tfl-build-index --run=$(DEMO_RUNS)/demo_finetune --local_features=delf \
	  --delf_run=$(DEMO_RUNS)/demo_delf --split=train+validation --overwrite --noprogress
	@echo '== Stage 5: export: the classifier SavedModel (TF Serving layout), DELF SavedModel and index'
	$(BIN)/tfl-export --run=$(DEMO_RUNS)/demo_finetune --output_dir=$(DEMO_EXPORT) --overwrite
	@echo '== Stage 6: predict: the nearest index images propose landmarks, DELF + RANSAC verify the best'
	$(BIN)/tfl-predict --flagfile=configs/demo_predict.flags --export=$(DEMO_EXPORT) \
	  --output_dir=$(DEMO_PREDICTIONS) --noprogress
	@echo '== Stage 7: evaluate: GAP before and after verification, mAP@100, the report'
	$(BIN)/tfl-evaluate --predictions_dir=$(DEMO_PREDICTIONS) \
	  --recognition_solution=$(DEMO_DATA)/recognition_solution.csv \
	  --retrieval_solution=$(DEMO_DATA)/retrieval_solution.csv --report_dir=$(DEMO_PREDICTIONS)/report

# The same chain on the real photos in ../shared/data/landmarks-real (8 landmarks, 67 queries of
# which 43 show none): EfficientNet-Lite0 bottleneck, DELF attention over it, a DELF index, the
# knn first stage with verification of its 3 best landmarks.
REAL_DATA ?= ../shared/data/landmarks-real
demo-real: $(STAMP)
	$(BIN)/tfl-build-records --flagfile=configs/landmarks_real.flags --noprogress
	$(BIN)/tfl-train --flagfile=configs/real_bottleneck.flags --records_dir=records/landmarks_real \
	  --workdir=$(DEMO_RUNS)/real_bottleneck --noprogress
	$(BIN)/tfl-train --flagfile=configs/real_delf.flags --records_dir=records/landmarks_real \
	  --init_from=$(DEMO_RUNS)/real_bottleneck --workdir=$(DEMO_RUNS)/real_delf --noprogress
	$(BIN)/tfl-build-index --run=$(DEMO_RUNS)/real_bottleneck --local_features=delf \
	  --delf_run=$(DEMO_RUNS)/real_delf --split=train+validation --overwrite --noprogress
	$(BIN)/tfl-export --run=$(DEMO_RUNS)/real_bottleneck --output_dir=exports/real --overwrite
	$(BIN)/tfl-predict --flagfile=configs/real_predict.flags --export=exports/real \
	  --test_csv=$(REAL_DATA)/test.csv --image_dir=$(REAL_DATA)/images \
	  --output_dir=predictions/real --noprogress
	$(BIN)/tfl-evaluate --predictions_dir=predictions/real \
	  --recognition_solution=$(REAL_DATA)/recognition_solution.csv \
	  --retrieval_solution=$(REAL_DATA)/retrieval_solution.csv --report_dir=predictions/real/report

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

# The slow tests include rendering the evaluation report in headless Chromium (Debian's package).
test-all: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || \
	  echo 'chromium is not installed: the report-rendering test will be skipped'
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_RECORDS) $(DEMO_RUNS) $(DEMO_EXPORT) $(DEMO_PREDICTIONS) \
	  records/landmarks_real exports/real predictions/real \
	  .pytest_cache
