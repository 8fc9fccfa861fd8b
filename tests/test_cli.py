"""The `anymodal` command: help, exit codes, one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from anymodal.cli import COMMANDS, main


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "anymodal.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for name, _ in COMMANDS:
        assert name in r.stdout


def test_no_command_and_unknown_command_exit_2(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


@pytest.mark.parametrize("args, needle", [
    (["tokenizer", "train", "text", "--config", "missing.yaml", "--out", "x"], "config file not found"),
    (["tokenizer", "train", "text", "--config", "tokenizer/text_demo", "bogus=1", "--out", "x"], "unknown config key 'bogus'"),
    (["tokenizer", "train", "text", "--config", "tokenizer/text_demo", "vocab_size=many", "--out", "x"], "vocab_size"),
    (["tokenizer", "decode", "text", "--tokenizer", "/nonexistent", "a.json", "b.txt"], "no text tokenizer"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("anymodal: error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_train_text_tokenizer_from_txt_and_round_trip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["a small red circle at the top left", "the blue square", "say: hello world"] * 50))
    r = run_cli("tokenizer", "train", "text", "--config", "tokenizer/text_demo", f"input={corpus}",
                "vocab_size=500", "--out", str(tmp_path / "tok"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tok" / "text.model").is_file() and "kind: text" in (tmp_path / "tok" / "config.yaml").read_text()
    (tmp_path / "in.txt").write_text("the blue square 🟦 <box><loc_1><loc_2><loc_3><loc_4></box>", encoding="utf-8")
    assert run_cli("tokenizer", "encode", "text", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / "in.txt"),
                   str(tmp_path / "ids.json")).returncode == 0
    assert len(json.loads((tmp_path / "ids.json").read_text())["ids"]) > 5
    assert run_cli("tokenizer", "decode", "text", "--tokenizer", str(tmp_path / "tok"), str(tmp_path / "ids.json"),
                   str(tmp_path / "out.txt")).returncode == 0
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == (tmp_path / "in.txt").read_text(encoding="utf-8")
