"""seeds.py: the table of the runs each claim held on, over several seeds."""
import json

import pytest

from common import UserError


def test_seed_table_counts_the_runs_each_claim_held_on(tmp_path):
    """seeds.py: for each verdict the runs its claim held on, its mean and range, the run nearest its bar, and a status:
    "held on every run" only with every run's interval clear of the bar by more than the runs' spread, "borderline"
    when it held on all but sits within that spread, else how often; a finished run is not run again."""
    import seeds
    from report import verdict
    v = lambda key, x, lo, n=221, share=True, bar=0.5: verdict(key, key, "l", x, lo, x + 0.1, n, holds=lo > bar,  # noqa
                                                               share=share, bar=bar)
    runs = {"1/t1": ([v("far", 0.70, 0.62), v("near", 0.56, 0.505), v("mixed", 0.2, 0.1, 10, False, 0.0)], {"rm": 10.0}),
            "1/t2": ([v("far", 0.71, 0.63), v("near", 0.60, 0.54), v("mixed", -0.1, -0.3, 10, False, 0.0)], {"rm": 30.0}),
            "2/t1": ([v("far", 0.72, 0.64), v("near", 0.58, 0.52), v("mixed", 0.5, 0.4, 4, False, 0.0)], {})}
    md, rows = seeds.table(runs)
    far, near, mixed = rows
    assert far["status"] == "held on every run" and far["held"] == far["of"] == 3
    assert near["status"].startswith("borderline") and near["held"] == 3 and near["nearest"] == [0.505, 0.66]
    assert mixed["held"] == 1 and mixed["of"] == 3 and mixed["status"] == "held on 1 of 3 runs"   # 4 items: too few
    assert abs(mixed["mean"] - 0.2) < 1e-12 and (mixed["min"], mixed["max"]) == (-0.1, 0.5)
    assert "| far, n = 221 | 3 of 3 | 71.0% [70.0%, 72.0%] | [62.0%, 80.0%] | held on every run |" in md
    assert "| wall time of a run | - | 20 s [10, 30] | - | - |" in md
    for s_, t in ((1, 1), (2, 1)):                       # finished runs are read, not run again
        (tmp_path / f"seed_{s_}_t{t}").mkdir()
        (tmp_path / f"seed_{s_}_t{t}" / "verdicts.json").write_text(json.dumps(runs[f"{s_}/t{t}"][0]))
    seeds.main([f"--out={tmp_path}", "--seeds=1,2", "--threads=1"])
    text = (tmp_path / "seeds.md").read_text()
    assert "over 2 runs" in text and "| far | 70.0% ✓ | 72.0% ✓ |" in text and len(json.load(open(tmp_path / "seeds.json"))) == 3
    with pytest.raises(UserError, match="different numbers"):
        seeds.main([f"--out={tmp_path}", "--seeds=1,1"])
    with pytest.raises(UserError, match="at least two runs"):
        seeds.main([f"--out={tmp_path}", "--seeds=1", "--threads=2"])
