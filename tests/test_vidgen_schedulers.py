"""vidgen.schedulers against their formulas."""
import math

import pytest
import torch

from vidgen.schedulers import DDPMScheduler, FlowMatchingScheduler
from vidgen.models.vae import LatentVAE


def _video(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, 2, 5, 6, generator=g, dtype=torch.float64), torch.randn(B, 4, 2, 5, 6, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------- flow matching
def test_flow_add_noise_and_target():
    x0, noise = _video()
    s = FlowMatchingScheduler()
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    xt = s.add_noise(x0, noise, t)
    for i in range(3):
        torch.testing.assert_close(xt[i], (1 - t[i]) * x0[i] + t[i] * noise[i])
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    v = s.velocity_target(x0, noise)
    torch.testing.assert_close(v, noise - x0)
    # d x_t / dt = v, and x0 is recovered from (x_t, v)
    torch.testing.assert_close(s.predict_x0(v, t, xt), x0)


def test_flow_per_frame_t():
    x0, noise = _video(B=2)
    t = torch.rand(2, 4, dtype=torch.float64)
    xt = FlowMatchingScheduler().add_noise(x0, noise, t)
    torch.testing.assert_close(xt[1, 2], (1 - t[1, 2]) * x0[1, 2] + t[1, 2] * noise[1, 2])


def test_flow_euler_with_exact_velocity_is_exact():
    """A straight path: Euler with the true velocity lands on x0 from pure noise, any steps/shift."""
    x0, noise = _video()
    for shift in (1.0, 3.0):
        s = FlowMatchingScheduler(num_inference_steps=7, shift=shift)
        ts = s.timesteps()
        assert ts.shape == (8,) and ts[0] == 1 and ts[-1] == 0
        assert torch.all(ts[1:] < ts[:-1])
        x = noise.clone()
        for i in range(7):
            x = s.step(noise - x0, ts[i], ts[i + 1], x)
        torch.testing.assert_close(x, x0)


def test_flow_shift_formula():
    s = FlowMatchingScheduler(shift=3.0)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(s.shift_t(t), 3 * t / (1 + 2 * t))
    assert torch.all(s.shift_t(t) >= t)
    torch.testing.assert_close(FlowMatchingScheduler().shift_t(t), t)
    with pytest.raises(ValueError):
        FlowMatchingScheduler(shift=0)


# ------------------------------------------------------------------------------------------ DDPM
def test_ddpm_linear_betas():
    s = DDPMScheduler(1000, "linear", 1e-4, 0.02)
    torch.testing.assert_close(s.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))


def test_ddpm_cosine_schedule_values():
    s = DDPMScheduler(1000, "cosine")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert abs(s.alphas_cumprod[t].item() - f(t + 1) / f(0)) < 1e-9
    assert s.betas.max() <= 0.999
    with pytest.raises(ValueError):
        DDPMScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError):
        DDPMScheduler(prediction_type="sample")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_add_noise_and_prediction_identities(pred):
    x0, noise = _video()
    s = DDPMScheduler(1000, "cosine", prediction_type=pred)
    t = torch.tensor([0, 400, 999])
    xt = s.add_noise(x0, noise, t)
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    target = s.target(x0, noise, t)
    if pred == "v_prediction":
        torch.testing.assert_close(target, ab.sqrt() * noise - (1 - ab).sqrt() * x0)
        # v-prediction identities: x0 = sqrt(ab) x_t - sqrt(1-ab) v ; eps = sqrt(1-ab) x_t + sqrt(ab) v
        torch.testing.assert_close(ab.sqrt() * xt - (1 - ab).sqrt() * target, x0)
        torch.testing.assert_close((1 - ab).sqrt() * xt + ab.sqrt() * target, noise)
    x0_hat, eps_hat = s.pred_x0_eps(target, t, xt)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_round_trip(pred):
    """DDIM with the oracle model output stays on the x0/noise line and ends at x0."""
    x0, noise = _video()
    s = DDPMScheduler(1000, "linear", prediction_type=pred)
    ts = s.timesteps(10)
    assert ts.tolist() == list(range(900, -1, -100))
    x = s.add_noise(x0, noise, ts[0].expand(3))
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else torch.tensor(-1)
        out = s.target(x0, noise, t.expand(3))
        x = s.ddim_step(out, t.expand(3), t_prev.expand(3), x)
        if t_prev >= 0:
            torch.testing.assert_close(x, s.add_noise(x0, noise, t_prev.expand(3)))
    torch.testing.assert_close(x, x0)


def test_ddpm_ancestral_step_posterior():
    x0, noise = _video()
    s = DDPMScheduler(1000, "linear")
    t = torch.tensor([500, 500, 500])
    xt = s.add_noise(x0, noise, t)
    g = torch.Generator().manual_seed(1)
    out = s.ddpm_step(noise, t, xt, generator=g)
    z = torch.randn(xt.shape, generator=torch.Generator().manual_seed(1), dtype=xt.dtype)
    b, a = s.betas[500], s.alphas[500]
    ab, ab_prev = s.alphas_cumprod[500], s.alphas_cumprod[499]
    mean = ab_prev.sqrt() * b / (1 - ab) * x0 + a.sqrt() * (1 - ab_prev) / (1 - ab) * xt
    var = (1 - ab_prev) / (1 - ab) * b
    torch.testing.assert_close(out, mean + var.sqrt() * z)
    # last step: no noise, returns the predicted x0
    t0 = torch.zeros(3, dtype=torch.long)
    x1 = s.add_noise(x0, noise, t0)
    torch.testing.assert_close(s.ddpm_step(noise, t0, x1, generator=g), x0)


def test_min_snr_weights():
    s = DDPMScheduler(1000, "linear")
    t = torch.tensor([0, 100, 999])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    torch.testing.assert_close(s.min_snr_weights(t, 5.0), (snr.clamp(max=5) / snr).float())
    sv = DDPMScheduler(1000, "linear", prediction_type="v_prediction")
    torch.testing.assert_close(sv.min_snr_weights(t, 5.0), (snr.clamp(max=5) / (snr + 1)).float())
    assert s.min_snr_weights(t)[-1] == 1.0  # low SNR: weight 1 for epsilon


@pytest.mark.parametrize("gamma", [0, -1.0, float("nan"), float("inf")])
def test_min_snr_weights_gamma_must_be_finite_and_positive(gamma):
    """gamma <= 0 gave zero / negative weights and NaN gave NaN weights, without an error."""
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        DDPMScheduler().min_snr_weights(torch.tensor([1, 500]), gamma=gamma)


def test_ddpm_trailing_spacing_starts_at_the_noisiest_step():
    """``timestep_spacing="trailing"`` (diffusers' values): every schedule starts at N - 1, so a
    one-step DDIM starts from pure noise; "leading" (the default) keeps DDIM's 0, r, 2r, ..."""
    s = DDPMScheduler(1000, "linear", timestep_spacing="trailing")
    assert s.timesteps(1).tolist() == [999]
    assert s.timesteps(2).tolist() == [999, 499]
    assert s.timesteps(3).tolist() == [999, 666, 332]
    assert s.timesteps(1000).tolist() == list(range(999, -1, -1))
    assert DDPMScheduler(1000).timesteps(2).tolist() == [500, 0]
    x0, noise = _video()
    t = s.timesteps(1)
    out = s.target(x0, noise, t.expand(3))  # the oracle model output at the first step
    x = s.ddim_step(out, t.expand(3), torch.tensor(-1).expand(3), s.add_noise(x0, noise, t.expand(3)))
    torch.testing.assert_close(x, x0)
    with pytest.raises(ValueError, match="timestep_spacing must be 'leading' or 'trailing'"):
        DDPMScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match=r"num_inference_steps must be an int in \[1, 1000\], got 0"):
        s.timesteps(0)


def test_flow_zero_steps_and_dtypes():
    """``timesteps(0)`` raises (0 used to mean "the default count", and ``generate_video`` then
    returned the initial noise); ``step`` / ``predict_x0`` keep an fp16 ``x_t``'s dtype for
    ``[B]`` and per-frame ``[B, T]`` times (they promoted it to fp32; scalars kept it)."""
    s = FlowMatchingScheduler(4)
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1, got 0"):
        s.timesteps(0)
    assert len(s.timesteps()) == 5
    x = torch.randn(2, 3, 4, 2, 2, dtype=torch.float16)
    v = torch.randn_like(x)
    for t, tn in ((torch.tensor(0.9), torch.tensor(0.7)), (torch.tensor([1.0, 0.8]), torch.tensor([0.9, 0.7])),
                  (0.5 + torch.rand(2, 3) / 2, torch.rand(2, 3) / 2)):
        assert s.step(v, t, tn, x).dtype == torch.float16
        assert s.predict_x0(v, t, x).dtype == torch.float16
    # the step size is taken in the times' precision: t = 0.98 -> 0.96 is not rounded to fp16 first
    t, tn = torch.tensor(0.98), torch.tensor(0.96)
    x32 = torch.zeros(1, 1, 1, 1, 1)
    got = s.step(torch.ones(1, 1, 1, 1, 1, dtype=torch.float16), t, tn, x32.half())
    assert got.item() == torch.tensor(-0.02).half().item()


def test_ddpm_trailing_spacing_has_n_steps_for_every_n():
    """``timesteps(n)`` with trailing spacing returns exactly n distinct decreasing steps from
    N - 1 down to >= 0 for every n (a float arange gave n + 1 ending at -1 for 62 values of n,
    e.g. n = 61)."""
    s = DDPMScheduler(1000, "linear", timestep_spacing="trailing")
    for n in range(1, 1001):
        ts = s.timesteps(n)
        assert ts.numel() == n and ts[0] == 999 and ts[-1] >= 0, n
        assert (ts[:-1] > ts[1:]).all(), n


def test_ddpm_rejects_non_integer_or_out_of_range_steps():
    """DDPM timesteps are integer steps: a float t was truncated (0.9 -> 0), NaN read as the
    clean sample, -1 wrapped to step 999 in snr(), t >= N gave an IndexError."""
    s = DDPMScheduler(1000)
    x = torch.randn(2, 3)
    for bad in (torch.tensor([0.9, 1.0]), torch.tensor([float("nan"), 1.0]), torch.tensor([True, False])):
        with pytest.raises(TypeError, match="integer steps"):
            s.add_noise(x, x, bad)
    with pytest.raises(ValueError, match=r"\[-1, 999\]"):
        s.add_noise(x, x, torch.tensor([5, 1000]))
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        s.snr(torch.tensor([-1]))
    torch.testing.assert_close(s.add_noise(x, torch.zeros_like(x), torch.tensor([-1, -1])), x)


def test_flow_matching_t_must_match_the_batch_and_shift_be_finite():
    """A ``t`` whose length matches no leading dim of x raises naming t (it broadcast into a
    [3, 3, ...] result at B = 1); shift NaN / inf raise (every timestep was NaN)."""
    s = FlowMatchingScheduler()
    x = torch.randn(1, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="t must be"):
        s.add_noise(x, x, torch.rand(3))
    assert s.add_noise(x, x, torch.rand(1, 3)).shape == x.shape  # per-frame [B, T]
    assert s.add_noise(x, x, torch.rand(1)).shape == x.shape
    for bad in (float("nan"), float("inf"), 0.0, True):
        with pytest.raises(ValueError, match="shift"):
            FlowMatchingScheduler(shift=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_low_precision_steps_near_zero_stay_finite_and_accurate(dtype, pred, monkeypatch):
    """Coefficients come from abar in float64 and meet x only at the end: abar rounded to
    fp16 / bf16 first is 1 near t = 0, which made ``ddpm_step`` 0 / 0 (an ancestral sampling loop
    ended all NaN), ``add_noise`` add no noise and ``ddim_step`` lose its accuracy."""
    s = DDPMScheduler(1000, "linear", prediction_type=pred)
    x0, noise = _video()
    out_model = torch.randn_like(x0)
    z = torch.randn(x0.shape, dtype=torch.float64)  # the step's noise, the same in every dtype
    monkeypatch.setattr(torch, "randn", lambda shape, generator=None, device=None, dtype=None:
                        z.to(dtype).reshape(shape))
    for step in (0, 1, 3, 5, 10):
        t = torch.full((3,), step)
        xt64 = s.add_noise(x0.double(), noise.double(), t)
        xt = xt64.to(dtype)
        for name, fn in (("ddpm", lambda x, m: s.ddpm_step(m, t, x)),
                         ("ddim", lambda x, m: s.ddim_step(m, t, t - 1, x))):
            want = fn(xt.double(), out_model.to(dtype).double())
            got = fn(xt, out_model.to(dtype))
            assert got.dtype == dtype and torch.isfinite(got).all(), (name, step)
            # vs the fp64 step from the same rounded inputs: the error of one rounding of the
            # result (measured <= 1.25 eps of the largest value) plus that of the coefficients, not O(1)
            err = (got.double() - want).abs().max().item()
            assert err <= 4 * torch.finfo(dtype).eps * want.abs().max().item(), (name, step, err)
    # add_noise at t = 0 adds sqrt(1 - abar_0) = 1e-2 of noise also in bf16 / fp16
    t0 = torch.zeros(3, dtype=torch.long)
    diff = s.add_noise(x0.to(dtype), noise.to(dtype), t0).double() - x0.to(dtype).double()
    assert diff.abs().max() > 1e-3


def test_schedulers_check_their_arguments_where_they_are_built():
    for kwargs, msg in (({"num_train_timesteps": 0}, "num_train_timesteps must be an int >= 1, got 0"),
                        ({"num_train_timesteps": 2.5}, "num_train_timesteps must be an int >= 1"),
                        ({"beta_end": 1.5}, r"beta_end must be a number in \(0, 1\), got 1.5"),
                        ({"beta_start": -1e-4}, "beta_start must be a number in"),
                        ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start must be <= beta_end")):
        with pytest.raises(ValueError, match=msg):
            DDPMScheduler(**kwargs)
    DDPMScheduler(10, "cosine", beta_end=5.0)  # the cosine schedule takes no betas
    for n in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
            FlowMatchingScheduler(num_inference_steps=n)
    s = DDPMScheduler(1000)
    x = torch.randn(1, 4)
    with pytest.raises(ValueError, match=r"t must be steps in \[0, 999\], got tensor\(-1\)"):
        s.ddpm_step(x, -1, x)
    for step in (s.ddpm_step, lambda m, t, x, t_prev: s.ddim_step(m, t, t_prev, x)):
        with pytest.raises(ValueError, match=r"t_prev must be < t .*t=\[5\] and t_prev=\[7\]"):
            step(x, torch.tensor([5]), x, torch.tensor([7]))


def test_ddpm_steps_mix_per_video_and_per_frame_times():
    """A per-video ``t [B]`` with a per-frame ``t_prev [B, T]`` lines up on the leading dims (the
    order check once broadcast them on the trailing dims: a crash, or wrong pairs when B == T);
    numpy scalars are sizes and betas as Python numbers are."""
    import numpy as np
    s = DDPMScheduler(100)
    x = torch.randn(2, 2, 3, 4, 4)
    t, t_prev = torch.tensor([10, 20]), torch.tensor([[9, 9], [19, 19]])
    assert s.ddim_step(torch.randn_like(x), t, t_prev, x).shape == x.shape
    for i in range(2):  # each video: its own t, its frames' own t_prev
        mo = torch.ones_like(x[i:i + 1])
        torch.testing.assert_close(s.ddim_step(torch.ones_like(x), t, t_prev, x)[i:i + 1],
                                   s.ddim_step(mo, t[i:i + 1], t_prev[i:i + 1], x[i:i + 1]))
    assert s.ddpm_step(torch.randn_like(x), t, x, t_prev).shape == x.shape
    with pytest.raises(ValueError, match="t_prev must be < t"):
        s.ddim_step(x, t, torch.tensor([[9, 10], [19, 19]]), x)
    s2 = DDPMScheduler(np.int64(1000), beta_start=np.float32(1e-4), beta_end=torch.tensor(0.02))
    torch.testing.assert_close(s2.alphas_cumprod, DDPMScheduler(1000).alphas_cumprod)
    assert FlowMatchingScheduler(np.int64(3)).timesteps().shape == (4,)


def test_flow_matching_checks_times_without_a_device_sync():
    """Times outside [0, 1] (t=500, a DDPM-style step) and NaN raise naming the argument, for
    Python numbers and CPU tensors, as DDPMScheduler checks its steps (they were accepted: x_t
    extrapolated past the noise, NaN videos). A step may go either way: t_next < t samples,
    t_next > t inverts (data towards noise: RF-inversion, FlowEdit). Compiled code is not
    checked (a data-dependent check would not trace under fullgraph=True)."""
    s = FlowMatchingScheduler()
    x = torch.randn(2, 3, 2, 4, 4)
    for bad in (500, 1.5, -0.1, float("nan"), float("inf"), torch.tensor([0.5, 500.0]),
                torch.tensor(500), torch.tensor([[0.2, float("nan"), 0.1], [0.0, 1.0, 0.3]]),
                [0.3, 1.2]):
        with pytest.raises(ValueError, match=r"FlowMatchingScheduler: t must be finite times in \[0, 1\]"):
            s.add_noise(x, x, bad)
        with pytest.raises(ValueError, match=r"t must be finite times in \[0, 1\]"):
            s.predict_x0(x, bad, x)
        with pytest.raises(ValueError, match=r"t must be finite times in \[0, 1\]"):
            s.step(x, bad, 0.0, x)
        with pytest.raises(ValueError, match=r"t_next must be finite times in \[0, 1\]"):
            s.step(x, 1.0, bad, x)
    for bad in (True, torch.tensor([True, False])):
        with pytest.raises((ValueError, TypeError), match="t must be"):
            s.add_noise(x, x, bad)
    # either direction (inversion: 0.2 -> 0.8), per-video t with per-frame t_next, integer 0 / 1
    torch.testing.assert_close(s.step(x, torch.tensor(0.2), torch.tensor(0.8), x), 1.6 * x)
    assert s.step(x, torch.tensor([0.5, 0.9]), torch.tensor([[0.4, 0.6, 0.0], [0.9, 1.0, 0.0]]), x).shape == x.shape
    torch.testing.assert_close(s.step(x, 0, 0, x), x)
    torch.testing.assert_close(s.add_noise(x, torch.zeros_like(x), torch.tensor([0, 1])), torch.cat([x[:1], 0 * x[1:]]))
    # the sampling schedule stays in [0, 1] for every shift (shift_t(1) rounded to 1.0000001);
    # shift_t takes numbers as it did
    for shift in (0.01, 0.5066451229421713, 1.0, 3.0, 8.35713267064376):
        ts = s.timesteps(7) if shift == 1.0 else FlowMatchingScheduler(7, shift=shift).timesteps()
        assert ts[0] == 1 and ts[-1] == 0 and bool((ts[1:] <= ts[:-1]).all()), shift
        for i in range(7):
            x = s.step(torch.zeros_like(x), ts[i], ts[i + 1], x)
        assert 0 <= FlowMatchingScheduler(shift=shift).shift_t(1.0) <= 1
    assert FlowMatchingScheduler(shift=3.0).shift_t(0.5) == 0.75
    # compiled with CPU-tensor times (the checks are data-dependent: skipped while tracing)
    torch._dynamo.reset()
    f = torch.compile(lambda x, t, tn: s.step(s.add_noise(x, x, t), t, tn, x), fullgraph=True,
                      backend="eager")
    t = torch.tensor([0.5, 0.25])
    torch.testing.assert_close(f(x, t, t / 2), s.step(s.add_noise(x, x, t), t, t / 2, x))
    g = torch.compile(lambda x, t, tp: DDPMScheduler(10).ddim_step(x, t, tp, x), fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(g(x, torch.tensor([5, 5]), torch.tensor([4, 3])),
                               DDPMScheduler(10).ddim_step(x, torch.tensor([5, 5]), torch.tensor([4, 3]), x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flow_matching_does_not_check_cuda_times():
    """CUDA times are not checked (that would sync the host with the device every step)."""
    s = FlowMatchingScheduler()
    x = torch.randn(2, 3, device="cuda")
    s.step(x, torch.tensor([0.2, 0.2], device="cuda"), torch.tensor([0.8, 2.0], device="cuda"), x)
    s.add_noise(x, x, torch.tensor([500.0, float("nan")], device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ddpm_cuda_steps_without_host_sync_and_cpu_generator():
    """DDPM with CUDA steps indexes a table on the GPU (the CPU table cost a blocking round trip
    per call) and draws a CPU generator's noise on the CPU (the same noise on every device; a
    CUDA randn with a CPU generator raised)."""
    from helpers import assert_no_host_sync
    s = DDPMScheduler(100)
    x = torch.randn(2, 3, device="cuda")
    t, t_prev = torch.tensor([50, 40], device="cuda"), torch.tensor([49, 30], device="cuda")
    want = s.ddpm_step(x.cpu(), t.cpu(), x.cpu(), t_prev.cpu(), generator=torch.Generator().manual_seed(0))
    got = s.ddpm_step(x, t, x, t_prev, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.cpu(), want)

    def steps():
        s.ddpm_step(x, t, x, t_prev)
        s.ddim_step(x, t, t_prev, x)
        s.add_noise(x, x, t)
        s.snr(t)
    assert_no_host_sync(steps)


def test_generator_draws_on_its_own_device(monkeypatch):
    """The VAE's reparameterised sample draws a CPU generator's noise on the CPU and moves it to
    the tensors' device ('meta' stands in for a GPU: the draw's device is recorded; a CUDA randn
    with a CPU generator raises); the DDPM step's seeded noise repeats (its CUDA case:
    test_ddpm_cuda_steps_without_host_sync_and_cpu_generator)."""
    import vidgen.models.vae as vae_mod
    drawn = []
    real_randn = torch.randn

    def spy(*a, **kw):
        drawn.append(torch.device(kw.get("device") or "cpu"))
        return real_randn(*a, **kw)
    monkeypatch.setattr(vae_mod.torch, "randn", spy)
    mean = torch.zeros(2, 3, device="meta")
    assert LatentVAE.sample(mean, mean, torch.Generator().manual_seed(0)).device.type == "meta"
    assert LatentVAE.sample(mean, mean).device.type == "meta"
    assert drawn == [torch.device("cpu"), torch.device("meta")], drawn
    monkeypatch.undo()
    s = DDPMScheduler(10)
    a, b = (s.ddpm_step(torch.zeros(2, 3), 5, torch.zeros(2, 3), generator=torch.Generator().manual_seed(1))
            for _ in range(2))
    torch.testing.assert_close(a, b)  # seeded: the same noise
    assert s._table(torch.device("cpu")) is s.alphas_cumprod


def test_scalar_times_step_in_both_schedulers():
    """Scalar (0-d / Python number) ``t`` and ``t_prev``: the order check's ``_pad_dims`` called
    ``reshape()`` with no shape (a TypeError) for two 0-d times, so every DDPM / DDIM step at
    scalar times failed."""
    s = DDPMScheduler(100)
    x = torch.randn(2, 3)
    assert s.ddim_step(x, 5, 4, x).shape == x.shape
    assert s.ddpm_step(x, torch.tensor(5), x).shape == x.shape
    with pytest.raises(ValueError, match=r"t_prev must be < t .*got t=5 and t_prev=5"):
        s.ddim_step(x, 5, 5, x)
    torch.testing.assert_close(FlowMatchingScheduler().step(x, 0.75, 0.25, x), 0.5 * x)
