"""Federated algorithms: their phases, what a client does in each, and how results combine.

An algorithm is three things, in the spirit of Flower's strategies: `phases()` (the schedule the
federation state machine runs), `client_step()` (one client's work for one round, run wherever
the client is) and `aggregate()` (pure: global state + results -> global state). Clients are
stateless between rounds: everything a round needs travels in its task, so a client process can
restart at any time and a simulated client can run in any worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from gefl.algorithms.aggregation import StateDict, Update, fedavg, lg_fedavg, nonfinite_entries, per_architecture
from gefl.algorithms.training import (
    distil,
    extract_features,
    predict_logits,
    predict_proba,
    train_epochs,
    train_generator,
    train_on_generated,
)
from gefl.data import IMAGE_SIZE, Split, public_images
from gefl.errors import GeflError
from gefl.generators import FEATURE, IMAGE, STATS_PREFIX, Generator, build_generator
from gefl.generators.cvae import statistics_problem
from gefl.optim import Adam
from gefl.protocol.wire import decode_state, encode_state
from gefl.registry import Registry
from gefl.rounds.federation import GENERATOR, HEAD, TRAIN, WARMUP, ClientResult, ClientTask, Phase, RoundInfo
from gefl.schema import Config
from gefl.tiers.models import FE_CHANNELS, TierNet, get_model


@dataclass
class GlobalState:
    models: dict[str, StateDict]
    """Each tier's whole network (FE + head) as a state dict."""
    generator: StateDict | None = None
    client_stats: dict[int, StateDict] = field(default_factory=dict)
    """Each client's latest generator statistics (its `stats.` entries), kept by the aggregator
    and never sent: the global statistics are their sum, so a class prior under partial
    participation reflects every client that has taken part, not only the last round's."""


class Algorithm:
    name = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def prox_mu(self) -> float:
        return 0.0

    def phases(self) -> list[Phase]:
        return [Phase(TRAIN, self.cfg.rounds, True)]

    def shares_fe(self) -> bool:
        return False

    def prepare_round(self, phase: str, state: GlobalState, num_classes: int) -> GlobalState:
        """Server-side set-up before a round's tasks go out; most algorithms need none."""
        return state

    def round_artifacts(self, info: RoundInfo, state: GlobalState, tier: str) -> dict[str, bytes]:
        """What a client of `tier` downloads for the round, by artifact name, as it travels."""
        return {"model": encode_state(state.models[tier])}

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
        return replace(state, models={**state.models, **new})


class FedAvg(Algorithm):
    """FedAvg per architecture: clients of one tier average with each other, tiers share nothing."""

    name = "fedavg"


class FedProx(FedAvg):
    """FedAvg per architecture with the proximal term mu/2 ||w - w_global||^2 in local training."""

    name = "fedprox"

    def prox_mu(self) -> float:
        return self.cfg.train.prox_mu


class AvgKD(FedAvg):
    """AvgKD (Afonin and Karimireddy, 2022), for many tiers: each client trains on targets that
    average its true labels with the other tiers' predictions on its own data, so architectures
    that share no weights still learn from each other, without any public data. Models are
    averaged per architecture. In the first round there is nothing to distil yet."""

    name = "avgkd"

    def round_artifacts(self, info: RoundInfo, state: GlobalState, tier: str) -> dict[str, bytes]:
        out = super().round_artifacts(info, state, tier)
        if info.number > 1 and len(state.models) > 1:
            out["teachers"] = encode_state({f"{t}/{k}": v for t, sd in state.models.items() if t != tier
                                            for k, v in sd.items()})
        return out

    def client_step(self, task: ClientTask, data: Split, num_classes: int) -> ClientResult:
        if task.teachers is None:
            return super().client_step(task, data, num_classes)
        torch.manual_seed(task.seed)
        rng = torch.Generator().manual_seed(task.seed)
        teachers: dict[str, StateDict] = {}
        for key, value in decode_state(task.teachers).items():
            tier, _, entry = key.partition("/")
            teachers.setdefault(tier, {})[entry] = value
        predictions = []
        for tier, sd in teachers.items():
            teacher = _tier_model(tier, sd, data.images.shape[1]).to(data.images.device)
            predictions.append(predict_proba(teacher, data.images))
        onehot = torch.nn.functional.one_hot(data.labels, num_classes).float()
        targets = 0.5 * onehot + 0.5 * torch.stack(predictions).mean(0)
        model = self._model(task, data, num_classes)
        loss = train_epochs(model, data.images, targets, self.cfg.train, rng)
        return ClientResult(task.client_id, task.tier, task.phase, encode_state(model.state_dict()), len(data), loss)


class FedDF(FedAvg):
    """FedDF (Lin et al., 2020): models are averaged per architecture, then on the server each
    architecture is distilled towards the ensemble of all the round's client models (their mean
    logits) on unlabelled public images, so tiers learn from each other through the server only.
    The public set (`feddf.public_*`) is loaded by the server at its first aggregation."""

    name = "feddf"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._public: torch.Tensor | None = None

    def public(self, in_channels: int) -> torch.Tensor:
        if self._public is None:
            images = public_images(self.cfg)
            if images.shape[1] != in_channels:
                raise GeflError(f"feddf.public_dataset {self.cfg.feddf.public_dataset!r} has {images.shape[1]}-channel "
                                f"images; the models of {self.cfg.dataset} take {in_channels} channels")
            self._public = images
        return self._public

    def aggregate(self, phase: str, state: GlobalState, results: list[ClientResult]) -> GlobalState:
        if not results:
            return state
        updates = self._updates(results)  # decoded once: averaged, and the ensemble's members
        averaged = per_architecture(updates, self.cfg.aggregation.weighted)
        public, f = self.public(_in_channels(state)), self.cfg.feddf
        teachers = [_tier_model(u.tier, u.state, public.shape[1]) for u in updates]
        logits = torch.stack([predict_logits(m, public, self.cfg.eval.batch_size) for m in teachers]).mean(0)
        targets = torch.softmax(logits / f.temperature, dim=1)
        models = dict(state.models)
        rng = torch.Generator().manual_seed(self.cfg.seed)
        for tier in sorted(averaged):
            student = _tier_model(tier, averaged[tier], public.shape[1])
            distil(student, public, targets, f.steps, self.cfg.train.batch_size, f.lr, f.temperature, rng)
            models[tier] = student.state_dict()
        return GlobalState(models, state.generator)


def _in_channels(state: GlobalState) -> int:
    """The images' channels, read off the models' first convolution."""
    return next(iter(state.models.values()))["fe.conv.weight"].shape[1]


def _tier_model(tier: str, state: StateDict, in_channels: int) -> TierNet:
    model = get_model(tier, in_channels, state["head.fc.weight"].shape[0])
    model.load_state_dict(state)
    return model


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
        return replace(state, models=models)


def generated_shape(level: str, in_channels: int) -> tuple[int, int, int]:
    """What a generator of this level produces: images (GeFL) or the FE's features (GeFL-F)."""
    return (in_channels, IMAGE_SIZE, IMAGE_SIZE) if level == IMAGE else (FE_CHANNELS, IMAGE_SIZE // 2, IMAGE_SIZE // 2)


class GeneratorAlgorithm(LGFedAvg):
    """What GeFL and GeFL-F share: a federated conditional generator (created when its phase
    begins, averaged over every client, travelling as `wire_dtype`) and classifier rounds that
    train on generated samples as well as on real data."""

    level = ""

    def generator_shape(self, in_channels: int) -> tuple[int, int, int]:
        return generated_shape(self.level, in_channels)

    def new_generator(self, in_channels: int, num_classes: int) -> Generator:
        g = self.cfg.gefl.generator
        return build_generator(g.family, self.generator_shape(in_channels), num_classes, g.preset, g.options)

    def prepare_round(self, phase: str, state: GlobalState, num_classes: int) -> GlobalState:
        """The generator is created when its phase begins (GeFL-F: its input is the frozen FE's output).
        Once the phase is over, the per-client statistics are dropped: the generator's `stats.` hold
        their sum, which is all that later rounds use, and kept they would make every later
        checkpoint grow with the number of clients (about 80 KB per client)."""
        if phase == GENERATOR and state.generator is None:
            torch.manual_seed(self.cfg.seed + 1)
            return replace(state, generator=self.new_generator(_in_channels(state), num_classes).state_dict())
        if phase != GENERATOR and state.client_stats:
            return replace(state, client_stats={})
        return state

    # -- the generator on the wire -----------------------------------------------------------
    def _wire_dtype(self) -> torch.dtype:
        return torch.float16 if self.cfg.gefl.generator.wire_dtype == "float16" else torch.float32

    def generator_wire(self, state: StateDict) -> StateDict:
        """The generator as it travels: floating weights in `wire_dtype`; counters, and the
        sufficient statistics under `stats.` (sums, which float16 would round or overflow), as they are."""
        dtype = self._wire_dtype()
        return {k: v.to(dtype) if v.is_floating_point() and not k.startswith(STATS_PREFIX) else v
                for k, v in state.items()}

    def round_artifacts(self, info: RoundInfo, state: GlobalState, tier: str) -> dict[str, bytes]:
        out = super().round_artifacts(info, state, tier)
        if state.generator is not None:
            out["generator"] = self.encode_generator(state.generator)
        return out

    def encode_generator(self, state: StateDict) -> bytes:
        return encode_state(self.generator_wire(state))

    def decode_generator(self, data: bytes) -> StateDict:
        """Received generator weights, back in float32 for training and averaging."""
        return {k: v.float() if v.is_floating_point() else v for k, v in decode_state(data).items()}

    def check_result(self, result: ClientResult, state: GlobalState) -> None:
        """Also refuse class-prior statistics (`stats.`, summed into every client's prior) that
        no client's own codes can give: counts that are negative or add up to more samples than
        the client trained on, and sums and second moments inconsistent with their counts
        (`statistics_problem`: a mean outside the codes' range, an indefinite covariance, sums
        without a count). One client must not be able to outweigh the others' data, or move a
        class's mixture where no code lies, in what every client then samples from."""
        if result.phase == GENERATOR and state.generator is not None:
            state = GlobalState(state.models, self.generator_wire(state.generator))
        super().check_result(result, state)
        if result.phase != GENERATOR:
            return
        received = decode_state(result.state)
        count = received.get(f"{STATS_PREFIX}count")
        if count is None:
            return
        if count.min() < 0 or count.sum() > result.num_samples * (1 + 1e-3):
            raise GeflError(f"client {result.client_id}: generator statistics {STATS_PREFIX}count hold "
                            f"{float(count.sum()):.1f} samples (smallest entry {float(count.min()):.1f}) for "
                            f"{result.num_samples} trained on; counts must be non-negative and add up to at most that")
        total, moment = received.get(f"{STATS_PREFIX}sum"), received.get(f"{STATS_PREFIX}moment")
        if total is not None and moment is not None:  # shapes: checked against the global generator above
            problem = statistics_problem(count, total, moment)
            if problem is not None:
                raise GeflError(f"client {result.client_id}: generator statistics ({STATS_PREFIX}count, sum, moment) "
                                f"of {problem}; they must be the sums of the client's own codes, as an unmodified "
                                "client sends them")

    # -- client side -------------------------------------------------------------------------
    def _client_generator(self, task: ClientTask, data: Split, num_classes: int) -> Generator:
        generator = self.new_generator(data.images.shape[1], num_classes).to(data.images.device)
        if task.generator is not None:
            generator.load_state_dict(self.decode_generator(task.generator))
        return generator

    def _train_generator(self, task: ClientTask, generator: Generator, x: torch.Tensor, labels: torch.Tensor,
                         rng: torch.Generator) -> ClientResult:
        g = self.cfg.gefl.generator
        opt = Adam(generator.parameters(), lr=g.lr, betas=tuple(g.betas), weight_decay=g.weight_decay)
        batch_size = g.batch_size if g.batch_size is not None else self.cfg.train.batch_size
        loss = train_generator(generator, x, labels, g.local_epochs, batch_size, opt, rng)
        return ClientResult(task.client_id, task.tier, task.phase, self.encode_generator(generator.state_dict()),
                            len(labels), loss)

    def _train_classifier(self, module: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor,
                          generator: Generator | None, num_classes: int, rng: torch.Generator) -> float:
        """`generated_passes` passes on generated samples, then the local epochs on real data. In
        that order, BatchNorm's running statistics end on real data, which is what the model is
        tested on (mixing generated samples into every real batch measured worse)."""
        train = self.cfg.train
        if generator is not None and self.cfg.gefl.generated_passes > 0:
            batches = self.cfg.gefl.generated_passes * max(1, len(labels) // train.batch_size)
            train_on_generated(module, generator, batches, num_classes, train, rng)
        return train_epochs(module, x, labels, train, rng)

    # -- server side -------------------------------------------------------------------------
    def aggregate(self, phase: str, state: GlobalState, results: list[ClientResult]) -> GlobalState:
        if phase == GENERATOR:
            weights = [r.num_samples for r in results] if self.cfg.aggregation.weighted else None
            states = [self.decode_generator(r.state) for r in results]
            merged = fedavg(states, weights)
            keys = [k for k in merged if k.startswith(STATS_PREFIX)]
            if not keys:
                return replace(state, generator=merged)
            # Statistics add up, weights average. Each client's latest statistics replace its
            # earlier ones, and the sum runs over every client that has reported (in client order,
            # so that it does not depend on the order results arrived in).
            latest = {**state.client_stats, **{r.client_id: {k: s[k] for k in keys} for r, s in zip(results, states)}}
            for key in keys:
                merged[key] = torch.stack([latest[c][key] for c in sorted(latest)]).sum(0)
            return replace(state, generator=merged, client_stats=latest)
        return super().aggregate(phase, state, results)


class GeFL(GeneratorAlgorithm):
    """GeFL (image level): a federated conditional generator of images first, then classifier
    rounds in which each client trains its whole network on generated and real images. As in
    the reference, the common FE is averaged over all clients and the rest per architecture."""

    name = "gefl"
    level = IMAGE

    def phases(self) -> list[Phase]:
        return [Phase(GENERATOR, self.cfg.gefl.generator_rounds, False), Phase(TRAIN, self.cfg.rounds, True)]

    def client_step(self, task: ClientTask, data: Split, num_classes: int) -> ClientResult:
        torch.manual_seed(task.seed)
        rng = torch.Generator().manual_seed(task.seed)
        generator = self._client_generator(task, data, num_classes) if task.generator is not None else None
        if task.phase == GENERATOR:
            if generator is None:  # not an assert: the task comes from the network, and -O drops asserts
                raise GeflError(f"round {task.round}: a generator round's task carries no generator")
            return self._train_generator(task, generator, data.images, data.labels, rng)
        model = self._model(task, data, num_classes)
        loss = self._train_classifier(model, data.images, data.labels, generator, num_classes, rng)
        return ClientResult(task.client_id, task.tier, task.phase, encode_state(model.state_dict()), len(data), loss)


class GeFLF(GeneratorAlgorithm):
    """GeFL-F: LG-FedAvg warm-up, then a federated generator of FE features with the FE frozen,
    then head rounds on generated and real features."""

    name = "gefl-f"
    level = FEATURE

    def phases(self) -> list[Phase]:
        g = self.cfg.gefl
        return [
            Phase(WARMUP, g.warmup_rounds, True),
            Phase(GENERATOR, g.generator_rounds, False),
            Phase(HEAD, self.cfg.rounds, True),
        ]

    def client_step(self, task: ClientTask, data: Split, num_classes: int) -> ClientResult:
        if task.phase == WARMUP:
            return LGFedAvg.client_step(self, task, data, num_classes)
        torch.manual_seed(task.seed)
        rng = torch.Generator().manual_seed(task.seed)
        model = self._model(task, data, num_classes)
        features = extract_features(model.fe, data.images)  # the FE is frozen from here on
        generator = self._client_generator(task, data, num_classes) if task.generator is not None else None
        if task.phase == GENERATOR:
            if generator is None:  # not an assert: the task comes from the network, and -O drops asserts
                raise GeflError(f"round {task.round}: a generator round's task carries no generator")
            return self._train_generator(task, generator, features, data.labels, rng)
        loss = self._train_classifier(model.head, features, data.labels, generator, num_classes, rng)
        return ClientResult(task.client_id, task.tier, task.phase, encode_state(model.state_dict()), len(data), loss)

    def check_result(self, result: ClientResult, state: GlobalState) -> None:
        """Also refuse a head round's model whose FE differs from the global one. The FE is frozen
        after the warm-up (the generator models its features, and every head trains on them), so
        an honest result carries it unchanged, bit for bit; averaged into its tier, a changed one
        would move the features under every client's head and the generator alike."""
        super().check_result(result, state)
        if result.phase != HEAD:
            return
        received, expected = decode_state(result.state), state.models[result.tier]
        changed = [k for k in expected if k.startswith("fe.") and not torch.equal(received[k], expected[k])]
        if changed:
            raise GeflError(f"client {result.client_id}: the tier {result.tier!r} model's feature extractor differs "
                            f"from the global one ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); "
                            "it is frozen after the warm-up, and a head round may change only the head")

    def aggregate(self, phase: str, state: GlobalState, results: list[ClientResult]) -> GlobalState:
        if phase == HEAD:  # heads per architecture; the frozen FE is the same in every result (check_result)
            return Algorithm.aggregate(self, phase, state, results)
        return super().aggregate(phase, state, results)


AlgorithmFactory = Callable[[Config], Algorithm]
"""Builds an algorithm for a run's config; an `Algorithm` subclass is one."""

ALGORITHMS: Registry[AlgorithmFactory] = Registry("algorithm")


def register_algorithm(name: str, factory: AlgorithmFactory) -> None:
    """Add an algorithm that configs may name (`algorithm: NAME`): `factory(cfg)` returns an
    `Algorithm`, typically `factory` is a subclass of one of the classes here. A subclass of
    `GeneratorAlgorithm` takes generator families of its `level` (see `generator_level`).
    Registering a name of your own again replaces that algorithm; a built-in name is refused.

    Clients that run in worker processes or on other machines need the same registration in
    the code they import, as for a user's own tiers."""
    if not callable(factory):
        raise GeflError(f"algorithm {name!r}: the factory must be callable (an Algorithm subclass), got {factory!r}")
    ALGORITHMS.register(name, factory)


def list_algorithms() -> list[str]:
    """Registered algorithm names, the built-in ones first."""
    return ALGORITHMS.names()


def generator_level(name: str) -> str | None:
    """IMAGE or FEATURE: which generator families algorithm `name` takes; None if it trains no generator."""
    factory = ALGORITHMS.get(name)
    if isinstance(factory, type) and issubclass(factory, GeneratorAlgorithm):
        return factory.level or None
    return getattr(factory, "level", None) or None


def make_algorithm(cfg: Config) -> Algorithm:
    return ALGORITHMS.get(cfg.algorithm)(cfg)


for _algorithm in (FedAvg, FedProx, AvgKD, FedDF, LGFedAvg, GeFL, GeFLF):
    register_algorithm(_algorithm.name, _algorithm)
ALGORITHMS.seal_builtins()
