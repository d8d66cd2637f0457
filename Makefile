# Two commands for a fresh clone: `make demo` and `make test`; on a GPU machine, `make gpu-check`.
# Each builds .venv if missing. Table 1: `make data` and `make reproduce` (ROWS=coco_mlp,nocaps and the
# recipes' variables); `make weights` fetches the original's released weights.
PY := .venv/bin/python
TORCH := torch==2.13.0

.PHONY: demo test gpu-check reproduce data weights clean

.venv/.installed: pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,app,data]"  # exact versions: constraints.txt
	$(PY) -m pip install --quiet --no-deps openai-clip==1.0.1  # tests' oracle: its clip/model.py, never imported as clip
	touch $@

demo: .venv/.installed
	$(PY) -m demo.shapes

# One worker per CPU core (pytest-xdist); each test module runs whole on one worker, which builds its
# module-scoped fixtures once; the modules go out longest first (tests/conftest.py), not by test count.
test: .venv/.installed
	$(PY) -m pytest -q -n auto --dist loadscope --no-loadscope-reorder tests

reproduce: .venv/.installed
	.venv/bin/clipcap-reproduce

data: .venv/.installed
	.venv/bin/clipcap-reproduce --fetch_only

weights: .venv/.installed
	.venv/bin/clipcap-fetch weights

gpu-check: .venv/.installed  # every GPU path on tiny data, in minutes: a table in gpu_check_out/
	HF_HUB_OFFLINE=1 $(PY) bench/gpu_check.py

clean:
	rm -rf .venv demo_out
