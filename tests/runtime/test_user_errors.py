"""User mistakes on `kt generate`/`chat`/`bench`: one ``kt: error:`` line and exit status 2.

Run in-process through `main`: an exception that escaped the user-error handler (what
would print a traceback) fails the test by propagating. Argument values are checked
before the model is opened, so most of these cases never read a weight.
"""

from __future__ import annotations

import pytest
from conftest import make_model_dir

from kt_core.cli.main import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer) -> str:
    path, _, _ = make_model_dir("qwen3-moe", tmp_path_factory, tokenizer)
    return str(path)


CASES = [
    # (extra arguments, expected fragment of the error)
    (["--rules", "/nonexistent/rules.yaml"], "rule file '/nonexistent/rules.yaml' not found"),
    (["--rules", "qwen3-moe-cpu-torch", "--device-map", "bogus"], "--device-map 'bogus': expected FROM=TO"),
    (["--rules", "qwen3-moe-cpu-torch", "--device-map", "cuda:0=tpu"], "'tpu' is not a device"),
    (["--rules", "qwen3-moe-cpu-torch", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 0, got -3"),
    (["--rules", "qwen3-moe-cpu-torch", "--max-length", "0"], "--max-length must be >= 1, got 0"),
    (["--rules", "qwen3-moe-cpu-torch", "--max-length", "2"], "beyond the cache size 2"),
    # A cache beyond any machine's address space: torch's allocation failure, told in --max-length's terms.
    (["--rules", "qwen3-moe-cpu-torch", "--max-length", str(10**14)], "out of memory allocating the KV cache for --max-length"),
    (["--rules", "qwen3-moe-cpu-torch", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--rules", "qwen3-moe-cpu-torch", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--rules", "qwen3-moe-cpu-torch", "--top-k", "0"], "top_k must be >= 1, got 0"),
    (["--rules", "qwen3-moe-cpu-torch", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--rules", "qwen3-moe-cpu-torch", "--threads", "0"], "--threads must be >= 1, got 0"),
    (["--rules", "qwen3-moe-cpu-torch", "--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
    (["--rules", "qwen3-moe-cpu-torch", "--temperature", "1", "--seed", str(2**64)], "seed must fit in 64 bits"),
    (["--rules", "qwen3-moe-cpu-torch", "--stop", ""], "--stop TEXT must not be empty"),
]


@pytest.mark.parametrize(("extra", "message"), CASES, ids=[c[1][:40] for c in CASES])
def test_generate_user_errors(extra, message, model_dir, capsys):
    assert main(["generate", "--model", model_dir, "--prompt", "hello world", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kt: error: ") and message in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "model '/nonexistent/model' is not a directory with a config.json"),
        (["--gguf", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: GGUF file not found"),
        ([], "give --model (a model directory or a .gguf file) or --gguf FILE"),
    ],
)
def test_generate_bad_model_paths(args, message, capsys):
    assert main(["generate", *args, "--rules", "qwen3-moe-cpu-torch", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kt: error: ") and message in err, err


def test_chat_and_bench_check_their_arguments(model_dir, capsys):
    assert main(["chat", "--model", model_dir, "--rules", "qwen3-moe-cpu-torch", "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["bench", "--model", model_dir, "--rules", "qwen3-moe-cpu-torch", "--gen-len", "0"]) == 2
    assert "--prompt-len and --gen-len must be >= 1" in capsys.readouterr().err


def test_argparse_mistakes_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--rules", "x", "--prompt", "hi", "--dtype", "float64"])
    assert info.value.code == 2
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_demo_checks_its_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KT_CACHE", str(tmp_path))
    assert main(["demo", "--max-new-tokens", "-1"]) == 2
    assert "--max-new-tokens must be >= 0, got -1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # checked before the demo model is built


def test_demo_cache_that_cannot_be_written(tmp_path, monkeypatch, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("KT_CACHE", str(not_a_folder / "kt"))
    assert main(["demo", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "kt: error: cannot write the demo model to" in err and "set KT_CACHE to a writable folder" in err, err


def test_config_of_another_architecture_than_the_gguf(model_dir, tmp_path, monkeypatch, capsys):
    """--model (a Qwen3-MoE directory) with --gguf of a DeepSeek file: said plainly, before any weight is read."""
    from kt_core.cli.demo_cmd import demo_model_path

    monkeypatch.setenv("KT_CACHE", str(tmp_path))
    deepseek_gguf = demo_model_path()
    capsys.readouterr()
    assert main(["generate", "--model", model_dir, "--gguf", deepseek_gguf, "--rules", "qwen3-moe-cpu-torch",
                 "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kt: error: ") and "holds a 'deepseek2' model" in err and "'qwen3_moe' config" in err
