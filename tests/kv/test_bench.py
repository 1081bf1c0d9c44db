"""meda.kv.bench and benchmarks/kv_speed.py on the CPU: case plans and keys, and the report of measured rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from meda.kv.bench import SpeedCase, speed_cases

ROOT = Path(__file__).resolve().parents[2]


def _kv_speed():
    spec = importlib.util.spec_from_file_location("kv_speed", ROOT / "benchmarks" / "kv_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_cases_run_stock_once_and_full_at_budget_one() -> None:
    cases = speed_cases(["qwen2-7b"], [1024], [1], ["stock", "full", "snapkv"], [0.05, 0.2], ["static", "compiled"])
    keys = [c.key for c in cases]
    assert keys == [
        "qwen2-7b/1024/b1/full/1/stock",
        "qwen2-7b/1024/b1/full/1/static",
        "qwen2-7b/1024/b1/full/1/compiled",
        "qwen2-7b/1024/b1/snapkv/0.05/static",
        "qwen2-7b/1024/b1/snapkv/0.05/compiled",
        "qwen2-7b/1024/b1/snapkv/0.2/static",
        "qwen2-7b/1024/b1/snapkv/0.2/compiled",
    ]
    with pytest.raises(ValueError, match="unknown decode"):
        speed_cases(["qwen2-7b"], [1024], [1], ["full"], [0.1], ["fast"])


def test_a_chunked_case_names_its_chunk() -> None:
    case = SpeedCase("qwen2-7b", 1 << 20, 1, "snapkv", 0.1, "static", chunk=32768)
    assert case.key == "qwen2-7b/1048576/b1/snapkv/0.1/static/c32768"
    assert SpeedCase("qwen2-7b", 1024, 1, "snapkv", 0.1, "static").key.endswith("/static")


def test_every_plan_has_unique_keys() -> None:
    kv_speed = _kv_speed()
    for name, plan in kv_speed.PLANS.items():
        keys = [c.key for c in plan()]
        assert len(keys) == len(set(keys)), name


def test_resume_skips_measured_and_out_of_memory_cases_unless_asked() -> None:
    measured = _kv_speed()._measured
    assert measured({"key": "a", "decode_ms_per_token": 9.5})
    assert measured({"key": "a", "error": "OutOfMemoryError: CUDA out of memory."})
    assert not measured({"key": "a", "error": "OutOfMemoryError: CUDA out of memory."}, retry_oom=True)
    assert not measured({"key": "a", "error": "RuntimeError: size mismatch"})
    assert not measured({"kind": "device"})


def test_report_tabulates_cases_profiles_and_the_attention_microbenchmark(tmp_path) -> None:
    kv_speed = _kv_speed()
    runs = [ROOT / "docs/results/kv_speed_h200_run2.jsonl", ROOT / "docs/results/kv_speed_h200_run3.jsonl"]
    md = tmp_path / "t.md"
    kv_speed.report(runs, md, None)
    text = md.read_text()
    assert "qwen2-7b/32768/b1/snapkv/0.05/static" in text
    assert "### Profiled step: full 1, decode=static, graph replay" in text
    assert "| matrix products (cuBLAS: weights, scores, values) | 394 |" in text
    assert "| 131072 | 1 | 1024 |" in text


def test_report_gives_the_prefill_over_the_full_cache_only_within_one_run(tmp_path) -> None:
    import json

    kv_speed = _kv_speed()

    def row(method: str, budget: float, prefill: float) -> dict:
        key = f"qwen2-7b/1024/b1/{method}/{budget:g}/static"
        return {"key": key, "preset": "qwen2-7b", "tokens": 1024, "batch": 1, "method": method, "budget": budget,
                "decode": "static", "prefill_s": prefill, "decode_ms_per_token": 5.0, "floor_ms": 2.0,
                "ratio_to_floor": 2.5, "kv_bytes_after": 1e6, "peak_bytes": 1e9}

    first, second = tmp_path / "run_a.jsonl", tmp_path / "run_b.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in [row("full", 1.0, 10.0), row("meda", 0.1, 10.5)]) + "\n")
    second.write_text(json.dumps(row("snapkv", 0.1, 12.0)) + "\n")  # no full row of its own run
    md = tmp_path / "t.md"
    kv_speed.report([first, second], md, None)
    lines = {line.split(" | ")[0][2:]: line.split(" | ") for line in md.read_text().splitlines() if "/1024/" in line}
    assert lines["qwen2-7b/1024/b1/meda/0.1/static"][3] == "+5.0%"
    assert lines["qwen2-7b/1024/b1/snapkv/0.1/static"][3] == "-"  # another run's full prefill is not compared
    assert lines["qwen2-7b/1024/b1/full/1/static"][3] == "-"


def test_report_lists_failed_cases_apart_with_the_error_shortened(tmp_path) -> None:
    import json

    kv_speed = _kv_speed()
    oom = ("OutOfMemoryError: CUDA out of memory. Tried to allocate 37.00 GiB. GPU 0 has a total capacity of "
           "139.80 GiB of which 28.95 GiB is free. Including non-PyTorch memory, this process has 110.85 GiB")
    rows = [{"key": "q/131072/b8/full/1/static", "error": oom}, {"key": "q/1024/b1/snapkv/0.1/static",
                                                                  "error": "RuntimeError: size mismatch"}]
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = tmp_path / "t.md"
    kv_speed.report([path], md, None)
    text = md.read_text()
    assert "| q/131072/b8/full/1/static | OutOfMemoryError: CUDA out of memory. Tried to allocate 37.00 GiB. GPU 0 " \
           "has a total capacity of 139.80 GiB of which 28.95 GiB is free. |" in text
    assert "| q/1024/b1/snapkv/0.1/static | RuntimeError: size mismatch |" in text
    assert "this process has" not in text


def test_prefill_over_full_needs_the_same_shape_decode_path_and_chunking(capsys) -> None:
    from meda.kv.bench import prefill_over_full, print_rows

    def row(method: str, prefill: float, **changes) -> dict:
        base = {"key": f"q/{method}/{sorted(changes.items())}", "preset": "q", "tokens": 1024, "batch": 1,
                "method": method, "decode": "static", "chunk": 0, "prefill_s": prefill, "decode_ms_per_token": 5.0,
                "replay_ms": None, "floor_ms": 2.0, "ratio_to_floor": 2.5, "kv_bytes_after": 1, "peak_bytes": 1}
        return base | changes

    full, meda = row("full", 10.0), row("meda", 12.0)
    others = [row("meda", 11.0, chunk=256), row("meda", 11.0, batch=8), row("meda", 11.0, decode="dynamic")]
    rows = [full, meda, *others]
    assert prefill_over_full(meda, rows) == pytest.approx(0.2)
    assert prefill_over_full(full, rows) is None
    assert all(prefill_over_full(r, rows) is None for r in others)
    print_rows(rows)
    assert "+20.0%" in capsys.readouterr().out


def test_the_kvpress_runner_says_what_is_missing() -> None:
    spec = importlib.util.spec_from_file_location("kv_kvpress", ROOT / "benchmarks" / "kv_kvpress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if importlib.util.find_spec("kvpress") is not None:
        pytest.skip("kvpress is installed here")
    with pytest.raises(SystemExit, match="kvpress is not importable"):
        module.presses()


def test_the_kvpress_runner_gives_a_vl_shape_the_benchmark_prompt_less_what_its_forward_does_not_take() -> None:
    import torch

    from meda.kv.bench import long_vlm_prompt
    from meda.kv.tiny import build_tiny

    spec = importlib.util.spec_from_file_location("kv_kvpress", ROOT / "benchmarks" / "kv_kvpress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = build_tiny("qwen2_vl").model
    full = long_vlm_prompt(model.config, 96, 8, "cpu", batch=2)
    inputs = module.prompt(model, 96, 2, 8, "cpu")
    assert set(inputs) == set(full) and torch.equal(inputs["input_ids"], full["input_ids"])

    class OlderForward(torch.nn.Module):  # transformers 5.2's Qwen2-VL takes no mm_token_type_ids
        config = model.config

        def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
            raise NotImplementedError

    older = module.prompt(OlderForward(), 96, 2, 8, "cpu")
    assert set(older) == set(full) - {"mm_token_type_ids"}
    text = module.prompt(build_tiny("qwen2").model, 64, 3, 8, "cpu")
    assert text["input_ids"].shape == (3, 64) and "pixel_values" not in text


def test_the_vision_language_prompt_takes_a_batch_and_runs_through_a_tiny_qwen2_vl() -> None:
    import torch

    from meda.kv.bench import long_vlm_prompt
    from meda.kv.tiny import build_tiny

    model = build_tiny("qwen2_vl").model
    one = long_vlm_prompt(model.config, 96, 8, "cpu")
    two = long_vlm_prompt(model.config, 96, 8, "cpu", batch=2)
    assert two["input_ids"].shape == (2, 96)
    assert torch.equal(two["input_ids"][1], one["input_ids"][0])
    assert two["pixel_values"].shape[0] == 2 * one["pixel_values"].shape[0]
    assert two["image_grid_thw"].tolist() == one["image_grid_thw"].tolist() * 2
    with torch.inference_mode():
        logits = model(**{k: v.to(torch.float32) if v.is_floating_point() else v for k, v in two.items()}).logits
    assert torch.allclose(logits[0], logits[1], atol=1e-5)  # both rows see the same text and image
