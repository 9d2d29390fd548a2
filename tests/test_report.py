"""report.py: diversity, the SVG charts, and the small-data warnings and verdicts on too few items."""
import os

import pytest

import almost
import report
from almost import Config, resolve
from conftest import ROOT


def test_diversity_sees_a_collapse():
    from report import diversity
    varied = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning light"]
    same = ["a boy named tim"] * 3
    v, c = diversity(varied), diversity(same)
    assert v["distinct_2"] > 0.9 and c["distinct_2"] == pytest.approx(3 / 9)
    assert c["top_phrase"] == "a boy named tim" and c["top_phrase_share"] == 1.0 and v["top_phrase_share"] < 0.5


def test_svg_chart_is_a_titled_labelled_picture(tmp_path):
    import xml.etree.ElementTree as ET
    from report import svg_chart
    svg_chart(str(tmp_path / "l.svg"), "PPO: KL", "PPO step", "KL (nats)", {"policy": [(1, 0.0), (2, 3.5), (3, 2.0)]})
    svg_chart(str(tmp_path / "b.svg"), "RM accuracy", "set", "accuracy", {"rm": [("held out", 0.7), ("hhh", 0.6)],
              "longer": [("held out", 0.65), ("hhh", 0.62)]}, hlines={"chance": 0.5}, bars=True)
    for f, want in (("l.svg", ["PPO: KL", "PPO step", "KL (nats)", "policy"]),
                    ("b.svg", ["RM accuracy", "accuracy", "chance", "held out", "hhh", "0.70", "longer"])):
        root = ET.parse(tmp_path / f).getroot()                            # well-formed XML
        texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
        assert all(w in texts for w in want), texts
    root = ET.parse(tmp_path / "b.svg").getroot()
    assert [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")].count("held out") == 1   # a label a group
    bars = root.findall("{http://www.w3.org/2000/svg}rect")[1:]          # rm's two bars, then longer's two
    x = [float(b.get("x")) for b in bars]
    assert len(bars) == 4 and x[0] < x[2] < x[1] < x[3]                  # grouped by set: held out's two bars first
    assert float(bars[0].get("height")) > float(bars[2].get("height")) > 0


def test_charts_have_round_ticks_and_a_moving_average_over_a_noisy_line(tmp_path):
    """Ticks at round values covering the data (1, 2, 2.5 or 5 times a power of ten); a noisy per-step line drawn
    faint with its trailing moving average over it, so a trend shows."""
    import xml.etree.ElementTree as ET
    from report import moving_average, nice_ticks, svg_chart
    assert nice_ticks(-2.06, -1.22) == [-2.2, -2.0, -1.8, -1.6, -1.4, -1.2]
    assert nice_ticks(0, 0.77) == [0, 0.2, 0.4, 0.6, 0.8] and nice_ticks(1, 40, 6) == [0, 10, 20, 30, 40]
    assert moving_average([(1, 1.0), (2, 3.0), (3, 5.0), (4, 7.0)], 2) == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 6.0)]
    noisy = [(i, (-1) ** i * 0.5 + 0.02 * i) for i in range(1, 41)]
    svg_chart(str(tmp_path / "n.svg"), "PPO: reward", "PPO step", "score", {"PPO policy": noisy}, smooth=5)
    root = ET.parse(tmp_path / "n.svg").getroot()
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"0", "10", "20", "30", "40"} <= set(texts) and "PPO policy (5-step average)" in texts
    assert all(float(t) == round(float(t), 2) for t in texts if t.replace(".", "").replace("-", "").isdigit())
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2 and float(lines[0].get("stroke-opacity")) < 1 == float(lines[1].get("stroke-opacity"))
    ys = [float(p.split(",")[1]) for p in lines[1].get("points").split()]
    assert max(ys[5:]) - min(ys[5:]) < 0.5 * (max(float(p.split(",")[1]) for p in lines[0].get("points").split()) -
                                              min(float(p.split(",")[1]) for p in lines[0].get("points").split()))


def test_a_verdict_on_too_few_items_says_so_and_small_data_is_warned_at_the_top(tmp_path, capsys, monkeypatch):
    """The files a 20-query chat run makes (25 pairs, one held-out pair, 4 usable dialogues, 4 RL prompts): every
    count below its minimum is warned about, naming the count, the minimum and the flag, by the stage and at the top
    of the report; a verdict on 2 held-out queries reads "too few items to tell", with its interval still shown."""
    from eval import MIN_VERDICT_ITEMS, decided
    assert decided("worse", MIN_VERDICT_ITEMS - 1) == f"too few items to tell (n = {MIN_VERDICT_ITEMS - 1})"
    assert decided("worse", MIN_VERDICT_ITEMS) == "worse"
    cfg = resolve(Config(profile="chat", model=os.path.join(ROOT, "data", "stories260K"), out=str(tmp_path),
                         device="cpu"))
    pair = {"prompt": "Q", "chosen": "a", "rejected": "b", "meta": {}}
    almost.write_jsonl(str(tmp_path / "comparisons.jsonl"), [pair] * 25)
    os.makedirs(tmp_path / "rm_data")
    almost.write_jsonl(str(tmp_path / "rm_data" / "train_filter.jsonl"), [pair] * 24)
    almost.write_jsonl(str(tmp_path / "rm_data" / "val_filter.jsonl"), [pair])
    almost.write_jsonl(str(tmp_path / f"selfplay_n{cfg.n}.jsonl"), [{"usable": True, "candidates": []}] * 4)
    almost.write_jsonl(str(tmp_path / "rl_queries.jsonl"), [{"id": i, "query": "q"} for i in range(4)])
    almost.write_json(str(tmp_path / "sft_stats.json"), {
        "sft": {"scores": [0.1, -0.5], "mean_rm_score": -0.2}, "sft_plain": {"scores": [0.4, 0.2], "mean_rm_score": 0.3},
        "base": {"scores": [0.0, 0.0], "mean_rm_score": 0.0}})
    warnings = report.small_data_warnings(cfg)
    text = "\n".join(warnings)
    for words in ["25 synthetic comparison pairs, fewer than the 100", "1 reward-model optimizer steps (24 training pairs",
                  "1 held-out pairs", "4 usable self-play dialogues for SFT, fewer than the 50", "4 RL prompts for PPO"]:
        assert words in text, text
    assert all("--n_queries" in w or "--n_rl_queries" in w for w in warnings) and len(warnings) == 5
    # by the stage: after compare its pairs, after selfplay its dialogues, after the others nothing
    for stage, words in [("compare", "25 synthetic comparison pairs"), ("selfplay", "4 usable self-play dialogues"),
                         ("sft", None)]:
        monkeypatch.setitem(almost.STAGES, stage, lambda cfg: None)
        capsys.readouterr()
        almost.run_stages(cfg, [stage])
        printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("warning:")]
        assert (printed == [] if words is None else len(printed) == 1 and words in printed[0]), printed
    almost.stage_report(cfg)
    text = open(tmp_path / "report.md").read()
    top = text[:text.index("## Did it work?")]
    assert "Too little data" in top and "25 synthetic comparison pairs" in top and "4 RL prompts" in top
    line = next(x for x in text.splitlines() if "SFT on RM-guided against plain self-play" in x)
    assert "2 held-out queries" in line and "too few items to tell (n = 2)" in line and "[" in line
