"""The fuzz targets' contract on every CI run, without atheris: each seed of each target's corpus
(benchmarks/fuzz/corpus/<target>/) and a few fixed hostile inputs must end normally or in the
project's documented errors (GeflError and its subclasses: Malformed, Refused, ...); any other
exception, or a call that does not finish, fails. A seed named valid-* must also get all the way
through its target, so the corpus keeps reaching the code it was made for as the protocol changes
(`python benchmarks/fuzz.py --make-corpus` rewrites it). benchmarks/fuzz.py runs the same targets
coverage-guided, for minutes; this replays what it starts from in a few seconds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "benchmarks" / "fuzz" / "corpus"
CORPUS_LIMIT = 200 * 1024


def _targets() -> ModuleType:
    """benchmarks/fuzz/targets.py (benchmarks/ is no package), loaded once per process."""
    if "gefl_fuzz_targets" in sys.modules:
        return sys.modules["gefl_fuzz_targets"]
    spec = importlib.util.spec_from_file_location("gefl_fuzz_targets", ROOT / "benchmarks" / "fuzz" / "targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


targets = _targets()
NAMES = sorted(targets.TARGETS)
SEEDS = [(name, path.name) for name in NAMES for path in sorted((CORPUS / name).glob("*"))]
HOSTILE = [(name, label) for name in NAMES for label in targets.hostile_inputs(name)]


@pytest.mark.parametrize("name", NAMES)
def test_every_target_has_a_small_seed_corpus_with_valid_inputs(name: str) -> None:
    files = sorted((CORPUS / name).glob("*"))
    assert any(f.name.startswith("valid-") for f in files), f"{name}: no valid-* seed in {CORPUS / name}"
    size = sum(f.stat().st_size for f in files)
    assert size < CORPUS_LIMIT, f"{name}: the seed corpus is {size:,} bytes (committed: keep it under 200 KB)"


@pytest.mark.parametrize(("name", "seed"), SEEDS, ids=[f"{n}/{s}" for n, s in SEEDS])
def test_seed_keeps_the_contract(name: str, seed: str) -> None:
    targets.prepare(name)
    targets.replay(name, (CORPUS / name / seed).read_bytes())
    if seed.startswith("valid-"):
        assert targets.LAST_OUTCOME == "ok", f"{name}/{seed} is refused: {targets.LAST_OUTCOME}"


@pytest.mark.parametrize(("name", "label"), HOSTILE, ids=[f"{n}/{label}" for n, label in HOSTILE])
def test_hostile_input_keeps_the_contract(name: str, label: str) -> None:
    targets.prepare(name)
    targets.replay(name, targets.hostile_inputs(name)[label])
