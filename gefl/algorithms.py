"""Federated algorithms: their phases, what a client does in each, and how results combine.

An algorithm is three things, in the spirit of Flower's strategies: `phases()` (the schedule the
federation state machine runs), `client_step()` (one client's work for one round, run wherever
the client is) and `aggregate()` (pure: global state + results -> global state). Clients are
stateless between rounds: everything a round needs travels in its task, so a client process can
restart at any time and a simulated client can run in any worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gefl.aggregation import StateDict, Update, fedavg, lg_fedavg, nonfinite_entries, per_architecture
from gefl.config import Config
from gefl.data import Split
from gefl.errors import GeflError, unknown_name
from gefl.federation import Phase
from gefl.generators import FeatureGenerator, build_generator
from gefl.models import FE_CHANNELS, TierNet, get_model
from gefl.training import extract_features, train_epochs, train_generator, train_on_generated
from gefl.wire import decode_state, encode_state

WARMUP, TRAIN, GENERATOR, HEAD = "warmup", "train", "generator", "head"


@dataclass(frozen=True)
class ClientTask:
    """What a client receives for one round. Weights travel encoded, as they would on the wire."""

    round: int
    phase: str
    client_id: int
    tier: str
    seed: int
    model: bytes
    generator: bytes | None = None


@dataclass(frozen=True)
class ClientResult:
    client_id: int
    tier: str
    phase: str
    state: bytes
    """The trained tier model, or the trained generator in the generator phase."""
    num_samples: int
    loss: float


@dataclass
class GlobalState:
    models: dict[str, StateDict]
    """Each tier's whole network (FE + head) as a state dict."""
    generator: StateDict | None = None


class Algorithm:
    name = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.feature_shape = (FE_CHANNELS, 16, 16)

    def prox_mu(self) -> float:
        return 0.0

    def phases(self) -> list[Phase]:
        return [Phase(TRAIN, self.cfg.rounds, True)]

    def shares_fe(self) -> bool:
        return False

    def prepare_round(self, phase: str, state: GlobalState, num_classes: int) -> GlobalState:
        """Server-side set-up before a round's tasks go out; most algorithms need none."""
        return state

    def init_state(self, tiers: list[str], in_channels: int, num_classes: int) -> GlobalState:
        torch.manual_seed(self.cfg.seed)
        models = {t: get_model(t, in_channels, num_classes).state_dict() for t in tiers}
        if self.shares_fe():  # one global FE from the start, as a server would hand out
            fe = {k: v for k, v in models[tiers[0]].items() if k.startswith("fe.")}
            for state in models.values():
                state.update({k: v.clone() for k, v in fe.items()})
        return GlobalState(models)

    # -- client side -------------------------------------------------------------------------
    def _model(self, task: ClientTask, data: Split, num_classes: int) -> TierNet:
        """The tier's network with the round's global weights, on the device the data live on."""
        model = get_model(task.tier, data.images.shape[1], num_classes)
        model.load_state_dict(decode_state(task.model))
        return model.to(data.images.device)

    def client_step(self, task: ClientTask, data: Split, num_classes: int) -> ClientResult:
        torch.manual_seed(task.seed)
        rng = torch.Generator().manual_seed(task.seed)
        model = self._model(task, data, num_classes)
        loss = train_epochs(model, data.images, data.labels, self.cfg.train, rng, self.prox_mu())
        return ClientResult(task.client_id, task.tier, task.phase, encode_state(model.state_dict()), len(data), loss)

    # -- server side -------------------------------------------------------------------------
    def check_result(self, result: ClientResult, state: GlobalState) -> None:
        """Refuse a result that must not reach the global state: names and shapes that differ
        from what the client was given, or NaN/inf values (a diverged client)."""
        expected = state.generator if result.phase == GENERATOR else state.models.get(result.tier)
        what = "generator" if result.phase == GENERATOR else f"tier {result.tier!r} model"
        if expected is None:
            raise GeflError(f"client {result.client_id}: no global {what} to update")
        received = decode_state(result.state)
        if received.keys() != expected.keys():
            raise GeflError(f"client {result.client_id}: {what} entries differ from the global {what}")
        for k, v in received.items():
            if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
                raise GeflError(f"client {result.client_id}: {what} entry {k!r} is {v.dtype}{list(v.shape)}, "
                                f"expected {expected[k].dtype}{list(expected[k].shape)}")
        bad = nonfinite_entries(received)
        if bad:
            raise GeflError(f"client {result.client_id}: {what} has NaN or infinite values "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); training diverged")

    def _updates(self, results: list[ClientResult]) -> list[Update]:
        return [Update(r.tier, decode_state(r.state), r.num_samples) for r in results]

    def aggregate(self, phase: str, state: GlobalState, results: list[ClientResult]) -> GlobalState:
        new = per_architecture(self._updates(results), self.cfg.aggregation.weighted)
        return GlobalState({**state.models, **new}, state.generator)


class FedAvg(Algorithm):
    """FedAvg per architecture: clients of one tier average with each other, tiers share nothing."""

    name = "fedavg"


class FedProx(FedAvg):
    """FedAvg per architecture with the proximal term mu/2 ||w - w_global||^2 in local training."""

    name = "fedprox"

    def prox_mu(self) -> float:
        return self.cfg.train.prox_mu


class LGFedAvg(Algorithm):
    """LG-FedAvg: the common FE is averaged over all clients, heads within each tier."""

    name = "lg-fedavg"

    def shares_fe(self) -> bool:
        return True

    def aggregate(self, phase: str, state: GlobalState, results: list[ClientResult]) -> GlobalState:
        new = lg_fedavg(self._updates(results), "fe.", self.cfg.aggregation.weighted)
        # A tier with no participant this round still receives the new common FE.
        shared = {k: v for k, v in next(iter(new.values())).items() if k.startswith("fe.")}
        models = {t: {**s, **shared} for t, s in state.models.items()}
        models.update(new)
        return GlobalState(models, state.generator)


class GeFLF(LGFedAvg):
    """GeFL-F: LG-FedAvg warm-up, then a federated generator of FE features with the FE frozen,
    then head rounds on generated features (one pass) and real features (local epochs)."""

    name = "gefl-f"

    def phases(self) -> list[Phase]:
        g = self.cfg.gefl
        return [
            Phase(WARMUP, g.warmup_rounds, True),
            Phase(GENERATOR, g.generator_rounds, False),
            Phase(HEAD, self.cfg.rounds, True),
        ]

    def new_generator(self, num_classes: int) -> FeatureGenerator:
        g = self.cfg.gefl.generator
        return build_generator(
            g.family, self.feature_shape, num_classes, g.preset, widths=g.widths, latent=g.latent
        )

    def prepare_round(self, phase: str, state: GlobalState, num_classes: int) -> GlobalState:
        """The generator is created when its phase begins: its shape depends on the frozen FE's output."""
        if phase == GENERATOR and state.generator is None:
            torch.manual_seed(self.cfg.seed + 1)
            return GlobalState(state.models, self.new_generator(num_classes).state_dict())
        return state

    def client_step(self, task: ClientTask, data: Split, num_classes: int) -> ClientResult:
        if task.phase == WARMUP:
            return super().client_step(task, data, num_classes)
        torch.manual_seed(task.seed)
        rng = torch.Generator().manual_seed(task.seed)
        model = self._model(task, data, num_classes)
        features = extract_features(model.fe, data.images)  # the FE is frozen from here on
        generator = self.new_generator(num_classes).to(data.images.device)
        if task.generator is not None:
            generator.load_state_dict(decode_state(task.generator))
        if task.phase == GENERATOR:
            g = self.cfg.gefl.generator
            opt = torch.optim.Adam(generator.parameters(), lr=g.lr, weight_decay=g.weight_decay)
            batch = self.cfg.train.batch_size
            loss = train_generator(generator, features, data.labels, g.local_epochs, batch, opt, rng)
            state = encode_state(generator.state_dict())
            return ClientResult(task.client_id, task.tier, task.phase, state, len(data), loss)
        # HEAD: one pass on generated features, then local epochs on real ones; FE untouched.
        passes = self.cfg.gefl.generated_passes
        if passes > 0 and task.generator is not None:
            num_batches = passes * max(1, len(data) // self.cfg.train.batch_size)
            train_on_generated(model.head, generator, num_batches, num_classes, self.cfg.train, rng)
        loss = train_epochs(model.head, features, data.labels, self.cfg.train, rng)
        return ClientResult(task.client_id, task.tier, task.phase, encode_state(model.state_dict()), len(data), loss)

    def aggregate(self, phase: str, state: GlobalState, results: list[ClientResult]) -> GlobalState:
        if phase == WARMUP:
            return super().aggregate(phase, state, results)
        if phase == GENERATOR:
            weights = [r.num_samples for r in results] if self.cfg.aggregation.weighted else None
            return GlobalState(state.models, fedavg([decode_state(r.state) for r in results], weights))
        return Algorithm.aggregate(self, phase, state, results)


ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (FedAvg, FedProx, LGFedAvg, GeFLF)}


def make_algorithm(cfg: Config) -> Algorithm:
    cls = ALGORITHMS.get(cfg.algorithm)
    if cls is None:
        raise unknown_name("algorithm", cfg.algorithm, ALGORITHMS)
    return cls(cfg)
