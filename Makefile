# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both create .venv when needed;
# re-running is fast because the install only repeats when requirements.txt changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEMO_DATA := data/demo_dataset
DEMO_SAVE := save_results
DEMO_MODEL := efficientnet_lite0

.PHONY: venv test test-fast test-browser test-avx2 demo demo-fast demo-after-training demo-data clean-demo

$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(INSTALLED)

venv: $(INSTALLED)

# One pytest-xdist worker per CPU (at most 4), each on one thread; a test file stays on one worker, so the module
# fixtures (an export, a phone program) are built once. 2 cores: 10.5 min instead of 18.5 in one process.
PARALLEL := -n logical --maxprocesses 4 --dist loadfile

test: $(INSTALLED)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PARALLEL)

test-fast: $(INSTALLED)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PARALLEL) -m "not slow"

# serve.py's page in headless Chromium (Debian's chromium and chromedriver, Selenium in .venv); a screenshot of the
# answered page goes to docs/serve_page.png.
test-browser: $(INSTALLED)
	command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver fonts-noto-cjk)
	$(PY) -c "import selenium" 2>/dev/null || $(PY) -m pip install --quiet --disable-pip-version-check "selenium>=4.20"
	HF_HUB_OFFLINE=1 SKINCLF_SCREENSHOT=docs/serve_page.png $(PY) -m pytest -q --browser tests/test_serve_browser.py

# The INT8 tests as on an x86 CPU with AVX2 but without VNNI, whatever this one has: Debian's x86 emulator qemu-user
# with -cpu Haswell, whose cpuid ONNX Runtime reads to pick its INT8 kernels (there they add pairs in 16 bits).
test-avx2: $(INSTALLED)
	command -v qemu-x86_64 >/dev/null || (apt-get update -qq && apt-get install -y -qq qemu-user)
	HF_HUB_OFFLINE=1 qemu-x86_64 -cpu Haswell $(PY) -m pytest -q -p no:cacheprovider --cpu-without-vnni \
		tests/test_int8_target_cpu.py

$(DEMO_DATA)/trainset: | $(INSTALLED)
	$(PY) -m data.synthetic_lesions --output $(DEMO_DATA)

demo-data: $(DEMO_DATA)/trainset

# Trains EfficientNet-Lite0 from its bundled (offline) ImageNet weights on the synthetic lesion photos, on CPU, then
# classifies the demo testset with Grad-CAM, exports FP32/INT8 ONNX and benchmarks them (3 min 30 s after install on
# an idle 2-core AMD EPYC). demo-fast skips the refit, trains 2 epochs at 96 px and times fewer iterations: the same
# steps in 2 min.
DEMO_TRAIN := --data_dir $(DEMO_DATA) --model_name $(DEMO_MODEL) --pre_trained True --batch_size 32 --lr_ae 0.0005 \
	--optimizer adamw --operating_point malignant:sensitivity=0.95 --abstain accuracy=0.95 --save_dir $(DEMO_SAVE)

demo: $(INSTALLED) $(DEMO_DATA)/trainset
	HF_HUB_OFFLINE=1 $(PY) main.py $(DEMO_TRAIN) --epochs 4 --img_size 128
	$(MAKE) --no-print-directory demo-after-training BENCH="--iterations 20 --warmup 3 --batch_sizes 1,8"

demo-fast: $(INSTALLED) $(DEMO_DATA)/trainset
	HF_HUB_OFFLINE=1 $(PY) main.py $(DEMO_TRAIN) --epochs 2 --img_size 96 --refit False
	$(MAKE) --no-print-directory demo-after-training BENCH="--iterations 10 --warmup 2 --batch_sizes 1 --rounds 2"

demo-after-training:
	$(PY) inference.py --model_path latest --inference_folder $(DEMO_DATA)/testset \
		--inference_output inference_results/demo --generate_gradcam --labels_from_folders
	$(PY) quantize_onnx_models.py --model_path latest --output_dir onnx_models
	$(PY) benchmark.py --model_path latest --onnx_model_dir onnx_models $(BENCH)
	@echo "run folder: the newest under $(DEMO_SAVE)/dataset+demo/ (open its report.html)"
	@echo "ONNX models: onnx_models/clf_model.onnx (FP32), onnx_models/clf_model_int8.onnx (INT8)"
	@echo "predictions: inference_results/demo/predictions.csv, Grad-CAM overlays: inference_results/demo/gradcam/"

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_SAVE)/dataset+demo inference_results/demo
