"""drafter/plots.py: every plot is a real PNG, and an empty input draws nothing."""

from __future__ import annotations

from drafter import plots

PNG = b"\x89PNG\r\n\x1a\n"


def report(taus: dict[str, float], rates: list[float]) -> dict:
    datasets = {d: {"tau_pooled": t, "tau_ci": [t - 0.1, t + 0.1], "accept_rate_at_k": rates} for d, t in taus.items()}
    return {"drafter": {"gamma": len(rates), "algorithm": "dspark"}, "target": {"name": "tiny"},
            "datasets": datasets, "overall": {"accept_rate_at_k": rates}, "macro_tau": sum(taus.values()) / len(taus)}


def test_every_plot_writes_a_png(tmp_path):
    cand, prod = report({"gsm8k": 2.4, "mbpp": 2.0}, [0.7, 0.5, 0.3]), report({"gsm8k": 2.1}, [0.6, 0.4, 0.2])
    written = [
        plots.acceptance_per_position(cand, tmp_path / "a.png"),
        plots.tau_per_dataset(cand, tmp_path / "b.png"),
        plots.accepted_length_histogram([1, 2, 4, 4, 3], 3, tmp_path / "c.png"),
        plots.candidate_vs_production(cand, prod, tmp_path / "d.png"),
        plots.candidate_vs_production(cand, None, tmp_path / "e.png"),
        plots.training_curves([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
                              [{"step": 0, "sim_tau": 1.0, "sim_tau_greedy": 1.0}], tmp_path / "f.png"),
        plots.tau_history([(0.0, 2.0), (60.0, 1.8)], 2.1, tmp_path / "g.png"),
        plots.production_acceptance([0.5, 0.3], [0.6, 0.4], tmp_path / "h.png"),
        plots.traffic_mix({"chat": 3}, {"chat": 1, "code": 2}, tmp_path / "sub" / "i.png"),
    ]
    assert all(p.read_bytes()[:8] == PNG for p in written)
    assert not list(tmp_path.glob("**/.*"))  # written atomically: no temporary files left


def test_nothing_to_plot_draws_nothing(tmp_path):
    assert plots.accepted_length_histogram([], 3, tmp_path / "x.png") is None
    assert plots.training_curves([], [], tmp_path / "y.png") is None
    assert plots.tau_history([], None, tmp_path / "z.png") is None
    assert plots.traffic_mix({}, {}, tmp_path / "w.png") is None
    assert not list(tmp_path.iterdir())
