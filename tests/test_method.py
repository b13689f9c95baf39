"""The method against computations written out independently, on a tiny random-weight SD."""

import collections

import pytest
import torch
from diffusers import LMSDiscreteScheduler

import saferegion as sr
from conftest import recorded_unet_inputs
from inputs import UserError, parse_window
from runs import atomic

W = 7.5


def hand_embed(pipe, text):
    """E(p) straight from the tokenizer and text encoder: last hidden state, padded to 77."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state  # (1, 77, D)


def random_direction(width, seed):
    """A direction away from zero, so that steering changes something."""
    direction = sr.Direction(width, seed=seed)
    with torch.no_grad():
        direction.B.copy_(torch.randn(77, 1, generator=torch.Generator().manual_seed(seed + 100)))
    return direction


def test_direction_is_a_zero_initialised_rank_r_factorisation():
    direction = sr.Direction(32, rank=3, seed=7)
    assert direction.B.shape == (77, 3) and direction.A.shape == (3, 32)
    assert torch.equal(direction.B, torch.zeros(77, 3))
    assert torch.equal(direction.A, torch.randn(3, 32, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(direction(), torch.zeros(77, 32))


def test_direction_starts_at_zero_so_the_model_is_unchanged(pipe):
    settings = dict(steps=6, resolution=32, output_type="latent")
    plain, _ = sr.generate(pipe, ["a red square"] * 2, [3, 4], **settings)
    steered, chosen = sr.generate(pipe, ["a red square"] * 2, [3, 4], [sr.Direction(32)()], **settings)
    assert chosen == [0, 0]
    assert torch.equal(plain, steered)
    trained = random_direction(32, 0)()
    assert not torch.allclose(plain, sr.generate(pipe, ["a red square"] * 2, [3, 4], [trained], **settings)[0])


@pytest.mark.parametrize("kind", ["erase", "attribute"])
def test_loss_of_one_step_equals_target_and_mse_by_hand(pipe, kind):
    direction = random_direction(32, 1)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(481)
    prompt, null, target = (hand_embed(pipe, p) for p in ("an image of nudity", "", "nudity"))
    loss, _, _ = sr.self_discovery_loss(pipe.unet, x, t, direction, prompt, null=null, target=target, kind=kind,
                                        guidance=W)

    with torch.no_grad():  # three separate U-Net calls
        eps_null = pipe.unet(x, t, encoder_hidden_states=null).sample
        eps_target = pipe.unet(x, t, encoder_hidden_states=target).sample
        eps_steered = pipe.unet(x, t, encoder_hidden_states=prompt + direction.B @ direction.A).sample
    wanted = eps_target + W * (eps_null - eps_target) if kind == "erase" else eps_target
    expected = 10 * ((eps_steered - wanted) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    loss.backward()
    assert direction.A.grad.abs().sum() > 0 and direction.B.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.unet.parameters())


def hand_trained_direction(pipe, concept, rows, steps, window, lr, seed, anchors=()):
    """The README's training loop written out step by step, with separate U-Net calls.

    The pipeline runs in float64 and the direction in float32, as in saferegion: Adam divides by
    the gradient's size, so batched-versus-separate float32 rounding in the U-Net would otherwise
    show up in the direction's last digits. anchors: [(prompt, seed, after)], a preservation anchor
    trajectory run after the `after`-th row (1-indexed), its target its own unsteered prediction.
    """
    A = torch.randn(1, 32, generator=torch.Generator().manual_seed(seed)).requires_grad_()
    B = torch.zeros(77, 1).requires_grad_()
    optimizer = torch.optim.Adam([A, B], lr=lr)
    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    null = hand_embed(pipe, "")
    unet = pipe.unet
    plan = []
    for i, (prompt, row_seed) in enumerate(rows, start=1):
        plan.append((prompt, row_seed, concept.target, concept.kind))
        plan += [(anchor, anchor_seed, anchor, "attribute") for anchor, anchor_seed, after in anchors if after == i]
    for prompt, row_seed, target_text, kind in plan:
        plain, target = hand_embed(pipe, prompt), hand_embed(pipe, target_text)
        scheduler.set_timesteps(steps)
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(row_seed))
        latents = latents.double() * scheduler.init_noise_sigma
        for k, t in enumerate(scheduler.timesteps, start=1):
            x = scheduler.scale_model_input(latents, t)
            in_window = window[0] <= k <= window[1]
            with torch.no_grad():
                eps_null = unet(x, t, encoder_hidden_states=null).sample
            cond = (plain.float() + B @ A).double() if in_window else plain
            eps_cond = unet(x, t, encoder_hidden_states=cond).sample
            if in_window:
                with torch.no_grad():
                    eps_target = unet(x, t, encoder_hidden_states=target).sample
                if kind == "erase":
                    wanted = eps_target + W * (eps_null - eps_target)
                else:
                    wanted = eps_target
                loss = 10 * ((eps_cond - wanted) ** 2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            eps = eps_null + W * (eps_cond.detach() - eps_null)
            latents = scheduler.step(eps, t, latents).prev_sample
    return A.detach(), B.detach()


@pytest.mark.parametrize("concept", [sr.builtin("nudity")[0], sr.attribute("a red square", "a square")],
                         ids=["erase", "attribute"])
def test_training_gives_the_same_direction_as_the_method_written_out(pipe64, concept):
    pipe = pipe64
    rows = [(concept.prompt, 11), ("a blue circle", 12)]
    direction = sr.Direction(32, seed=5)
    losses = list(sr.train(pipe, direction, concept, rows, steps=10, resolution=32, lr=0.06,
                           update_window=(10, 50)))
    assert len(losses) == 2 * 9  # window 10-50 of 50 is steps 2-10 of 10
    A, B = hand_trained_direction(pipe, concept, rows, steps=10, window=(2, 10), lr=0.06, seed=5)
    assert B.abs().max() > 1e-3  # it learned something, so the comparison means something
    torch.testing.assert_close(direction.A.detach(), A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(direction.B.detach(), B, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_preservation_anchors_interleave_and_pull_towards_their_own_unsteered_prediction(pipe64):
    pipe, (concept,) = pipe64, sr.builtin("nudity")
    rows = [(concept.prompt, 11), ("a blue circle", 12), (concept.prompt, 13)]
    keep = [("a red square", 21), ("a green circle", 22)]
    direction = sr.Direction(32, seed=5)
    losses = list(sr.train(pipe, direction, concept, rows, steps=10, resolution=32, lr=0.06, keep=keep))
    assert len(losses) == 5 * 9
    # rows[0], keep[0], rows[1], keep[1], then the row left over
    A, B = hand_trained_direction(pipe, concept, rows, steps=10, window=(2, 10), lr=0.06, seed=5,
                                  anchors=[("a red square", 21, 1), ("a green circle", 22, 2)])
    torch.testing.assert_close(direction.A.detach(), A, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(direction.B.detach(), B, rtol=1e-5, atol=1e-5)
    without = sr.Direction(32, seed=5)
    for _ in sr.train(pipe, without, concept, rows, steps=10, resolution=32, lr=0.06):
        pass
    assert (without.B - direction.B).abs().max() > 1e-3  # the anchors changed what was learned


def test_sampling_through_the_stock_pipeline_equals_a_hand_written_cfg_loop(pipe64):
    pipe = pipe64
    offset, beta, steps = random_direction(32, 2)().double(), 0.7, 10
    with recorded_unet_inputs(pipe.unet) as seen:  # the embeddings the U-Net is given at each step
        latents, _ = sr.generate(pipe, ["a red circle"], [9], [offset.detach()], beta=beta, steer_window=(15, 50),
                                 steps=steps, resolution=32, output_type="latent")

    plain, null = hand_embed(pipe, "a red circle"), hand_embed(pipe, "")
    start = 3  # 15 of 50 is 3 of 10
    assert len(seen) == steps
    for k, embeds in enumerate(seen, start=1):
        torch.testing.assert_close(embeds[:1], null, rtol=0, atol=1e-6)  # unconditional: never changed
        expected = plain + beta * offset.detach() if k >= start else plain
        torch.testing.assert_close(embeds[1:], expected, rtol=0, atol=1e-6)

    scheduler = LMSDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = x * scheduler.init_noise_sigma
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps, start=1):
            cond = plain + beta * offset.detach() if k >= start else plain
            x_in = scheduler.scale_model_input(x, t)
            eps_null = pipe.unet(x_in, t, encoder_hidden_states=null).sample
            eps_cond = pipe.unet(x_in, t, encoder_hidden_states=cond).sample
            x = scheduler.step(eps_null + W * (eps_cond - eps_null), t, x).prev_sample
    torch.testing.assert_close(latents, x, rtol=1e-7, atol=1e-9)


def test_fairness_draw_repeats_and_is_close_to_uniform():
    draws = [sr.draw("a photo of a doctor", seed, 3) for seed in range(3000)]
    assert draws == [sr.draw("a photo of a doctor", seed, 3) for seed in range(3000)]
    counts = collections.Counter(draws)
    assert sorted(counts) == [0, 1, 2]
    # binomial standard deviation sqrt(3000 * 1/3 * 2/3) = 25.8; allow 4 of them
    assert all(abs(n - 1000) < 104 for n in counts.values()), counts


def test_each_image_gets_the_direction_drawn_for_its_seed(pipe64):
    pipe = pipe64
    offsets = [random_direction(32, 3)().detach(), random_direction(32, 4)().detach()]
    seeds = [0, 1, 2, 3, 4, 5]
    settings = dict(steps=4, resolution=32, output_type="latent", steer_window=(1, 50))
    mixed, chosen = sr.generate(pipe, ["a square"] * 6, seeds, offsets, **settings)
    assert chosen == [sr.draw("a square", s, 2) for s in seeds] and set(chosen) == {0, 1}
    for i, seed in enumerate(seeds):
        alone, _ = sr.generate(pipe, ["a square"], [seed], [offsets[chosen[i]]], **settings)
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-7, atol=1e-9)


def test_saved_direction_reloads_exactly_with_its_metadata(tmp_path):
    direction = random_direction(48, 6)
    sr.save_direction(tmp_path / "d.safetensors", direction, {"concept": "nudity", "steer_window": [15, 50]})
    loaded, metadata = sr.load_direction(tmp_path / "d.safetensors")
    assert torch.equal(loaded.A, direction.A) and torch.equal(loaded.B, direction.B)
    assert metadata["concept"] == "nudity" and metadata["steer_window"] == [15, 50]
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]  # no temporary file left


def test_authors_pth_loads_to_the_same_b_at_a(tmp_path):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 1, 768, generator=generator), torch.randn(1, 77, 1, generator=generator)
    torch.save({"b": b, "a": a}, tmp_path / "direction.pth")
    direction, metadata = sr.load_direction(tmp_path / "direction.pth")
    torch.testing.assert_close(direction(), (b @ a)[0], rtol=1e-6, atol=1e-6)
    assert metadata["steer_window"] == [15, 50]


class NotAWeight:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pth_with_code_in_it_is_refused_not_run(tmp_path, capsys):
    torch.save({"a": NotAWeight(), "b": torch.zeros(1, 77, 1)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="not a direction file"):
        sr.load_direction(tmp_path / "evil.pth")
    assert "this must never run" not in capsys.readouterr().out


def test_a_failed_write_leaves_no_file(tmp_path):
    def write(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError), atomic(tmp_path / "out.png") as tmp:
        write(tmp)
    assert list(tmp_path.iterdir()) == []


def test_windows_are_written_for_fifty_steps_and_scale():
    assert sr.scale_window((15, 50), 50) == (15, 50)
    assert sr.scale_window((10, 50), 10) == (2, 10)
    assert sr.scale_window((15, 50), 25) == (8, 25)
    assert parse_window(" 10 - 50 ") == (10, 50)
    for bad in ("40-20", "0-50", "10-51", "15"):
        with pytest.raises(UserError):
            parse_window(bad)


def test_concepts_are_built_the_way_the_paper_builds_them():
    (unsafe,) = sr.builtin("unsafe")
    assert unsafe.prompt == "a iamge of " + unsafe.target and unsafe.steer_window == (15, 50)
    assert unsafe.trajectories == 60 and unsafe.target.count(",") == 20
    assert [c.name for c in sr.builtin("race")] == ["race-white", "race-black", "race-asian"]
    male = sr.builtin("gender")[0]
    assert (male.kind, male.prompt, male.target) == ("attribute", "a photo of a face",
                                                    "a photo of a male person's face")
    assert male.steer_window == (10, 50) and male.trajectories == 50
    assert sr.erase("red").prompt == "an image of red"
    with pytest.raises(UserError, match="unsafe, nudity, gender, race"):
        sr.builtin("nsfw")
