"""``--load-format dummy``: a model's shape served from its config alone (random weights built on the
device), and ``--sampler`` end to end through the engine."""

from __future__ import annotations

import pytest
import torch

from engine import EngineCore, EngineSettings, SamplingParams
from engine.loader import load_model
from tests.engine_helpers import run_to_completion
from tools.tiny_checkpoint import TinySpec, build_tiny_checkpoint


@pytest.fixture(scope="module")
def config_only(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("dummy"), TinySpec(canvas_length=8))
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    return path


def test_dummy_load_format_builds_the_shape_without_weight_files(config_only):
    with pytest.raises(OSError):  # the checkpoint's own weights are gone: the default format cannot load it
        load_model(EngineSettings(model=str(config_only)))
    loaded = load_model(EngineSettings(model=str(config_only), load_format="dummy"))
    config = loaded.model.config
    assert config.canvas_length == 8 and loaded.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())  # initialised, not left empty
    assert loaded.defaults.max_denoising_steps == 8  # the folder's generation config
    core = EngineCore(loaded, EngineSettings(model=str(config_only), load_format="dummy"))
    params = SamplingParams(max_tokens=16, seed=3, ignore_eos=True)
    out = run_to_completion(core, [("a", [5, 6, 7], params)])["a"]
    assert len(out["tokens"]) == 16 and out["finish_reason"] == "length"


def test_dummy_weights_are_the_same_in_every_load(config_only):
    """Engine replicas each build the dummy model: they must hold the same weights (and a load must
    not move the caller's random state)."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_model(EngineSettings(model=str(config_only), load_format="dummy")).model.state_dict()
    assert torch.equal(torch.rand(3), expected)
    second = load_model(EngineSettings(model=str(config_only), load_format="dummy")).model.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_dummy_load_format_refuses_quantization():
    with pytest.raises(ValueError, match="load_format dummy"):
        EngineSettings(model="x", load_format="dummy", quantization="int8-experts").validate()


@pytest.mark.parametrize("sampler", ["reference", "fast"])
def test_each_sampler_serves_seeded_requests_reproducibly(tmp_path_factory, sampler):
    """Both samplers through the engine in float32: a seeded request gives the same tokens when run
    again, alone, after other work; different seeds give different tokens."""
    path = build_tiny_checkpoint(tmp_path_factory.mktemp(f"sampler-{sampler}"), TinySpec(canvas_length=8))
    settings = EngineSettings(model=str(path), sampler=sampler)
    core = EngineCore(load_model(settings), settings)
    assert core.runner.sampler.name == sampler
    params = [SamplingParams(max_tokens=24, seed=seed, ignore_eos=True, max_denoising_steps=6) for seed in (1, 2)]
    first = run_to_completion(core, [("s1", [9, 10, 11], params[0]), ("s2", [9, 10, 11], params[1])])
    again = run_to_completion(core, [("s1b", [9, 10, 11], params[0])])
    assert first["s1"]["tokens"] == again["s1b"]["tokens"]
    assert first["s1"]["tokens"] != first["s2"]["tokens"]
    assert core.num_live_states() == 0
