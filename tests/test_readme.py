"""The README's example must run as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_custom_tier_and_dataset_example_runs(fmnist, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "register_tier" in b and "register_dataset" in b)
    # my_data.npz in the working directory: a slice of Fashion-MNIST as uint8, as a user would have
    to_uint8 = lambda x: ((x.numpy() * 0.5 + 0.5) * 255).round().astype(np.uint8)  # noqa: E731
    np.savez(tmp_path / "my_data.npz", x_train=to_uint8(fmnist.train.images[:1000]),
             y_train=fmnist.train.labels[:1000].numpy(), x_test=to_uint8(fmnist.test.images[:1000]),
             y_test=fmnist.test.labels[:1000].numpy())
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    summary = namespace["summary"]
    assert summary["dataset"] == "my-data" and set(summary["tiers"]) == {"mlp", "cnn3"}
    assert summary["tiers"]["mlp"]["best_acc"] > 40.0  # chance is 10 %
    assert (tmp_path / "runs").is_dir()
