"""bench.py's release-equivalent cost model and U-Net call counter, on the tiny pipeline."""

import pytest
import torch

import bench
import saferegion as sr

CONCEPT = sr.builtin("nudity")[0]
ROWS = [(CONCEPT.prompt, 11)]
STEPS, START = 6, 2  # the training window 10-50 of 50 is steps 2-6 of 6


def trained(train, pipe):
    direction = sr.Direction(32, seed=5)
    losses = list(train(pipe, direction, CONCEPT, ROWS, steps=STEPS, resolution=32))
    return direction, losses


def test_fast_training_learns_the_same_direction_as_the_release_cost_model(pipe64):
    fast, fast_losses = trained(sr.train, pipe64)
    release, release_losses = trained(bench.release_train, pipe64)
    assert len(fast_losses) == len(release_losses) == STEPS - START + 1
    assert fast.B.abs().max() > 1e-3  # it learned something, so the comparison means something
    torch.testing.assert_close(release.A.detach(), fast.A.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(release.B.detach(), fast.B.detach(), rtol=1e-5, atol=1e-5)
    assert release_losses == pytest.approx(fast_losses, rel=1e-6)


def test_release_cost_model_fills_a_gradient_for_every_unet_weight_then_frees_them(pipe):
    steps = bench.training_steps(bench.release_train, pipe, resolution=32)
    next(steps)
    weights = list(pipe.unet.parameters())
    assert all(p.requires_grad and p.grad is not None for p in weights)
    assert sum(p.grad.abs().sum() for p in weights) > 0
    steps.close()
    assert not any(p.requires_grad or p.grad is not None for p in weights)  # frozen again, as it was


@pytest.mark.parametrize("train, in_window", [
    # saferegion.train: one no-grad pair (E(""), E(c_u)), then E(p) + d alone with a gradient
    (sr.train, [2, 1]),
    # the release: the CFG pair (E(""), E(p) + d) with gradients, then the no-grad pair (E(""), E(c_u))
    (bench.release_train, [2, 2]),
], ids=["fast", "release"])
def test_unet_calls_and_images_are_counted_as_the_method_makes_them(pipe, train, in_window):
    with bench.UNetCalls(pipe.unet) as calls:
        trained(train, pipe)
    before_window = [2] * (START - 1)  # one plain CFG pair (E(""), E(p)) per step, nothing to learn
    assert calls.batches == before_window + in_window * (STEPS - START + 1)
    assert bench.calls_per_step(train, pipe, resolution=32) == in_window


def test_counter_stops_counting_when_its_block_ends(pipe):
    x, t = torch.zeros(3, 4, 4, 4), torch.tensor(1)
    embeds = torch.zeros(3, 77, 32)
    with torch.no_grad(), bench.UNetCalls(pipe.unet) as calls:
        pipe.unet(x, t, encoder_hidden_states=embeds)
    with torch.no_grad():
        pipe.unet(x, t, encoder_hidden_states=embeds)
    assert calls.batches == [3]
