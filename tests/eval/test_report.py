"""Reports: each Markdown table names the model it is for, the per-layer columns are explained, and the scores
are strict JSON."""

import json
import math

from ditq.atomic import json_text
from ditq.demo import render_markdown
from ditq.eval.report import LAYER_COLUMNS, json_scores, render_layer_table, render_table

SETTINGS = {"samples": 4, "sampler": "ddim", "steps": 2, "cfg_scale": 1.5, "seed": 0, "batch_size": 4}
SCORES = {"size_bytes": 1000, "fid": 5.0, "class_acc": 0.9, "is": 9.0, "precision": 0.8, "recall": 0.7}
LAYER = {"layer": "blocks.0.attn.qkv", "shape": "384x128", "w_bits": 4, "group_size": 64, "weight_rel_err": 0.05,
         "output_rel_err": 0.04, "sqnr_db": 27.9}


def test_the_score_table_names_the_model_it_was_made_from():
    table = render_table({"settings": SETTINGS, "FP": SCORES, "fp_model": "DiT-MNIST (bundled trained weights)"})
    assert table.startswith("Models from DiT-MNIST (bundled trained weights) (the FP row)")
    assert "| FP | 0.00 | 5.00 |" in table


def test_the_layer_table_names_its_model_and_explains_each_error_column():
    table = render_layer_table([LAYER], "RTN W4A8 g64")
    assert table.startswith("Per-layer quantization error of RTN W4A8 g64")
    for column in ("weight rel. err", "output rel. err", "SQNR (dB)"):
        assert sum(line.startswith(f"- {column}: ") for line in table.splitlines()) == 1
    assert all(line in table for line in LAYER_COLUMNS)
    assert "| blocks.0.attn.qkv | 384x128 | 4 | 64 | 0.0500 | 0.0400 | 27.9 |" in table


def test_the_demo_report_names_the_model_of_each_table():
    report = {"model": "DiT-MNIST (bundled trained weights)", "recipe": {"method": "rtn"}, "recipe_label": "RTN W4A8",
              "samples": 4, "settings": SETTINGS, "calibration": {"samples": 2, "steps": 2, "seed": 1},
              "checkpoint": "out/quantized.safetensors", "seconds": 1.0, "stages": {"sample": 0.5}, "fp": SCORES,
              "quant": SCORES | {"psnr_vs_fp": 30.0, "ssim_vs_fp": 0.9}, "compression": 2.0, "layers": [LAYER]}
    text = render_markdown(report)
    assert "## Scores of DiT-MNIST (bundled trained weights), in full precision and quantized" in text
    assert "Per-layer quantization error of RTN W4A8" in text and LAYER_COLUMNS[2] in text


def test_non_finite_scores_become_strings_that_float_reads_back():
    report = {"fp": {"psnr_vs_fp": math.inf, "fid": 1.5}, "layers": [{"sqnr_db": -math.inf, "weight_rel_err": math.nan}]}
    text = json_text(json_scores(report), what="report")  # strict: raises on NaN or ±Infinity
    saved = json.loads(text)
    assert saved == {"fp": {"psnr_vs_fp": "inf", "fid": 1.5}, "layers": [{"sqnr_db": "-inf", "weight_rel_err": "nan"}]}
    assert float(saved["fp"]["psnr_vs_fp"]) == math.inf and float(saved["layers"][0]["sqnr_db"]) == -math.inf
