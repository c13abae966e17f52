import pytest

from gefl.rounds.federation import Federation, Phase, RoundError

PHASES = [Phase("warmup", 3, True), Phase("generator", 2, False), Phase("head", 20, True)]


def run_round(fed: Federation) -> None:
    info = fed.open_round()
    for c in info.participants:
        fed.submit(c, info.number, f"r{info.number}c{c}")
    fed.close_round()


def test_rounds_walk_through_the_phases_in_order_and_evaluate_on_schedule():
    fed: Federation[str] = Federation(PHASES, num_clients=4, eval_every=10)
    seen = []
    while not fed.finished:
        info = fed.open_round()
        seen.append((info.phase, info.phase_round, info.evaluate))
        for c in info.participants:
            fed.submit(c, info.number, "x")
        fed.close_round()
    assert fed.total_rounds == len(seen) == 25
    assert [s[0] for s in seen] == ["warmup"] * 3 + ["generator"] * 2 + ["head"] * 20
    evaluated = [(p, r) for p, r, e in seen if e]
    assert evaluated == [("warmup", 1), ("warmup", 3), ("head", 1), ("head", 10), ("head", 20)]
    with pytest.raises(RoundError, match="finished"):
        fed.open_round()


def test_late_duplicate_and_foreign_results_are_refused():
    fed: Federation[str] = Federation(PHASES, num_clients=3)
    run_round(fed)
    info = fed.open_round()
    assert info.number == 2
    with pytest.raises(RoundError, match="round 1 refused"):
        fed.submit(0, 1, "late")
    fed.submit(0, 2, "ok")
    with pytest.raises(RoundError, match="already submitted"):
        fed.submit(0, 2, "again")
    with pytest.raises(RoundError, match="not a participant"):
        fed.submit(7, 2, "stranger")
    assert fed.missing == [1, 2]
    with pytest.raises(RoundError, match="still open"):
        fed.open_round()
    assert fed.close_round() == {0: "ok"}  # a quorum of one closes with what arrived


def test_client_fraction_samples_a_seeded_subset():
    fed: Federation[str] = Federation([Phase("train", 50, True)], num_clients=10, client_fraction=0.3, seed=1)
    draws = [fed.sample_clients(r) for r in range(1, 51)]
    assert all(len(d) == 3 and len(set(d)) == 3 for d in draws)
    assert len(set(draws)) > 10, "different rounds should pick different clients"
    again: Federation[str] = Federation([Phase("train", 50, True)], num_clients=10, client_fraction=0.3, seed=1)
    assert draws == [again.sample_clients(r) for r in range(1, 51)]


def test_closing_an_empty_round_is_an_error():
    fed: Federation[str] = Federation(PHASES, num_clients=2)
    fed.open_round()
    with pytest.raises(RoundError, match="no results"):
        fed.close_round()
