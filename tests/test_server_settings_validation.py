"""Start-up validation: a bad flag or config value stops the server with a one-line error, before loading."""

from __future__ import annotations

import pytest

from server.cli import settings_from_args

BAD = [
    (["--dtype", "bf16"], "invalid setting: dtype must be one of auto, float32, bfloat16, float16, float64 (got 'bf16')"),
    (["--device", "gpu"], "invalid setting: device must be auto, cpu, cuda or cuda:N (got 'gpu')"),
    (["--max-num-seqs", "0"], "invalid setting: max_num_seqs must be a positive integer (got 0)"),
    (["--max-waiting", "-1"], "invalid setting: max_waiting must be an integer >= 0 (got -1)"),
    (["--memory-fraction", "1.5"], "invalid setting: memory_fraction must be in (0, 1] (got 1.5)"),
    (["--port", "70000"], "invalid setting: port must be in 0..65535 (got 70000)"),
    (["--log-level", "verbose"], "invalid setting: log_level must be debug, info, warning, error or critical (got 'verbose')"),
    (["--num-threads", "0"], "invalid setting: num_threads must be a positive integer (got 0)"),
    (["--device", "cuda", "--batch-invariant", "--sampler", "reference"], "invalid setting: batch_invariant on CUDA "
     "needs --sampler fast: the reference sampler's softmax and entropy reduce over the vocabulary with torch's "
     "kernels, whose order depends on the batch"),
    (["--device", "cuda:0", "--batch-invariant", "--dtype", "float64"],
     "invalid setting: batch_invariant on CUDA runs bfloat16, float16 or float32, not float64"),
    (["--max-model-len", "0"], "invalid setting: max_model_len must be a positive integer (got 0)"),
    (["--max-request-body-bytes", "0"], "invalid setting: max_request_body_bytes must be a positive integer (got 0)"),
    (["--sse-ping-seconds", "-1"], "invalid setting: sse_ping_seconds must be a number >= 0 (got -1.0)"),
    (["--graceful-shutdown-seconds", "-5"], "invalid setting: graceful_shutdown_seconds must be a number >= 0 (got -5.0)"),
    (["--max-n", "0"], "invalid setting: max_n must be a positive integer (got 0)"),
    (["--quantization", "int4"],
     "invalid setting: quantization must be one of none, fp8-experts, int8-experts (got 'int4')"),
    (["--quantization", "fp8-experts", "--dtype", "float16"],
     "invalid setting: quantization fp8-experts needs dtype auto, bfloat16 or float32 (got 'float16')"),
    (["--preprocess-concurrency", "0"], "invalid setting: preprocess_concurrency must be a positive integer (got 0)"),
    (["--image-fetch-concurrency", "0"], "invalid setting: image_fetch_concurrency must be a positive integer (got 0)"),
    (["--image-fetch-timeout-seconds", "inf"],
     "invalid setting: image_fetch_timeout_seconds must be a finite number > 0 (got inf)"),
    (["--trace-decoder", "--device", "cuda"], "invalid setting: trace_decoder is for CPU serving of unquantized "
     "experts (CUDA replays captured graphs; quantized experts run grouped_mm)"),
    (["--trace-decoder", "--quantization", "int8-experts"], "invalid setting: trace_decoder is for CPU serving of "
     "unquantized experts (CUDA replays captured graphs; quantized experts run grouped_mm)"),
    # combinations the model load used to refuse, after the server was up (or, the first, after the weights)
    (["--device", "cpu", "--trace-decoder", "--no-batch-invariant"], "invalid setting: trace_decoder needs batch "
     "invariance (its row-wise attention and experts): other experts branch on the routing, which a trace would "
     "freeze"),
    # keys no client could send (a header is ASCII; the server strips the token's white space): every request a 401
    (["--api-key", "clé-secrète"], "invalid setting: api keys must be printable ASCII without spaces (a key with "
     "another character could never be sent in an Authorization header)"),
    (["--api-key", " sk-x"], "invalid setting: api keys must be printable ASCII without spaces (a key with "
     "another character could never be sent in an Authorization header)"),
    (["--device", "cuda", "--data-parallel-size", "2"],
     "invalid setting: data_parallel_size applies to CPU serving (a GPU runs one engine)"),
    (["--model", ""], "invalid setting: model must be a local folder or a hub id"),
    (["--cors-allow-origin", "app.example.com"], "invalid setting: cors_allow_origins: 'app.example.com' is not an "
     "origin (scheme://host[:port], e.g. https://app.example.com) or *"),
]

needs_cpu_host = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="device auto picks CUDA here")


@needs_cpu_host
def test_device_auto_is_checked_as_the_device_it_picks():
    # on a machine without CUDA, auto is the CPU: a GPU memory cap cannot apply
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--model", "/some/model", "--device-memory-limit-gib", "10"])
    assert str(info.value) == "invalid setting: device_memory_limit_gib applies to CUDA devices (the device is cpu)"



@pytest.mark.parametrize("argv,message", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_values_stop_with_a_clear_message(argv, message):
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--model", "/some/model", *argv])
    assert str(info.value) == message


def test_bad_values_in_a_config_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("max-num-seqs: 4\nmemory-fraction: 0\n")
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--config", str(cfg)])
    assert str(info.value) == "invalid setting: memory_fraction must be in (0, 1] (got 0.0)"


@pytest.mark.parametrize("key,kind", [("max-n", "int"), ("host", "str"), ("api-key", "list"), ("log-level", "str"),
                                      ("ui", "bool"), ("max-json-values", "int"), ("device", "str")])
def test_a_config_key_without_a_value_is_refused(tmp_path, key, kind):
    """``key:`` with nothing after it is YAML's null: not a value of these settings (it used to pass
    unchecked, to crash later or, for host, to listen on every interface)."""
    cfg = tmp_path / "empty.yaml"
    cfg.write_text(f"{key}:\n")
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--config", str(cfg)])
    article = "an" if kind == "int" else "a"
    assert str(info.value) == f"config: '{key}' has no value: give {article} {kind} or leave the key out"


@pytest.mark.parametrize("value, shown", [("[a, b]", "['a', 'b']"), ("{x: 1}", "{'x': 1}"), ("yes", "True")])
def test_a_text_setting_refuses_a_list_a_mapping_or_a_bool(tmp_path, value, shown):
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text(f"served-model-name: {value}\n")
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--config", str(cfg)])
    assert str(info.value) == f"config: 'served-model-name' must be a str, got {shown}"
    cfg.write_text("served-model-name: 2024\n")  # a scalar YAML reads as a number is still a name
    assert settings_from_args(["--config", str(cfg)]).served_model_name == "2024"


def test_an_empty_value_keeps_its_meaning_where_none_is_one(tmp_path):
    cfg = tmp_path / "none.yaml"
    cfg.write_text("max-prompt-tokens:\nforward-threads:\n")
    s = settings_from_args(["--config", str(cfg)])
    assert s.max_prompt_tokens is None and s.engine.forward_threads is None


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--config", str(tmp_path / "nope.yaml")])
    assert str(info.value).startswith(f"config {tmp_path / 'nope.yaml'}: cannot read it")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max-num-seqs: [1, 2\n")
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--config", str(bad)])
    assert str(info.value).startswith(f"config {bad}: not valid YAML")


def test_good_values_pass():
    s = settings_from_args(["--model", "/m", "--dtype", "bfloat16", "--device", "cuda:1", "--port", "0", "--max-waiting", "0"])
    assert (s.engine.dtype, s.engine.device, s.port, s.engine.max_waiting) == ("bfloat16", "cuda:1", 0, 0)


@pytest.mark.parametrize("args,config,line", [
    (["--max-num-seqs", "0"], None, "invalid setting: max_num_seqs must be a positive integer (got 0)"),
    ([], "max-num-seqs: abc\n", "config: 'max-num-seqs' must be an int, got 'abc'"),
    (["--cors-allow-origin", "app.example.com"], None, "invalid setting: cors_allow_origins: 'app.example.com' is not "
     "an origin (scheme://host[:port], e.g. https://app.example.com) or *"),
])
def test_a_configuration_error_exits_with_status_2_and_one_line(tmp_path, args, config, line):
    """As a bad flag does (argparse's status): a supervisor tells "fix the configuration" from a model that
    failed to load (status 1)."""
    import os
    import subprocess
    import sys

    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
        args = ["--config", str(tmp_path / "c.yaml"), *args]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "server", "--model", "/some/model", *args], capture_output=True,
                          text=True, timeout=120, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, line), proc.stderr[-2000:]


def test_cors_origins_are_written_as_browsers_send_them():
    """http(s) origins are normalized (the guard and CORS compare them with a browser's Origin exactly); an
    extension's or app webview's origin, null and * are kept as given; anything else stops start-up."""
    from server.origins import normalized_origins

    given = ["HTTPS://App.Example.com:443/", "http://127.0.0.1:8080", "http://[::1]:80", "https://bücher.example",
             "CHROME-EXTENSION://abcdef", "tauri://localhost", "null", "*"]
    assert normalized_origins(given) == ["https://app.example.com", "http://127.0.0.1:8080", "http://[::1]",
                                         "https://xn--bcher-kva.example", "chrome-extension://abcdef",
                                         "tauri://localhost", "null", "*"]
    for bad in ("app.example.com", "https://app.example.com/path", "https://x:port", "https://",
                "chrome-extension://abcdef/page.html"):
        with pytest.raises(ValueError, match="is not an origin"):
            normalized_origins([bad])


@pytest.mark.parametrize("origins, warned", [(["null"], True), (["https://app.example.com", "*"], False)])
def test_a_null_origin_is_warned_of(caplog, origins, warned):
    """Any site can send Origin: null (a sandboxed frame): listing it admits every site, as * does."""
    import logging

    from server.app import create_app
    from server.settings import ServerSettings

    with caplog.at_level(logging.WARNING, logger="server"):
        create_app(ServerSettings(model="x", cors_allow_origins=origins))
    assert ("--cors-allow-origin null admits every site" in caplog.text) == warned


def test_validating_default_settings_imports_no_torch():
    """The container's health check reads the settings every 15 s: with the defaults (device auto) that must
    not import torch (seconds and hundreds of MB) just to learn which device auto means."""
    import os
    import subprocess
    import sys

    code = ("import sys; from server.cli import settings_from_args; settings_from_args(['--model', '/m']); "
            "print('torch' in sys.modules)")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo,
                         env=dict(os.environ, PYTHONPATH=repo))
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_batch_invariant_is_checked_against_the_device_auto_picks(monkeypatch):
    """With --device auto on a machine with a GPU, --batch-invariant --sampler reference is refused before
    the model loads, as with --device cuda (it would otherwise be found once the weights are in)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as info:
        settings_from_args(["--batch-invariant", "--sampler", "reference"])
    assert str(info.value).startswith("invalid setting: batch_invariant on CUDA needs --sampler fast")
