"""configs/*.yaml presets: they load through the server's own config loader, their memory plans are
computed from the model config (deploy.presets) and fit, and docs/deployment.md shows exactly the
generated tables."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy import presets
from server.cli import load_config, settings_from_args
from server.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent
PRESET_FILES = sorted((REPO / "configs").glob("*.yaml"))


def test_every_preset_file_is_registered():
    assert {p.stem for p in PRESET_FILES} == {p.name for p in presets.PRESETS}
    assert {"cpu-embedded", "h100-80gb", "rtx5090-32gb"} <= {p.stem for p in PRESET_FILES}


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_loads_through_the_server_loader(path):
    raw = yaml.safe_load(path.read_text())
    values = load_config(str(path))  # exits with a message on an unknown key or a wrong type
    settings = settings_from_args(["--config", str(path)])
    assert isinstance(settings, ServerSettings)
    assert len(values) == len(raw)
    for dest, value in values.items():
        assert settings.flat()[dest] == value
    assert settings.engine.dtype in {"auto", "float32", "bfloat16", "float16", "float64"}
    assert settings.engine.device in {"auto", "cpu", "cuda"} or settings.engine.device.startswith("cuda:")
    assert settings.engine.max_num_seqs >= 1 and 0 < settings.engine.memory_fraction <= 1
    # the bind address comes from the deployment (DIFFUSION_SERVER_HOST=0.0.0.0 in the image), not the preset
    assert "host" not in raw and "port" not in raw


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_is_documented_at_the_top(path):
    head = path.read_text().splitlines()[:3]
    assert head and all(line.startswith("#") for line in head), "a preset starts with a comment block"
    assert "python -m deploy.presets" in path.read_text()


def test_config_loader_rejects_unknown_keys_and_wrong_types(tmp_path):
    """What server/cli.py validates today: key names and value types (not value ranges)."""
    bad_key = tmp_path / "bad-key.yaml"
    bad_key.write_text("max-num-seq: 8\n")
    with pytest.raises(SystemExit, match="unknown key 'max-num-seq'"):
        settings_from_args(["--config", str(bad_key)])
    bad_type = tmp_path / "bad-type.yaml"
    bad_type.write_text("max-num-seqs: eight\n")
    with pytest.raises(SystemExit, match="'max-num-seqs' must be an int"):
        settings_from_args(["--config", str(bad_type)])
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- model\n")
    with pytest.raises(SystemExit, match="expected a mapping"):
        settings_from_args(["--config", str(not_mapping)])


@pytest.fixture(scope="module")
def plans():
    return {plan["preset"]: plan for plan in presets.compute_all()}


def test_memory_is_computed_from_the_model_config(plans):
    from bench.memory_report import load_config as load_model_config
    from bench.memory_report import report

    h100 = plans["h100-80gb"]
    settings = settings_from_args(["--config", str(REPO / "configs/h100-80gb.yaml")]).engine
    r = report(load_model_config(str(REPO / presets.MODEL_SHAPE_26B)), weight_dtype="bfloat16", kv_dtype="bfloat16",
               gpu_gib=80, context=settings.max_model_len, max_num_seqs=settings.max_num_seqs, tile_budget_mib=512)
    assert h100["parameters"] == r["parameters"] > 20e9
    assert h100["weights_gib"] == pytest.approx(r["weights_gib"])
    assert h100["request_mib"] == pytest.approx(r["request_mib_at_context"])
    assert (h100["max_num_seqs"], h100["max_model_len"]) == (settings.max_num_seqs, settings.max_model_len)
    # the FP8 checkpoint: experts and each text layer's attention/MLP linears at one byte a parameter plus
    # an fp32 scale per row (engine.compressed_tensors), every other weight in bf16
    rtx = plans["rtx5090-32gb"]
    fp8 = rows = 0
    for name, p in presets._meta_model(presets.MODEL_SHAPE_26B).named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) or (
                ".language_model.layers." in name and name.endswith(("_proj.weight")) and "router" not in name):
            fp8 += p.numel()
            rows += p.numel() // p.shape[-1]
    assert fp8 > rtx["expert_parameters"]
    assert rtx["weights_gib"] * 2**30 == fp8 + 4 * rows + 2 * (r["parameters"] - fp8)


@pytest.mark.parametrize("name", [p.name for p in presets.PRESETS])
def test_preset_fits_its_card(plans, name):
    """weights + transients + max-num-seqs requests at max-model-len fit in the budget the engine plans with."""
    plan = plans[name]
    assert plan["fits"], plan
    assert plan["weights_gib"] + plan["overhead_gib"] + plan["needed_gib"] <= plan["memory_gib"]
    assert plan["needed_gib"] <= plan["budget_gib"]
    assert plan["requests_at_max_len"] >= plan["max_num_seqs"]
    assert plan["kv_tokens_derived"] >= plan["max_model_len"]


def test_rtx5090_fits_only_with_its_quantization(plans):
    """The 32 GB preset serves the published FP8 checkpoint: unquantized, in bf16, the weights alone exceed
    the card. The checkpoint carries its quantization, so the preset sets no --quantization."""
    plan = plans["rtx5090-32gb"]
    assert plan["quantization"] == "compressed-tensors-fp8" and plan["dtype"] == "bfloat16"
    assert plan["weights_in_dtype_gib"] > plan["memory_gib"] > plan["weights_gib"]
    assert plan["expert_share"] > 0.8  # most weights are MoE experts
    settings = settings_from_args(["--config", str(REPO / "configs/rtx5090-32gb.yaml")])
    assert (settings.model, settings.engine.quantization) == ("RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic", "none")


def test_docs_tables_are_the_generated_output(plans):
    doc = (REPO / "docs/deployment.md").read_text()
    generated = presets.markdown(list(plans.values()))
    assert presets.generated_section(doc) == generated, "docs/deployment.md is stale: python -m deploy.presets --write-docs"
    assert presets.updated_docs(doc, list(plans.values())) == doc  # what --check-docs compares
