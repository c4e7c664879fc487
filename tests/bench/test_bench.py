"""The benchmarks' own arithmetic: percentiles, target verdicts (single values and spreads of
rounds), the profile summary and the report."""

import json

import pytest

from bench import common, report
from bench.common import Result, Target, percentile, settle
from bench.profile import summarize_collapsed


def test_percentile_interpolates_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([], 50) != percentile([], 50)  # NaN


@pytest.mark.parametrize(
    ("value", "goal", "direction", "met", "shortfall"),
    [
        (0.97, 0.95, ">=", True, ""),
        (0.81, 0.95, ">=", False, "missed by 0.14x (15% of the goal)"),
        (4.5, 2.0, "<=", False, "missed by 2.50 s (125% of the goal)"),
        (1.2, 2.0, "<=", True, ""),
        (None, 2.0, "<=", None, ""),
    ],
)
def test_target_verdict_and_shortfall(value, goal, direction, met, shortfall):
    unit = "x" if direction == ">=" else "s"
    target = Target("t", value, goal, direction, unit)
    assert target.met is met
    assert target.shortfall == shortfall


@pytest.mark.parametrize(
    ("rounds", "direction", "verdict", "mean"),
    [
        # Every round clears 0.9: met.
        ([0.93, 0.91, 0.95, 0.92], ">=", "met", 0.9275),
        # The mean (0.9175) clears it, the spread 0.88-0.95 does not: not settled.
        ([0.93, 0.88, 0.95, 0.91], ">=", "not settled (spread straddles the goal)", 0.9175),
        # No round clears it: missed, by the mean's gap.
        ([0.85, 0.88, 0.86, 0.81], ">=", "missed", 0.85),
        # A round exactly at the goal clears it.
        ([0.9, 0.95], ">=", "met", 0.925),
        # Lower is better: met only when the highest round is at or under the goal.
        ([1.2, 1.9, 0.8], "<=", "met", 1.3),
        ([1.2, 2.1, 0.8], "<=", "not settled (spread straddles the goal)", 1.3667),
        ([2.2, 2.1], "<=", "missed", 2.15),
        # Rounds without a figure do not count; none at all is no measurement.
        ([None, 0.95, float("nan"), 0.92], ">=", "met", 0.935),
        ([None], ">=", "not measured", None),
    ],
)
def test_a_verdict_over_rounds_rests_on_the_whole_spread(rounds, direction, verdict, mean):
    goal = 0.9 if direction == ">=" else 2.0
    result = Result("t", "T", command="-")
    target = result.target("ratio", None, goal, direction, rounds=rounds)
    assert target.verdict == verdict
    assert target.value == (None if mean is None else pytest.approx(mean, abs=1e-3))
    assert target.met is {"met": True, "missed": False}.get(verdict)
    if verdict == "missed":
        assert target.shortfall.startswith("missed by")
    else:
        assert target.shortfall == ""


def test_settle_is_met_missed_or_open():
    assert settle(0.91, 0.95, 0.9, ">=") is True
    assert settle(0.85, 0.89, 0.9, ">=") is False
    assert settle(0.85, 0.95, 0.9, ">=") is None
    assert settle(1.0, 2.0, 2.0, "<=") is True
    assert settle(1.0, 2.01, 2.0, "<=") is None


def test_a_caveat_keeps_the_verdict_open_whatever_the_value():
    target = Target("p95 latency", 1.1, 1.5, "<=", caveat="p95 of 40 requests")
    assert (target.met, target.verdict) == (None, "not settled (p95 of 40 requests)")
    assert target.shortfall == ""
    assert Target("p99 latency", 1.1, 1.5, "<=").verdict == "met"


def test_result_file_carries_targets_machine_and_code(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(
        common, "code_state", lambda: {"commit": "abc123", "dirty": True, "changed": {}}
    )
    result = Result("demo", "Demo", command="python -m bench.demo")
    result.table("t", ["a", "b"], [[1, 2.5]])
    result.target("ratio", 0.5, 0.95)
    result.target("rounds", None, 0.9, rounds=[0.88, 0.93])
    body = json.loads(result.write().read_text())
    assert body["tables"][0]["rows"] == [[1, 2.5]]
    single, rounds = body["targets"]
    assert single["met"] is False and single["verdict"] == "missed"
    assert single["shortfall"].startswith("missed by 0.45x")
    assert rounds["rounds"] == [0.88, 0.93] and rounds["spread"] == [0.88, 0.93]
    assert rounds["value"] == 0.905 and rounds["met"] is None
    assert rounds["verdict"] == "not settled (spread straddles the goal)"
    assert body["machine"]["cpus"] >= 1
    assert body["code"] == {"commit": "abc123", "dirty": True, "changed": {}}


def test_profile_summary_ranks_own_and_total_time():
    raw = "\n".join(
        [
            "main (/x/site-packages/trl/a.py:1);step (/x/site-packages/torch/b.py:2) 30",
            "main (/x/site-packages/trl/a.py:1);load (/x/site-packages/safetensors/c.py:3) 10",
            "garbage line",
        ]
    )
    text = summarize_collapsed(raw)
    assert text.startswith("40 samples")
    own = text.split("total time")[0]
    assert own.index("step (torch/b.py)") < own.index("load (safetensors/c.py)")
    assert "75.0%  step (torch/b.py)" in own
    assert "100.0%  main (trl/a.py)" in text.split("total time")[1]


def test_report_lists_every_target_and_missing_benchmarks(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(report, "RECORDED", tmp_path / "recorded")
    result = Result("swap", "Hot swap", command="python -m bench.swap")
    result.table("2 replicas", ["how", "s"], [["promote", 1.23], ["restart", 102.7]])
    result.target("promote -> serving", 4.66, 2.0, "<=", "s")
    result.profile = "10 samples"
    result.write()
    text = report.render(report.load_results(), {"total_s": 600, "status": {"loop": "exited 1"}})
    assert "| Hot swap | promote -> serving | 4.66 s | <= 2 s | missed by 2.66 s" in text
    assert "| loop | (no result: exited 1) |" in text
    assert "| restart | 102.7 |" in text
    assert "10.0 minutes in all" in text
    assert "```\n10 samples\n```" in text


def test_report_reads_a_recorded_result_and_names_its_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    Result("swap", "Hot swap", command="python -m bench.swap").write()
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    gpu = Result("training-gpu", "DPO on a GPU", command="python -m bench.training --skip-cpu")
    gpu.target("tuned vs TRL", 1.7, 1.5)
    gpu.write()
    (tmp_path / "results" / "training-gpu.json").rename(recorded / "training-gpu.json")
    body = json.loads((recorded / "training-gpu.json").read_text())
    body["machine"].update(cpu="Other CPU", gpu="Some GPU, 80 GiB")
    (recorded / "training-gpu.json").write_text(json.dumps(body))

    results = report.load_results(("swap", "training-gpu", "loop"), recorded)
    assert results["loop"] is None
    text = report.render(results)
    assert "| DPO on a GPU (Some GPU) | tuned vs TRL | 1.7x | >= 1.5x | met |" in text
    gpu_section = text.split("## DPO on a GPU (Some GPU)")[1]
    assert "Run on another machine: Other CPU" in gpu_section
    assert "GPU: Some GPU, 80 GiB" in gpu_section
    assert "another machine" not in text.split("## DPO on a GPU")[0].split("## Hot swap")[1]


def test_serving_target_is_the_mean_of_the_abba_rounds(tmp_path, monkeypatch):
    import argparse

    from bench import serving

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)

    def run(label: str, tok_s: float, ttft: float, round_: int = 1) -> serving.Run:
        figures = {
            "output_throughput": tok_s,
            "median_ttft_ms": ttft,
            "p99_ttft_ms": ttft * 2,
            "median_itl_ms": 40.0,
            "p99_itl_ms": 90.0,
            "output_lens": [64, 64],
            "failed": 0,
        }
        return serving.Run(label, 8, figures, round_)

    ours, stock = serving.LABELS["prefloop"], serving.LABELS["vllm"]
    entries = [serving.Entry("prefloop", ours), serving.Entry("vllm", stock)]
    # The machine got faster during the run: each server's two rounds differ, the means agree.
    runs = [run(ours, 100.0, 1000.0), run(stock, 90.0, 1100.0)]
    runs += [run(stock, 130.0, 900.0, 2), run(ours, 120.0, 950.0, 2)]
    args = argparse.Namespace(concurrency=[8], prompts=[24], input_len=128, output_len=64)
    result = Result("serving", "Serving overhead", command="python -m bench.serving")
    serving.report(result, entries, runs, {}, args)

    ratio, ttft = result.targets
    assert ratio.value == round(110.0 / 110.0, 3) and ratio.met
    assert ttft.value == round((1000.0 + 950.0) / 2 - (1100.0 + 900.0) / 2, 1)
    first_pass = result.tables[0]["rows"]
    assert [row[:3] for row in first_pass] == [[ours, 100.0, 1.111], [stock, 90.0, 1.0]]
    assert [row[:2] for row in result.tables[1]["rows"]] == [[stock, 130.0], [ours, 120.0]]


def test_ppo_rates_are_medians_of_tokens_per_second():
    from bench import ppo

    assert ppo.tokens_per_s(960, 12.0) == 80.0
    assert ppo.tokens_per_s(10, 0.0) != ppo.tokens_per_s(10, 0.0)  # NaN
    # 100, 50 and 60 tokens/s: the median of the rates, not tokens / seconds over the runs.
    assert ppo.median_rate([(1000, 10.0), (500, 10.0), (1200, 20.0)]) == 60.0


def test_ppo_iteration_cost_charges_vllm_merge_and_reload():
    from bench import ppo

    cost = ppo.iteration_cost(1200, 80.0, 240.0, merge_save_s=3.0, reload_s=1.5)
    assert cost.hf_s == 15.0
    assert cost.vllm_generate_s == 5.0
    assert cost.vllm_s == 9.5
    assert cost.ratio == pytest.approx(9.5 / 15.0)  # < 1: vLLM is faster
    assert ppo.verdict(cost) == "the vLLM design is faster here: HF generate takes 1.58x as long"

    slow = ppo.iteration_cost(1200, 80.0, 100.0, merge_save_s=3.0, reload_s=1.0)
    assert slow.vllm_s == 16.0 and slow.ratio == pytest.approx(16.0 / 15.0)
    assert ppo.verdict(slow).startswith("HF generate is faster here: the vLLM design takes 1.07x")

    broken = ppo.iteration_cost(1200, 80.0, 240.0, merge_save_s=3.0, reload_s=None)
    assert broken.vllm_s is None and broken.ratio is None
    assert ppo.verdict(broken).startswith("no verdict")


def test_ppo_figures_split_iterations_into_rollout_and_the_rest():
    from bench import ppo

    # answer_tokens is the mean per answer: 16 answers of 60 tokens at 96 tok/s take 10 s.
    steps = [
        {"answer_tokens": 60.0, "rollout_tokens_per_s": 96.0, "iteration_s": 40.0},
        {"answer_tokens": 90.0, "rollout_tokens_per_s": 120.0, "iteration_s": 30.0},
        {"answer_tokens": 30.0, "rollout_tokens_per_s": 80.0, "iteration_s": 26.0},
    ]
    figures = ppo.ppo_figures(steps, rollouts=16, train_runtime=96.0)
    assert figures["episodes_per_s"] == 0.5  # 3 x 16 / 96
    assert figures["iteration_s"] == 30.0
    assert figures["rollout_tokens_per_s"] == 96.0
    assert figures["rollout_s"] == 10.0  # rollouts 10, 12 and 6 s
    assert figures["update_s"] == 20.0  # 30, 18 and 20 s
    assert figures["rollout_share"] == pytest.approx(28.0 / 96.0)


def test_ppo_report_target_is_vllm_over_hf(tmp_path, monkeypatch):
    from bench import ppo

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    hf = {"runs": [(800, 10.0), (800, 8.0), (800, 16.0)], "ended": [3, 4, 5], "merge_save_s": 4.0}
    vllm = {
        "runs": [(800, 4.0), (800, 4.0), (800, 5.0)],
        "ended": [4, 4, 4],
        "start_s": 24.0,
        "eos_kept": 12,
        "reload_s": 0.8,
        "reload_error": None,
        "dtype": "float32",
    }
    result = Result("ppo", "PPO (RLHF)", command="python -m bench.ppo")
    ppo.report(result, 16, 96, hf, vllm, None)
    (target,) = result.targets
    # 800 tokens: HF at 80 tok/s 10 s; vLLM at 200 tok/s 4 s + 4 s merge + 0.8 s reload.
    assert target.value == 0.88 and target.direction == ">=" and target.met is False
    assert result.tables[1]["rows"][1] == ["vLLM engine + full-weight reload", 4.0, 4.0, 0.8, 8.8]
    assert result.tables[0]["rows"][0][1:] == [80.0, 800, 10.0, "4/16"]


def test_ppo_report_puts_the_rollout_saving_in_a_whole_iteration(tmp_path, monkeypatch):
    from bench import ppo

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    hf = {"runs": [(800, 10.0)] * 3, "ended": [4] * 3, "merge_save_s": 1.0}
    vllm = {
        "runs": [(800, 4.0)] * 3,
        "ended": [4] * 3,
        "start_s": 24.0,
        "eos_kept": 12,
        "reload_s": 1.0,
        "reload_error": None,
        "dtype": "float32",
    }
    steps = [{"answer_tokens": 50.0, "rollout_tokens_per_s": 80.0, "iteration_s": 40.0,
              "eos_rate": 0.5}] * 3  # fmt: skip
    summary = {"step_metrics": steps, "train_runtime": 120.0, "setup_s": 2.0,
               "torch_threads": 2, "bf16": False, "peak_rss_mb": 900}  # fmt: skip
    result = Result("ppo", "PPO (RLHF)", command="python -m bench.ppo")
    ppo.report(result, 16, 96, hf, vllm, summary)
    assert result.targets[0].value == 0.6  # (4 + 1 + 1) / 10
    assert result.tables[2]["rows"] == [[0.4, 40.0, 80.0, 10.0, 30.0, "25%"]]
    # HF 10 s, vLLM 6 s: 4 s less of a 40 s iteration.
    assert any("(40.0 s) by -4.0 s (-10%)" in note for note in result.notes)


def test_report_shows_the_spread_and_the_open_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    result = Result("ingest", "Feedback ingest", command="python -m bench.ingest")
    result.target("sqlite vs bare, 32 connections", None, 0.9, rounds=[0.93, 0.88, 0.95, 0.91])
    result.target("sqlite vs bare, 8 connections", None, 0.9, rounds=[0.8, 0.85, 0.82, 0.81])
    result.target("batch", None, 5000, unit="events/s", rounds=[5200, 5100, 5400, 5300])
    result.write()
    text = report.render(report.load_results(("ingest",)))
    assert (
        "| sqlite vs bare, 32 connections | 0.917x (0.88x to 0.95x, 4 rounds) | >= 0.9x | "
        "not settled (spread straddles the goal) |" in text
    )
    # The unit once, after the mean.
    assert "| 5,250 events/s (5,100 to 5,400, 4 rounds) | >= 5,000 events/s | met |" in text
    # A missed spread names the mean's shortfall.
    assert (
        "| 0.82x (0.8x to 0.85x, 4 rounds) | >= 0.9x | missed by 0.08x (9% of the goal) |" in text
    )


def test_report_reads_results_written_before_verdicts_were_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    old = {
        "name": "swap",
        "title": "Hot swap",
        "command": "python -m bench.swap",
        "started": "2026-11-27T02:57:15+00:00",
        "duration_s": 109.0,
        "tables": [],
        "notes": [],
        "machine": {"cpu": "AMD EPYC", "gpu": None},
        "targets": [
            {"name": "swap s", "value": 0.93, "goal": 2.0, "direction": "<=", "unit": "s",
             "met": True, "shortfall": ""},
            {"name": "p99 ratio", "value": 1.7, "goal": 1.5, "direction": "<=", "unit": "x",
             "met": False, "shortfall": "missed by 0.2x (13% of the goal)"},
        ],
    }  # fmt: skip
    (tmp_path / "swap.json").write_text(json.dumps(old))
    text = report.render(report.load_results(("swap",)))
    assert "| Hot swap | swap s | 0.93 s | <= 2 s | met | unknown |" in text
    assert "| p99 ratio | 1.7x | <= 1.5x | missed by 0.2x (13% of the goal) | unknown |" in text
    assert "Code: commit unknown" in text.split("## Hot swap")[1]
