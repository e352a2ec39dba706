"""Library output during a conversion goes to one log file; the terminal keeps only what we write."""

import subprocess
import sys

SCRIPT = """
import logging, os, sys, warnings
from edge_sdk.converters.thirdparty_log import third_party_output

with third_party_output(sys.argv[1]) as terminal:
    print("banner on stdout")
    os.write(2, b"C-level line on fd 2\\n")
    logging.basicConfig(level=logging.INFO)  # what tokenicer does on import
    logging.getLogger("lib").info("library info")
    warnings.warn("library warning")
    terminal.write("our progress\\n")
logging.getLogger("httpx").info("after the conversion")
print("our result")
"""


def test_library_output_goes_to_the_log_and_its_logging_setup_is_undone(tmp_path):
    log = tmp_path / "logs" / "convert.log"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == ("our result\n", "our progress\n")
    text = log.read_text()
    for line in ("banner on stdout", "C-level line on fd 2", "library info", "library warning"):
        assert line in text
    assert "after the conversion" not in text


def test_default_log_is_one_file_per_process_under_the_cache(tmp_path, monkeypatch):
    from edge_sdk.converters import thirdparty_log

    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path))
    monkeypatch.setattr(thirdparty_log, "_process_log", None)
    p = thirdparty_log.default_log_path()
    assert p.parent == tmp_path / "logs" and p.name.startswith("convert-") and p.suffix == ".log"
    assert thirdparty_log.default_log_path() == p


def test_finished_conversion_moves_the_work_log_under_the_cache(tmp_path, monkeypatch):
    from edge_sdk.converters import thirdparty_log

    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(thirdparty_log, "_process_log", None)
    final = thirdparty_log.default_log_path()
    final.parent.mkdir(parents=True)
    final.write_text("earlier conversion\n")
    for keep in (False, True):
        work = tmp_path / f"b{keep}.work"
        log = thirdparty_log.work_log_path(work)
        work.mkdir()
        log.write_text(f"run {keep}\n")
        if keep:
            (work / "layer-0000.safetensors").write_bytes(b"x")  # --keep-work: the results stay
        assert thirdparty_log.keep_log(log) == final
        assert not log.exists() and work.exists() == keep
    assert final.read_text() == "earlier conversion\nrun False\nrun True\n"
