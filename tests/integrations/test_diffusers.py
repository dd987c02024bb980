"""diffusers transformers (tiny random configs of the four families) through calibrate → quantize →
save → load, input-group tracing, pipeline calibration and the `--pipeline` CLI."""

import pytest
import torch

pytest.importorskip("diffusers")

import ditq  # noqa: E402
from ditq.cli import main  # noqa: E402
from ditq.integrations.diffusers import SUPPORTED, calibrate_pipeline, diffusers_adapter  # noqa: E402
from ditq.quant.qlinear import QuantLinear  # noqa: E402
from tests.integrations.tiny_diffusers import TINY_CONFIGS, make_dit_pipeline, make_transformer  # noqa: E402
from tests.tiny import make_tiny_mnist_dit  # noqa: E402

FAMILIES = list(SUPPORTED)


@pytest.fixture(scope="module", params=FAMILIES)
def quantized(request, tmp_path_factory):
    """(family, FP model, its W8A8 copy calibrated on two random steps, the saved file)."""
    name = request.param
    fp = make_transformer(name)
    adapter = diffusers_adapter(fp)
    calib = ditq.calibrate(fp, run=lambda m: adapter.run(m, steps=2, seed=1))
    q = ditq.quantize(make_transformer(name), ditq.RTN(w_bits=8, a_bits=8), calib=calib)
    path = ditq.save(q, tmp_path_factory.mktemp(name) / "q.safetensors")
    return name, fp, q, path


def test_w8a8_close_to_fp_and_skips_kept(quantized):
    name, fp, q, _ = quantized
    adapter = diffusers_adapter(fp)
    ref, out = adapter.run(fp, seed=5), adapter.run(q, seed=5)
    assert (out - ref).norm() / ref.norm() < 0.02
    names = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert names and not any("embed" in n or "norm" in n for n in names)  # embedders, adaLN stay FP
    assert "proj_out" not in names


def test_save_load_into_model_built_from_config(quantized):
    name, _, q, path = quantized
    loaded = ditq.load(path)  # rebuilt from the diffusers config in the header: no original weights
    assert type(loaded).__name__ == name
    adapter = diffusers_adapter(q)
    assert torch.equal(adapter.run(loaded, seed=7), adapter.run(q, seed=7))


@pytest.mark.parametrize("name", FAMILIES)
def test_input_groups_found_by_tracing(name):
    model = make_transformer(name)
    groups = {frozenset(g) for g in diffusers_adapter(model).input_groups(model)}
    block = "transformer_blocks.0.attn" + ("1" if name in ("DiTTransformer2DModel", "PixArtTransformer2DModel")
                                           else "")
    assert frozenset(f"{block}.to_{x}" for x in "qkv") in groups
    if name == "FluxTransformer2DModel":
        assert frozenset(f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv") in groups
        assert frozenset(["single_transformer_blocks.1.proj_mlp",
                          *(f"single_transformer_blocks.1.attn.to_{x}" for x in "qkv")]) in groups
    assert not any("to_out" in n for g in groups for n in g)


def test_unsupported_model_and_unmatched_pattern_refused():
    with pytest.raises(ValueError, match="not a supported diffusers transformer.*FluxTransformer2DModel"):
        diffusers_adapter(torch.nn.Linear(2, 2))
    model = make_transformer("SD3Transformer2DModel")
    with pytest.raises(ValueError, match="'single_blocks.\\*' matches no module of SD3Transformer2DModel"):
        ditq.quantize(model, ditq.RTN(w_bits=8, skip=("single_blocks.*",)))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_calibration_through_the_pipeline_loop():
    pipe = make_dit_pipeline()
    calib = calibrate_pipeline(pipe, class_labels=[1, 2], steps=3, guidance_scale=4.0)
    assert calib.steps == 3 and calib.n_samples == 2 and len(calib.timesteps) == 3
    assert calib.timesteps[0] > calib.timesteps[-1]  # noisy to clean, as the scheduler runs
    rows = calib.inputs["transformer_blocks.0.attn1.to_q"]
    assert rows.shape[0] == 3 * 4 * 16  # 3 steps × (2 labels + 2 unconditional) × 16 tokens
    ditq.quantize(pipe.transformer, ditq.RTN(w_bits=8, a_bits=8), calib=calib)
    with pytest.raises(ValueError, match="exactly one of prompts"):
        calibrate_pipeline(pipe, steps=2)


def test_cli_quantize_and_sample_a_pipeline_folder(tmp_path, capsys):
    folder = tmp_path / "pipe"
    make_dit_pipeline().save_pretrained(folder)
    out = tmp_path / "t.safetensors"
    assert main(["quantize", "--pipeline", str(folder), "--recipe", "w8a8", "--out", str(out),
                 "--calib-steps", "2", "--class-label", "3", "--device", "cpu"]) == 0
    assert isinstance(ditq.load(out).transformer_blocks[0].attn1.to_q, QuantLinear)
    grid = tmp_path / "g.png"
    assert main(["sample", "--pipeline", str(folder), "--model", str(out), "--samples", "2", "--steps", "2",
                 "--class-label", "3", "--out", str(grid), "--device", "cpu"]) == 0
    assert grid.stat().st_size > 0
    assert main(["quantize", "--pipeline", str(folder), "--recipe", "w8a8", "--out", str(out),
                 "--prompt", "a cat", "--device", "cpu"]) == 2
    assert "class-conditional; use --class-label" in capsys.readouterr().err


def test_sample_refuses_a_checkpoint_of_another_transformer_before_sampling(tmp_path, capsys, monkeypatch):
    """A checkpoint must hold the pipeline's own transformer: class and config are compared first, so a
    mismatch is one line naming what differs, not an error from the middle of the denoising loop."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled with a checkpoint that does not fit the pipeline")

    monkeypatch.setattr(DiTPipeline, "__call__", no_sampling)
    folder = tmp_path / "pipe"
    make_dit_pipeline().save_pretrained(folder)
    pixart = ditq.save(make_transformer("PixArtTransformer2DModel"), tmp_path / "pixart.safetensors")
    deeper = DiTTransformer2DModel(**TINY_CONFIGS["DiTTransformer2DModel"] | {"num_layers": 3})
    deeper = ditq.save(deeper, tmp_path / "deeper.safetensors")
    zoo = ditq.save(make_tiny_mnist_dit(), tmp_path / "zoo.safetensors")
    expected = {
        pixart: ["'diffusers_pixart'", "DiTPipeline", "DiTTransformer2DModel"],
        deeper: ["another DiTTransformer2DModel", "num_layers=3 (pipeline: 2)"],
        zoo: ["'dit'", "DiTTransformer2DModel"],
    }
    for checkpoint, names in expected.items():
        assert main(["sample", "--pipeline", str(folder), "--model", str(checkpoint), "--samples", "1", "--steps",
                     "2", "--class-label", "3", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 2
        line = capsys.readouterr().err.splitlines()[-1]  # after diffusers' loading progress
        assert line.startswith(f"ditq sample: error: --model {checkpoint} "), line
        assert all(name in line for name in names), (names, line)
    assert not (tmp_path / "g.png").exists()


def test_from_pretrained_with_a_ditq_config_quantizes_as_ditq_quantize(tmp_path):
    import diffusers

    from ditq.integrations.diffusers_quantizer import DitqConfig

    fp = make_transformer("DiTTransformer2DModel")
    fp.save_pretrained(tmp_path / "fp")
    q = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "fp", quantization_config=DitqConfig("w8a8"))
    # the same loader on both sides: CPU kernels may round differently on the loader's memory than on fresh tensors
    expected = ditq.quantize(diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "fp"), ditq.load_recipe("w8a8"))
    names = {n for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    assert names == {n for n, m in expected.named_modules() if isinstance(m, QuantLinear)} and names
    adapter = diffusers_adapter(q)
    assert torch.equal(adapter.run(q, seed=3), adapter.run(expected, seed=3))
    with pytest.raises(ValueError, match="not serializable"):  # diffusers' save would drop the quantized layout
        q.save_pretrained(tmp_path / "q")


def test_ditq_config_refuses_bad_fields_versions_and_prequantized_configs(tmp_path, monkeypatch):
    import json

    import diffusers

    from ditq.integrations import diffusers_quantizer
    from ditq.integrations.diffusers_quantizer import DitqConfig

    with pytest.raises(FileNotFoundError, match="'w9a9' is neither a preset"):
        DitqConfig("w9a9")
    with pytest.raises(ValueError, match="backend 'nope'"):
        DitqConfig("w8a8", backend="nope")
    with pytest.raises(ValueError, match="unknown fields"):
        DitqConfig("w8a8", bits=4)
    for recipe in (123, None, ["w8a8"]):
        with pytest.raises(TypeError, match=r"recipe=.*preset name or recipe file path \(str\) or a mapping"):
            DitqConfig(recipe)
    with pytest.raises(TypeError, match="backend"):
        DitqConfig("w8a8", backend=None)
    fp = make_transformer("DiTTransformer2DModel")
    fp.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = DitqConfig("w8a8").to_diff_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"ditq.load\(path, model=...\)"):
        diffusers.DiTTransformer2DModel.from_pretrained(tmp_path)
    for version in ("0.50.0", "0.34.2"):
        monkeypatch.setattr(diffusers, "__version__", version)
        with pytest.raises(ImportError, match=f"{version} is installed"):
            diffusers_quantizer._register()
    with pytest.raises(ValueError, match="backend 'nope' is not one of .*emulated"):
        DitqConfig("w8a8", backend="nope")
    config, unused = DitqConfig.from_dict({"quant_method": "ditq", "recipe": "w8a8"}, True, low_cpu_mem_usage=True)
    assert config.recipe == "w8a8" and unused == {"low_cpu_mem_usage": True}
