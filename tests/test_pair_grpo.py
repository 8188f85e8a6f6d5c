"""Pair-GRPO's math (PairUni eq. 1-4): pair weights, per-(pair, task) normalisation, every advantage of a
pair scaled, and the two sides' losses summed in one update."""

import math
from types import SimpleNamespace

import pytest
import torch

from g2rpo.advantages import GroupNormalization, compute_advantages
from g2rpo.algos import FlowGRPO, TokenGRPO
from g2rpo.algos.base import Algorithm
from g2rpo.algos.pair_grpo import PairGRPO, PairRewards, PairRollout, pair_weights, understanding_batch
from g2rpo.types import LossOutput, PromptBatch, RewardOutput, TrainingUnit

GROUP = GroupNormalization(std="group")


def pair_metadata(kind, similarity=None, answer="red"):
    pair = {
        "question": "what colour is the circle",
        "answer": answer,
        "qtype": "colour",
        "image": torch.zeros(3, 4, 4),
        "kind": kind,
        "similarity": similarity,
    }
    return {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "pair": pair}


def pair_batch(kinds_and_similarities, group_size):
    metadata = [pair_metadata(kind, s) for kind, s in kinds_and_similarities]
    return PromptBatch.from_groups(
        [f"caption {i}" for i in range(len(metadata))],
        metadata,
        torch.arange(len(metadata)),
        torch.full((len(metadata),), group_size),
    )


def algorithm(weight_fn="sqrt", **kwargs):
    return PairGRPO(
        generation=FlowGRPO(normalization=GROUP, beta=0.0),
        understanding=TokenGRPO(normalization=GROUP),
        weight_fn=weight_fn,
        **kwargs,
    )


def test_pair_weights_are_one_for_aligned_pairs_and_a_function_of_similarity_for_retrieved_ones():
    metadata = [pair_metadata("aligned"), pair_metadata("retrieved", 0.64), pair_metadata("random")]
    assert pair_weights(metadata, "sqrt").tolist() == pytest.approx([1.0, 0.8, 1.0])
    assert pair_weights(metadata, "linear").tolist() == pytest.approx([1.0, 0.64, 1.0])
    assert pair_weights(metadata, "none").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="none, linear, sqrt"):
        pair_weights(metadata, "square")


def scored_rollout(algo, batch, generation_rewards, answer_rewards):
    """Stand-in side rollouts (what advantages read of them: the scored batch) and both sides' rewards."""
    rollout = PairRollout(
        generation=SimpleNamespace(scored=batch),
        understanding=SimpleNamespace(scored=understanding_batch(batch)),
        batch=batch,
        weights=pair_weights(batch.metadata, algo.weight_fn),
    )
    sides = {
        "generation": RewardOutput({"geneval": generation_rewards}, {"geneval": 1.0}),
        "understanding": RewardOutput({"answer": answer_rewards}, {"answer": 1.0}),
    }
    return rollout, rollout.scored, PairRewards({}, {}, sides=sides)


def test_each_side_is_normalised_in_its_pair_group_and_every_advantage_of_a_pair_is_scaled():
    algo = algorithm("sqrt")
    batch = pair_batch([("aligned", None), ("retrieved", 0.81)], group_size=4)
    generation = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.0, 1.0, 0.2, 0.6])
    answers = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    rollout, scored, rewards = scored_rollout(algo, batch, generation, answers)
    advantages = algo.advantages(rewards, rollout)

    # the scored batch: generation rows, then understanding rows, four (pair, task) groups of 4
    assert len(scored) == 16 and scored.group_ids.unique().numel() == 4
    plain_g = compute_advantages(RewardOutput({"r": generation}, {"r": 1.0}), batch.groups, GROUP).values
    plain_u = compute_advantages(RewardOutput({"r": answers}, {"r": 1.0}), batch.groups, GROUP).values
    weights = torch.tensor([1.0] * 4 + [0.9] * 4)
    assert torch.allclose(advantages.sides["generation"].values, plain_g * weights)
    assert torch.allclose(advantages.sides["understanding"].values, plain_u * weights)
    assert torch.allclose(advantages.values, torch.cat([plain_g * weights, plain_u * weights]))
    # each side's group means stay zero after scaling (one weight per group)
    for side in ("generation", "understanding"):
        values = advantages.sides[side].values
        assert values[:4].sum().abs() < 1e-5 and values[4:].sum().abs() < 1e-5


def test_a_group_of_one_side_can_be_flat_while_the_other_trains():
    algo = algorithm("none")
    batch = pair_batch([("aligned", None)], group_size=4)
    rollout, _, rewards = scored_rollout(algo, batch, torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.ones(4))
    advantages = algo.advantages(rewards, rollout)
    assert advantages.sides["understanding"].train_mask.sum() == 0  # all answers right: no signal
    assert advantages.sides["generation"].train_mask.all()
    assert advantages.num_groups == 2 and advantages.num_zero_std_groups == 1


class LinearSide(Algorithm):
    """A stand-in side whose unit loss is ``parameter * value[sample]`` (for checking the update's sum)."""

    def __init__(self, values, steps):
        self.values, self.steps = values, steps

    def minibatches(self, rollout, advantages, generator):
        return [[TrainingUnit(torch.tensor([i]), 0) for i in step] for step in self.steps]

    def loss(self, policy, rollout, advantages, unit):
        return LossOutput(loss=policy * self.values[unit.samples].sum(), metrics={})


@pytest.mark.parametrize("side_weights", [(1.0, 1.0), (0.5, 2.0)])
def test_one_update_sums_the_two_sides_mean_losses(side_weights):
    algo = algorithm()
    generation_values, answer_values = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0])
    algo.generation = LinearSide(generation_values, steps=[[0, 1, 2]])
    algo.understanding = LinearSide(answer_values, steps=[[0, 1]])
    algo.side_weights = {"generation": side_weights[0], "understanding": side_weights[1]}
    advantages = type("A", (), {"sides": {"generation": None, "understanding": None}})()
    rollout = PairRollout(None, None, None, torch.ones(1))
    (units,) = algo.minibatches(rollout, advantages, torch.Generator())
    parameter = torch.tensor(1.0, requires_grad=True)
    # the module's step: the mean over the step's units of each unit's loss
    step_loss = sum(algo.loss(parameter, rollout, advantages, unit).loss for unit in units) / len(units)
    step_loss.backward()
    expected = side_weights[0] * generation_values.mean() + side_weights[1] * answer_values.mean()
    assert parameter.grad.item() == pytest.approx(expected.item())
    assert {unit.side for unit in units} == {"generation", "understanding"}


def test_a_side_with_nothing_to_train_leaves_the_other_alone():
    algo = algorithm()
    algo.generation = LinearSide(torch.tensor([1.0, 3.0]), steps=[[0, 1]])
    algo.understanding = LinearSide(torch.tensor([5.0]), steps=[])
    advantages = type("A", (), {"sides": {"generation": None, "understanding": None}})()
    rollout = PairRollout(None, None, None, torch.ones(1))
    (units,) = algo.minibatches(rollout, advantages, torch.Generator())
    parameter = torch.tensor(1.0, requires_grad=True)
    (sum(algo.loss(parameter, rollout, advantages, u).loss for u in units) / len(units)).backward()
    assert parameter.grad.item() == pytest.approx(2.0)


def test_pair_grpo_rejects_a_bad_configuration_clearly():
    with pytest.raises(ValueError, match="none, linear, sqrt"):
        algorithm("cubic")
    with pytest.raises(ValueError, match="algorithm over images"):
        PairGRPO(generation=None)
    with pytest.raises(ValueError, match="task=answer"):
        PairGRPO(generation=FlowGRPO(), understanding=TokenGRPO(task="image"))
    with pytest.raises(ValueError, match="pair data"):
        pair_weights([{"tag": "colors"}], "sqrt")
    assert math.isclose(
        pair_weights([pair_metadata("retrieved", 0.6)], "sqrt").item(), math.sqrt(0.6), rel_tol=1e-6
    )
