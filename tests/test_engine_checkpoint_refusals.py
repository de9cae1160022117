"""A plain checkpoint that cannot be loaded as it is stops the start-up with one line naming why, where
transformers alone would warn and serve a model with randomly initialised weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from engine import EngineSettings
from engine.errors import CheckpointError
from engine.loader import load_model
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPPED = "model.decoder.layers.0.experts.gate_up_proj"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("plain"), TinySpec(canvas_length=8))


def _copy(source, folder, change_tensors=None, change_config=None):
    folder.mkdir()
    for item in source.iterdir():
        if item.suffix == ".safetensors" and change_tensors is not None:
            tensors = load_file(item)
            change_tensors(tensors)
            save_file(tensors, folder / item.name, metadata={"format": "pt"})
        elif item.name == "config.json" and change_config is not None:
            config = json.loads(item.read_text())
            change_config(config)
            (folder / item.name).write_text(json.dumps(config))
        else:
            (folder / item.name).symlink_to(item)
    return folder


def test_the_intact_checkpoint_loads(source):
    assert load_model(EngineSettings(model=str(source))).quantization == "none"


def test_a_folder_without_a_tokenizer_is_refused(source, tmp_path):
    """transformers would build an empty tokenizer of a few special tokens (every prompt one unknown token,
    every answer empty): a folder with no tokenizer file is refused, in one line, before any weight is read."""
    folder = _copy(source, tmp_path / "m", change_tensors=lambda t: t.clear())  # no weight is read either
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    assert str(info.value) == (f"{folder}: no tokenizer in this folder (one of tokenizer.json, tokenizer.model, "
                               "vocab.json, vocab.txt, spiece.model)")


@pytest.mark.parametrize("dropped", [DROPPED, "model.decoder.layers.1.post_feedforward_layernorm.weight"])
def test_a_missing_tensor_is_refused_naming_it(source, tmp_path, dropped):
    folder = _copy(source, tmp_path / "m", change_tensors=lambda t: t.pop(dropped))
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    # the encoder's tied copy of the layer is missing with it
    assert str(info.value) == (f"the checkpoint {folder} has no tensor {dropped} (and 1 more): the model would run "
                               f"with it uninitialised")


def test_several_missing_tensors_are_counted(source, tmp_path):
    def drop_layer_norms(tensors):
        for name in [n for n in tensors if n.endswith("post_feedforward_layernorm.weight")]:
            del tensors[name]

    folder = _copy(source, tmp_path / "m", change_tensors=drop_layer_norms)
    with pytest.raises(CheckpointError, match=r"has no tensor model\.decoder\.layers\.0\.post_feedforward_layernorm"
                                              r"\.weight \(and \d+ more\): "):
        load_model(EngineSettings(model=str(folder)))


@pytest.mark.parametrize("method", ["modelopt", "whatever"])
def test_a_quantization_method_nobody_here_knows_is_refused(source, tmp_path, method):
    folder = _copy(source, tmp_path / "q", change_config=lambda c: c.update(quantization_config={"quant_method": method}))
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    assert str(info.value) == (f"the checkpoint {folder} is quantized with {method!r}, which neither this server "
                               f"(compressed-tensors) nor transformers can load")


def test_a_tensor_in_another_shape_is_refused_naming_both_shapes(source, tmp_path):
    name = "model.decoder.layers.1.post_feedforward_layernorm.weight"
    folder = _copy(source, tmp_path / "m", change_tensors=lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(CheckpointError) as info:
        load_model(EngineSettings(model=str(folder)))
    hidden = TinySpec().hidden_size
    assert str(info.value).startswith(f"the checkpoint {folder} holds {name} in shape [{hidden - 1}], expected "
                                      f"[{hidden}]")


def test_a_quantization_method_transformers_knows_goes_to_it():
    """Only the unknown ones are refused: transformers' own methods go to its loader (bitsandbytes is named
    by load_in_4bit / load_in_8bit, not by its quant_method alone)."""
    from types import SimpleNamespace

    from engine.loader import refuse_unknown_quantization

    refuse_unknown_quantization("DIR", SimpleNamespace(quantization_config={"quant_method": "fp8",
                                                                            "weight_block_size": [128, 128]}))
    with pytest.raises(CheckpointError):
        refuse_unknown_quantization("DIR", SimpleNamespace(quantization_config={"load_in_2bit": True}))


@pytest.mark.parametrize("config, package, reason", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes",
     "Using `bitsandbytes` 4-bit quantization requires bitsandbytes"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "bitsandbytes",
     "Using `bitsandbytes` 8-bit quantization requires bitsandbytes"),
    ({"quant_method": "gptq", "bits": 4}, "optimum", "Loading a GPTQ quantized model requires optimum"),
])
def test_a_known_method_whose_backend_is_missing_is_refused_in_one_line(config, package, reason):
    """A method transformers knows but cannot run here (its package is not installed) is refused before
    any weight is read, in one line (not a traceback from inside from_pretrained)."""
    import importlib.util
    from types import SimpleNamespace

    from engine.loader import refuse_unknown_quantization

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    with pytest.raises(CheckpointError) as info:
        refuse_unknown_quantization("DIR", SimpleNamespace(quantization_config=config))
    assert str(info.value).startswith(f"the checkpoint DIR is quantized with {config['quant_method']!r}, which "
                                      f"transformers cannot load here: {reason}")


@pytest.mark.parametrize("replicas", ["1", "2"])
def test_the_server_exits_with_one_line_and_no_traceback(source, tmp_path, replicas):
    folder = _copy(source, tmp_path / "m", change_tensors=lambda t: t.pop(DROPPED))
    proc = subprocess.run([sys.executable, "-m", "server", "--model", str(folder), "--host", "127.0.0.1", "--port", "0",
                           "--data-parallel-size", replicas],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    reason = f"the checkpoint {folder} has no tensor {DROPPED} (and 1 more): the model would run with it uninitialised"
    assert any(line.endswith(f"failed to load the model {folder}: {reason}") for line in proc.stderr.splitlines()), \
        proc.stderr[-3000:]
    assert any(line.endswith(f"exiting: the model could not be loaded: {reason}") for line in proc.stderr.splitlines())
    assert "Traceback" not in proc.stderr


def test_transformers_experts_and_batch_invariance_do_not_mix(source, caplog):
    """transformers' experts run a request's few tokens at an expert beside other requests' (another
    kernel than alone): asked for together with batch_invariant, they are refused; by default, batch
    invariance is off and the load says so."""
    from engine.errors import SettingsError

    with pytest.raises(SettingsError, match="batch_invariant needs the engine's row-wise experts"):
        load_model(EngineSettings(model=str(source), batch_invariant=True, experts_implementation="eager"))
    with caplog.at_level("WARNING", logger="engine.loader"):
        loaded = load_model(EngineSettings(model=str(source), experts_implementation="eager"))
    assert not loaded.batch_invariant and "batch invariance is off" in caplog.text
    assert load_model(EngineSettings(model=str(source))).batch_invariant
    # the engine's own experts by name load whatever the invariance (they are registered when named)
    assert not load_model(EngineSettings(model=str(source), batch_invariant=False,
                                         experts_implementation="engine_rowwise_experts")).batch_invariant
