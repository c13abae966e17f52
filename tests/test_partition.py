import numpy as np
import pytest

from gefl.config import config_from_dict
from gefl.data import client_indices, partition, validation_indices
from gefl.errors import GeflError

LABELS = np.repeat(np.arange(10), 1000)  # 10 000 samples, 1 000 per class


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("per_client", [600, None])
def test_partitions_are_complete_disjoint_and_deterministic(kind, per_client):
    parts = partition(LABELS, 10, kind, samples_per_client=per_client, alpha=0.3, shards_per_client=2, seed=3)
    assert len(parts) == 10
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())), "a sample was given to two clients"
    expected = 6000 if per_client else len(LABELS)
    assert len(flat) == expected, "the pool is not fully distributed"
    again = partition(LABELS, 10, kind, samples_per_client=per_client, alpha=0.3, shards_per_client=2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(LABELS, 10, kind, samples_per_client=per_client, alpha=0.3, shards_per_client=2, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_gives_the_papers_600_per_client():
    parts = partition(LABELS, 10, "iid", samples_per_client=600, seed=0)
    assert [len(p) for p in parts] == [600] * 10


def test_shards_limit_the_classes_per_client():
    parts = partition(LABELS, 10, "shards", samples_per_client=None, shards_per_client=2, seed=0)
    # label-sorted shards of 500 never straddle a class boundary here, so at most 2 classes each
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 2


def test_dirichlet_is_skewed_and_small_alpha_more_so():
    def skew(alpha: float) -> float:
        parts = partition(LABELS, 10, "dirichlet", samples_per_client=600, alpha=alpha, seed=0)
        return float(np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts]))

    assert skew(0.1) > skew(100.0)
    assert skew(100.0) < 0.2  # nearly uniform


def test_partition_errors_name_the_problem():
    with pytest.raises(GeflError, match="exceeds"):
        partition(LABELS, 10, "iid", samples_per_client=5000)
    with pytest.raises(GeflError, match="valid partitions are: dirichlet, iid, shards"):
        partition(LABELS, 10, "zipf")
    with pytest.raises(GeflError, match="alpha"):
        partition(LABELS, 10, "dirichlet", alpha=0)


def test_the_validation_split_is_drawn_from_images_no_client_holds():
    cfg = config_from_dict({"num_clients": 10, "partition": {"samples_per_client": 600},
                            "eval": {"split": "validation", "validation_size": 3000}})
    labels = np.repeat(np.arange(10), 6000)
    held = validation_indices(cfg, labels)
    assert len(held) == len(set(held.tolist())) == 3000
    assert not set(held.tolist()) & set(np.concatenate(client_indices(cfg, labels)).tolist())
    assert np.array_equal(held, validation_indices(cfg, labels))  # the seed fixes it
    too_many = config_from_dict({"num_clients": 10, "eval": {"validation_size": 54001}})
    with pytest.raises(GeflError, match="only 54000 training images belong to no client"):
        validation_indices(too_many, labels)


def test_an_unknown_eval_split_names_the_valid_ones():
    with pytest.raises(GeflError, match="test, validation"):
        config_from_dict({"eval": {"split": "train"}})
