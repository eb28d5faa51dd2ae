"""The training maths the trainer runs, against diffusers: flow-matching loss, LR schedules, step counts."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from torch.utils.data import DataLoader, DistributedSampler

from sd35dist.data.stream_order import bucket_layouts, optimizer_steps_per_epoch
from sd35dist.trainer.flow_matching import (
    FlowMatchSchedule,
    flow_matching_loss_sum_and_count,
    loss_weighting,
    noisy_input_and_target,
    sample_timestep_density,
    sample_timestep_indices,
)
from sd35dist.trainer.lr_schedule import learning_rate_at, learning_rate_factor_at

pytestmark = pytest.mark.unit

SCHEMES = ["logit_normal", "mode", "cosmap", "uniform", "none"]
DENSITY = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def example_training_step(scheme, x0, noise, pred, generator, scheduler):
    """diffusers' examples/dreambooth/train_dreambooth_sd3.py, its loss lines as written there."""

    def get_sigmas(timesteps, n_dim, dtype):
        sigmas = scheduler.sigmas.to(dtype=dtype)
        schedule_timesteps = scheduler.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    u = compute_density_for_timestep_sampling(scheme, x0.shape[0], generator=generator, **DENSITY)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = get_sigmas(timesteps, n_dim=x0.ndim, dtype=x0.dtype)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - x0
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return timesteps, noisy, target, weighting, loss.mean()


def trainer_loss(pred, target, weighting, *, world_size=1, global_count=None, accumulation=1):
    """One rank's loss as Trainer.train_step computes it before backward (sd35dist/trainer/loop.py)."""
    part_sum, count = flow_matching_loss_sum_and_count(pred.float(), target, weighting)
    global_count = torch.tensor(float(count if global_count is None else global_count))
    return part_sum * world_size / (global_count * accumulation)


# --- flow matching ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_density_draws_equal_diffusers_for_the_same_generator(scheme):
    ours = sample_timestep_density(scheme, 4096, seeded(7), **DENSITY)
    theirs = compute_density_for_timestep_sampling(scheme, 4096, generator=seeded(7), **DENSITY)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_equals_flow_match_euler_scheduler(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = FlowMatchSchedule.build(num_train_timesteps=1000, shift=shift)
    assert torch.equal(schedule.sigmas, scheduler.sigmas)
    assert torch.equal(schedule.timesteps, scheduler.timesteps)
    from_config = FlowMatchSchedule.from_scheduler_config(dict(scheduler.config))
    assert torch.equal(from_config.sigmas, scheduler.sigmas)


def test_dynamic_shifting_leaves_the_training_table_unshifted_like_the_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    schedule = FlowMatchSchedule.from_scheduler_config(dict(scheduler.config))
    assert torch.equal(schedule.sigmas, scheduler.sigmas)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_equals_the_sd3_example(scheme, dtype):
    data = seeded(0)
    x0 = torch.randn(6, 16, 8, 8, generator=data).to(dtype)
    noise = torch.randn(6, 16, 8, 8, generator=data).to(dtype)
    pred = torch.randn(6, 16, 8, 8, generator=data).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    timesteps_ex, noisy_ex, target_ex, weighting_ex, loss_ex = example_training_step(
        scheme, x0, noise, pred, seeded(11), scheduler
    )

    schedule = FlowMatchSchedule.build(1000, 3.0)
    indices = sample_timestep_indices(scheme, 6, seeded(11), **DENSITY)
    sigmas = schedule.sigmas_at(indices, ndim=x0.ndim, dtype=x0.dtype)
    noisy, target = noisy_input_and_target(x0, noise, schedule.sigmas_at(indices))
    weighting = loss_weighting(scheme, sigmas)
    loss = trainer_loss(pred, target, weighting)

    assert torch.equal(schedule.timesteps_at(indices), timesteps_ex)
    assert torch.equal(noisy, noisy_ex) and noisy.dtype == dtype
    assert torch.equal(target, target_ex)
    assert torch.equal(weighting, weighting_ex)
    assert torch.equal(loss, loss_ex)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loss_weighting_equals_diffusers(scheme):
    sigmas = FlowMatchSchedule.build(1000, 3.0).sigmas.reshape(-1, 1, 1, 1)
    assert torch.equal(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_indices_shapes_and_ranges(scheme):
    schedule = FlowMatchSchedule.build(1000, 3.0)
    indices = sample_timestep_indices(scheme, 512, seeded(3), **DENSITY)
    assert indices.shape == (512,) and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) <= 999
    sigmas = schedule.sigmas_at(indices, ndim=4)
    assert sigmas.shape == (512, 1, 1, 1)
    assert bool((sigmas > 0).all()) and bool((sigmas <= 1).all())
    assert torch.allclose(schedule.timesteps_at(indices), sigmas.flatten() * 1000, rtol=0, atol=1e-4)


def test_schedule_runs_from_pure_noise_down_and_shift_pushes_towards_noise():
    unshifted, shifted = FlowMatchSchedule.build(1000, 1.0), FlowMatchSchedule.build(1000, 3.0)
    assert float(shifted.sigmas[0]) == 1.0 and float(shifted.timesteps[0]) == 1000.0
    assert bool((shifted.sigmas[1:] < shifted.sigmas[:-1]).all())
    assert float(unshifted.sigmas[-1]) == pytest.approx(1e-3)
    assert bool((shifted.sigmas[1:] > unshifted.sigmas[1:]).all())


def test_saturated_draws_are_clamped_to_the_last_index_instead_of_overflowing():
    indices = sample_timestep_indices("logit_normal", 64, seeded(0), logit_mean=40.0, logit_std=1.0, mode_scale=1.29)
    assert bool((indices == 999).all())


def test_draws_depend_only_on_the_generator_and_leave_the_global_rng_alone():
    global_state = torch.random.get_rng_state()
    first = sample_timestep_indices("logit_normal", 32, seeded(5), **DENSITY)
    torch.rand(100)  # global draws in between change nothing
    second = sample_timestep_indices("logit_normal", 32, seeded(5), **DENSITY)
    other = sample_timestep_indices("logit_normal", 32, seeded(6), **DENSITY)
    assert torch.equal(first, second) and not torch.equal(first, other)
    torch.random.set_rng_state(global_state)
    sample_timestep_indices("mode", 32, seeded(5), **DENSITY)
    assert torch.equal(torch.random.get_rng_state(), global_state)


def test_logit_normal_centres_on_the_middle_of_the_unshifted_range():
    u = sample_timestep_density("logit_normal", 100_000, seeded(1), **DENSITY)
    assert float(u.median()) == pytest.approx(0.5, abs=0.01)
    shifted = sample_timestep_density("logit_normal", 100_000, seeded(1), logit_mean=1.0, logit_std=1.0, mode_scale=0)
    assert float(shifted.median()) == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)


def test_mode_sampling_favours_the_middle_and_scale_zero_is_uniform():
    u = sample_timestep_density("mode", 100_000, seeded(2), **DENSITY)
    assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0
    middle = float(((u > 0.25) & (u < 0.75)).float().mean())
    assert middle > 0.6  # a uniform draw would put half there
    flat = sample_timestep_density("mode", 100_000, seeded(2), logit_mean=0, logit_std=1, mode_scale=0.0)
    assert torch.equal(flat, 1 - torch.rand(100_000, generator=seeded(2)))


@pytest.mark.parametrize("scheme", ["uniform", "cosmap", "none"])
def test_uniform_like_schemes_draw_flat(scheme):
    u = sample_timestep_density(scheme, 100_000, seeded(4), **DENSITY)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert bool(((counts - 10_000).abs() < 500).all())


def test_cosmap_weights_the_middle_most():
    sigmas = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    weights = loss_weighting("cosmap", sigmas)
    assert torch.allclose(weights[[0, 2, 4]], torch.tensor([2 / math.pi, 4 / math.pi, 2 / math.pi]))
    assert int(weights.argmax()) == 2
    assert torch.equal(loss_weighting("logit_normal", sigmas), torch.ones(5))


def test_loss_is_zero_when_the_prediction_is_the_target():
    data = seeded(9)
    x0, noise = torch.randn(3, 4, 5, 5, generator=data), torch.randn(3, 4, 5, 5, generator=data)
    sigmas = FlowMatchSchedule.build(1000, 3.0).sigmas_at(torch.tensor([0, 500, 999]))
    _, target = noisy_input_and_target(x0, noise, sigmas)
    weighting = loss_weighting("cosmap", sigmas)
    assert float(trainer_loss(target.clone(), target, weighting)) == 0.0
    assert float(trainer_loss(target + 0.1, target, weighting)) > 0.0


def test_pure_noise_input_at_sigma_one_and_clean_input_at_sigma_zero():
    x0, noise = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    noisy, target = noisy_input_and_target(x0, noise, torch.tensor([1.0, 0.0]))
    assert torch.equal(noisy[0], noise[0]) and torch.equal(noisy[1], x0[1])
    assert torch.equal(target, noise - x0)


def test_uneven_rank_batches_give_the_global_mean_via_sum_and_count():
    data = seeded(12)
    pred, target = torch.randn(5, 4, 3, 3, generator=data), torch.randn(5, 4, 3, 3, generator=data)
    weighting = loss_weighting("cosmap", torch.rand(5, generator=data))
    full = trainer_loss(pred, target, weighting)
    example = torch.mean((weighting.reshape(5, 1, 1, 1) * (pred - target) ** 2).reshape(5, -1), 1).mean()
    assert torch.equal(full, example)

    parts = [slice(0, 3), slice(3, 5)]  # rank 0 holds 3 samples, rank 1 holds 2
    sums_counts = [flow_matching_loss_sum_and_count(pred[p], target[p], weighting[p]) for p in parts]
    total = sum(s for s, _ in sums_counts)
    count = sum(c for _, c in sums_counts)
    assert count == 5
    assert torch.allclose(total / count, full, rtol=1e-6, atol=0)
    # the mean of the two rank means is not the global mean: the reason for sum/count
    rank_means = [trainer_loss(pred[p], target[p], weighting[p]) for p in parts]
    assert not torch.allclose(sum(rank_means) / 2, full, rtol=1e-6, atol=0)
    # each rank backpropagates its share scaled by the world size; DDP/FSDP average the gradients
    shares = [trainer_loss(pred[p], target[p], weighting[p], world_size=2, global_count=5) for p in parts]
    assert torch.allclose(sum(shares) / 2, full, rtol=1e-6, atol=0)


def test_an_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="weighting_scheme 'sigma_sqrt'"):
        loss_weighting("sigma_sqrt", torch.ones(2))  # type: ignore[arg-type]


# --- learning-rate schedules -----------------------------------------------------------

LR_CASES = [
    # (our scheduler name, diffusers name, base_lr, warmup, total, power)
    ("constant", "constant", 5e-5, 0, 40, 1.0),
    ("constant", "constant_with_warmup", 5e-5, 10, 40, 1.0),
    ("linear", "linear", 1e-4, 10, 100, 1.0),
    ("linear", "linear", 3e-4, 0, 37, 1.0),
    ("cosine", "cosine", 5e-5, 0, 50, 1.0),
    ("cosine", "cosine", 1.05e-3, 24, 240, 1.0),
    ("polynomial", "polynomial", 1.05e-3, 24, 240, 1.0),
    ("polynomial", "polynomial", 2e-4, 5, 41, 2.0),
    ("polynomial", "polynomial", 1e-3, 0, 30, 0.5),
]


@pytest.mark.parametrize("ours,theirs,base_lr,warmup,total,power", LR_CASES)
def test_learning_rate_equals_an_optimizer_driven_by_diffusers_get_scheduler(
    ours, theirs, base_lr, warmup, total, power
):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base_lr)
    scheduler = get_scheduler(theirs, optimizer, num_warmup_steps=warmup, num_training_steps=total, power=power)
    for step in range(total + 15):  # past the end too: polynomial holds lr_end, others hold 0
        expected = optimizer.param_groups[0]["lr"]
        got = learning_rate_at(
            step, base_lr=base_lr, scheduler=ours, warmup_steps=warmup, total_steps=total, power=power
        )
        assert got == expected, (step, got, expected)
        optimizer.step()
        scheduler.step()


def test_the_factor_drives_lambda_lr_to_the_same_values():
    kwargs = {"base_lr": 1e-4, "scheduler": "cosine", "warmup_steps": 5, "total_steps": 30}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: learning_rate_factor_at(s, **kwargs))
    for step in range(35):
        assert optimizer.param_groups[0]["lr"] == learning_rate_at(step, **kwargs)
        optimizer.step()
        lambda_lr.step()


def test_schedule_shapes_a_user_expects():
    common = {"base_lr": 1e-4, "warmup_steps": 10, "total_steps": 110}
    assert learning_rate_at(0, scheduler="cosine", **common) == 0.0  # warmup starts at 0, as in diffusers
    assert learning_rate_at(5, scheduler="linear", **common) == pytest.approx(5e-5)
    assert learning_rate_at(10, scheduler="cosine", **common) == pytest.approx(1e-4)
    assert learning_rate_at(60, scheduler="cosine", **common) == pytest.approx(5e-5)
    assert learning_rate_at(110, scheduler="cosine", **common) == pytest.approx(0.0, abs=1e-20)
    assert learning_rate_at(500, scheduler="polynomial", **common) == pytest.approx(1e-7)
    assert learning_rate_at(500, scheduler="constant", **common) == 1e-4
    assert learning_rate_at(3, scheduler="constant", base_lr=1e-4, warmup_steps=0, total_steps=1) == 1e-4


def test_bad_schedule_settings_are_refused():
    with pytest.raises(ValueError, match="lr_scheduler 'cosine_with_restarts'"):
        learning_rate_at(0, base_lr=1e-4, scheduler="cosine_with_restarts", warmup_steps=0, total_steps=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr_end"):
        learning_rate_at(0, base_lr=1e-8, scheduler="polynomial", warmup_steps=0, total_steps=10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        learning_rate_at(-1, base_lr=1e-4, scheduler="linear", warmup_steps=0, total_steps=10)


# --- step counts -----------------------------------------------------------------------


@pytest.mark.parametrize("samples,world,batch,accum", [(100, 2, 4, 4), (2380, 4, 6, 2), (7, 8, 1, 3), (1000, 3, 5, 1)])
@pytest.mark.parametrize("shards", [1, 3])
def test_steps_per_epoch_match_a_distributed_dataloader_and_the_examples_ceil(samples, world, batch, accum, shards):
    """With one bucket the trainer's epoch is the examples' epoch: a short last batch and a short
    last accumulation window each still count as a step."""
    loader = DataLoader(
        range(samples),
        batch_size=batch,
        sampler=DistributedSampler(range(samples), num_replicas=world, rank=0, shuffle=False),
    )
    sizes = [samples // shards] * (shards - 1) + [samples - samples // shards * (shards - 1)]
    layouts = bucket_layouts([("1024x1024", n) for n in sizes])
    for seed in (0, 1):
        steps = optimizer_steps_per_epoch(layouts, world, batch, seed, accum)
        assert steps == math.ceil(len(loader) / accum)


def test_a_final_partial_accumulation_window_counts_as_a_step():
    layouts = bucket_layouts([("1024x1024", 100)])
    # 2 ranks × 4: 13 micro-steps (12 full windows of 8 samples, then 4) in windows of 4, 4, 4 and 1
    assert optimizer_steps_per_epoch(layouts, 2, 4, 0, 4) == 4
    assert optimizer_steps_per_epoch(layouts, 2, 4, 0, 1) == 13
