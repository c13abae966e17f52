import pytest
import torch

from gefl.algorithms.aggregation import Update, fedavg, lg_fedavg, per_architecture


def test_fedavg_weighted_matches_hand_computation():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = fedavg([a, b], weights=[1, 3])
    # (1*1 + 3*3)/4 = 2.5 ; (1*2 + 3*6)/4 = 5.0
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert out["n"].item() == 5  # integer counters take the max, not a mean
    assert out["w"].dtype == torch.float32


def test_fedavg_unweighted_is_plain_mean():
    states = [{"w": torch.tensor([float(i)])} for i in (1, 2, 6)]
    assert fedavg(states)["w"].item() == pytest.approx(3.0)


def test_fedavg_rejects_mismatched_keys_and_bad_weights():
    with pytest.raises(ValueError, match="different keys"):
        fedavg([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="weights"):
        fedavg([{"a": torch.zeros(1)}], weights=[0])
    with pytest.raises(ValueError):
        fedavg([])


def test_per_architecture_averages_only_within_a_tier():
    ups = [
        Update("small", {"fe.w": torch.tensor([0.0]), "head.w": torch.tensor([1.0])}, 100),
        Update("small", {"fe.w": torch.tensor([4.0]), "head.w": torch.tensor([3.0])}, 300),
        Update("big", {"fe.w": torch.tensor([8.0]), "head.w": torch.tensor([10.0])}, 50),
    ]
    out = per_architecture(ups, weighted=True)
    assert out["small"]["fe.w"].item() == pytest.approx(3.0)  # (0*100 + 4*300)/400
    assert out["small"]["head.w"].item() == pytest.approx(2.5)
    assert out["big"]["fe.w"].item() == pytest.approx(8.0)
    unweighted = per_architecture(ups, weighted=False)
    assert unweighted["small"]["head.w"].item() == pytest.approx(2.0)


def test_lg_fedavg_shares_the_fe_over_all_clients_and_keeps_heads_per_tier():
    ups = [
        Update("a", {"fe.w": torch.tensor([0.0]), "head.w": torch.tensor([1.0])}, 1),
        Update("a", {"fe.w": torch.tensor([3.0]), "head.w": torch.tensor([3.0])}, 1),
        Update("b", {"fe.w": torch.tensor([9.0]), "head.w": torch.tensor([7.0])}, 1),
    ]
    out = lg_fedavg(ups, weighted=False)
    assert out["a"]["fe.w"].item() == pytest.approx(4.0)  # (0 + 3 + 9) / 3
    assert out["b"]["fe.w"].item() == pytest.approx(4.0)
    assert out["a"]["head.w"].item() == pytest.approx(2.0)
    assert out["b"]["head.w"].item() == pytest.approx(7.0)
    # weighted by samples: (0*1 + 3*1 + 9*4) / 6 = 6.5
    ups[2] = Update("b", ups[2].state, 4)
    assert lg_fedavg(ups, weighted=True)["a"]["fe.w"].item() == pytest.approx(6.5)
