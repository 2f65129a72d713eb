"""`vidgen demo` end to end at a tiny size, and the demo's data / metric / file writers."""
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import vidgen_kernels as vk
from vidgen.demo import measure_directions, moving_object_videos
from vidgen.media import plot_lines, write_gif, write_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_size(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert data.endswith(b"IEND\xaeB`\x82")
    return w, h


def _gif_frames(path):
    """Minimal GIF parse: count image descriptors, check header and trailer."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:6] == b"GIF89a" and data[-1:] == b"\x3b"
    w, h, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    n = 0
    while data[pos] != 0x3B:
        if data[pos] == 0x21:                       # extension: label, sub-blocks
            pos += 2
        else:                                       # image descriptor + LZW min code size
            assert data[pos] == 0x2C
            n += 1
            pos += 11
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    return w, h, n


def test_moving_object_data_and_metric():
    g = torch.Generator().manual_seed(0)
    v, d = moving_object_videos(40, frames=6, size=24, generator=g)
    assert v.shape == (40, 6, 1, 24, 24) and v.min() == -1 and v.max() <= 1
    assert (measure_directions(v) == d).all()
    flipped = v.flip(1)                             # time reversal: right<->left, down<->up
    assert (measure_directions(flipped) == (d ^ 1)).all()
    e, de = moving_object_videos(12, frames=6, size=24, generator=g, start="edge")
    assert (measure_directions(e) == de).all()
    first = (e[:, 0, 0] > -1).float()                       # [n, H, W] object mask of frame 0
    last = (e[:, -1, 0] > -1).float()
    for k in range(12):                                     # path pinned 2 px from the left/top edge
        d = int(de[k])
        ys, xs = (first[k] if d in (0, 2) else last[k]).nonzero(as_tuple=True)
        assert (xs.min() if d in (0, 1) else ys.min()) == 2


def test_media_writers(tmp_path):
    img = (np.arange(30 * 40) % 256).astype(np.uint8).reshape(30, 40)
    write_png(str(tmp_path / "a.png"), img)
    assert _png_size(str(tmp_path / "a.png")) == (40, 30)
    write_png(str(tmp_path / "b.png"), np.stack([img] * 3, -1))
    frames = np.random.default_rng(0).integers(0, 256, (5, 20, 33), dtype=np.uint8)
    write_gif(str(tmp_path / "a.gif"), frames)
    assert _gif_frames(str(tmp_path / "a.gif")) == (33, 20, 5)
    plot = plot_lines([[(np.exp(-np.arange(50) / 10), (255, 0, 0))], [([1.0, 0.5, 0.7], (0, 0, 255))]])
    assert plot.shape == (220, 720, 3) and plot.dtype == np.uint8
    assert (plot == [255, 0, 0]).all(-1).any() and (plot == [0, 0, 255]).all(-1).any()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU visible"))])
def test_vidgen_demo_cli_tiny(tmp_path, device):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "vidgen", "demo", "--tiny", "--steps", "4", "--seed", "3",
                        "--out", str(out), "--device", device], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("demo.gif", "frames.png", "loss.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    w, h, n = _gif_frames(str(out / "demo.gif"))
    assert n == 4                                   # tiny: 4 frames, one row per direction
    _png_size(str(out / "frames.png"))
    _png_size(str(out / "loss.png"))
    report = (out / "report.md").read_text()
    for key in ("Direction accuracy", "reference", "fused", "torch", "vidgen_kernels", "ms", f"device {device}"):
        assert key in report, key
    # sampling timed like the train step (warm-up + median), and said so
    assert "median of 1 call(s) after one warm-up call" in report
    # the default backend as resolved per op family, not only `auto`
    for family, be in vk.resolved_backends(device).items():
        assert f"{family} `{be}`" in report, (family, be)
    # a .safetensors checkpoint where safetensors is importable
    ckpt = "dit_ema.safetensors` (safetensors)" if _has_safetensors() else "dit_ema.pt` (torch.save"
    assert ckpt in report
    # a progress bar for every phase (tqdm, or the plain printer without it; stderr either way)
    for phase in ("VAE:", "VAE calibration:", "DiT:", "sampling:", "timings:"):
        assert phase in r.stderr, phase


def _has_safetensors():
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def test_time_sampling_warms_up_then_takes_the_median(monkeypatch):
    """The report's sampling time: one warm-up call, then the median of timing_rounds calls (it
    was one cold call, up to 10x the warm time), each call ticking the progress bar."""
    from types import SimpleNamespace
    from vidgen import demo
    clock = [0.0]
    durations = iter([10.0, 1.0, 3.0, 2.0])          # the first (warm-up) call is the slow one
    calls = []

    def fake_generate(m, cond, null, **kw):
        calls.append((m.backend, kw["num_inference_steps"], kw["guidance_scale"]))
        clock[0] += next(durations)
    monkeypatch.setattr(demo, "generate_video", fake_generate)
    monkeypatch.setattr(demo, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    cfg = demo.DemoConfig(timing_rounds=3, sample_steps=5, guidance=2.0)
    ticks = []
    model = torch.nn.Linear(1, 1)
    model.backend = None
    t = demo._time_sampling(model, torch.zeros(4, 2, 3), torch.zeros(1, 2, 3), cfg, (2, 4, 4),
                            "reference", tick=lambda: ticks.append(1))
    assert t == 2.0                                  # median of 1, 3, 2; the 10 s warm-up dropped
    assert calls == [("reference", 5, 2.0)] * 4 and len(ticks) == 4
    assert model.backend is None                     # timed on a copy


def test_resolved_backends_per_op_family():
    """What the default backend (`auto` unless set) runs per op family on a device."""
    resolved_backends = vk.resolved_backends
    got = resolved_backends("cpu")
    assert set(got) == {"AdaLN", "RoPE-3D attention", "temporal attention", "RoPE", "MoE"}
    want = "cpu" if "cpu" in vk.available_backends("cpu") else "reference"
    assert got["AdaLN"] == got["temporal attention"] == got["RoPE"] == got["MoE"] == want
    assert got["RoPE-3D attention"] == (want if want == "cpu" else
                                        "reference (no kernel here: rope3d_attention_sdpa)")
    with vk.use_backend("reference"):
        assert set(resolved_backends("cpu").values()) == {"reference"}
    if "triton" not in vk.available_backends("cpu"):
        with vk.use_backend("triton"):
            assert all(v.startswith("unavailable: ") for v in resolved_backends("cpu").values())


def test_vidgen_cli_help_and_unknown():
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "vidgen", "nope"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_gif_decodes_exactly_with_pillow(tmp_path):
    Image = __import__("pytest").importorskip("PIL.Image")
    from PIL import ImageSequence
    frames = np.random.default_rng(1).integers(0, 256, (3, 17, 29), dtype=np.uint8)
    write_gif(str(tmp_path / "t.gif"), frames)
    got = [np.array(f.convert("L")) for f in ImageSequence.Iterator(Image.open(str(tmp_path / "t.gif")))]
    assert len(got) == 3 and all((a == b).all() for a, b in zip(frames, got))


def test_auto_threads_reads_current_cpu_use(monkeypatch):
    from vidgen import demo
    busy = demo._cpu_busy_fraction(0.05)
    assert 0.0 <= busy <= 1.0
    monkeypatch.setattr(demo, "_cpu_busy_fraction", lambda window_s=0.5: 0.9)
    assert demo._auto_threads() == 1
    monkeypatch.setattr(demo, "_cpu_busy_fraction", lambda window_s=0.5: 0.1)
    assert demo._auto_threads() == torch.get_num_threads()


@pytest.mark.parametrize("args,msg", [
    (["--steps", "-3"], "--steps must be >= 0, got -3"),
    (["--vae-steps", "-1"], "--vae-steps must be >= 0"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nosuchdevice"],
     "--device"),
    (["--set", "hidden"], "--set hidden: expected KEY=VALUE"),
    (["--set", "foo=1"], "unknown setting 'foo'"),
    (["--set", "patch=2"], "patch takes a value like (2, 2, 2), got '2'"),
    (["--set", "start=bogus"], "start must be one of ('random', 'edge'), got 'bogus'"),
    (["--set", "causal_temporal=maybe"], "causal_temporal takes a value like False, got 'maybe'"),
    (["--set", "hidden=abc"], "hidden takes a value like 96, got 'abc'"),
    # range checks before any training (these failed minutes in, or ran to the end wrong)
    (["--set", "grad_clip=-1"], "setting grad_clip must be > 0, got -1.0"),
    (["--set", "grad_clip=0"], "setting grad_clip must be > 0, got 0.0"),
    (["--set", "guidance=nan"], "setting guidance must be finite, got nan"),
    (["--set", "sample_steps=0"], "setting sample_steps must be >= 1, got 0"),
    (["--set", "samples_per_direction=0"], "setting samples_per_direction must be >= 1"),
    (["--set", "steps=-5"], "setting steps must be >= 0, got -5"),
    (["--set", "timing_rounds=0"], "setting timing_rounds must be >= 1"),
    (["--set", "batch=0"], "setting batch must be >= 1"),
    (["--set", "text_dim=0"], "setting text_dim must be >= 1"),
    (["--set", "shift=0"], "setting shift must be > 0 and finite"),
    (["--set", "lr=nan"], "setting lr must be > 0 and finite, got nan"),
    (["--set", "vae_lr=inf"], "setting vae_lr must be > 0 and finite, got inf"),
    (["--set", "cfg_drop=1.5"], "setting cfg_drop must be in [0, 1], got 1.5"),
    (["--set", "ema_decay=2"], "setting ema_decay must be in [0, 1], got 2.0"),
    (["--set", "size=10"], "setting size must be >= 14 for 4 frames"),
    (["--set", "size=18"], "setting size must be a multiple of 4"),
    (["--set", "frames=3", "--set", "patch=2,2,2"], "setting frames must be a multiple of the patch's t = 2"),
    (["--set", "heads=3"], "setting hidden_size must be divisible by num_heads"),
    (["--steps", "3", "--set", "steps=-1"], "setting steps must be >= 0, got -1"),  # --set wins
])
def test_demo_cli_rejects_bad_arguments(tmp_path, capsys, args, msg, monkeypatch):
    """Bad options exit 2 with a message naming the option, before any work (they ran with
    negative step counts, or ended in tracebacks: CUDA asserts, FileExistsError, KeyError-like
    setattr errors; --set start=bogus ran as 'edge')."""
    from vidgen import demo
    from vidgen.demo import main
    monkeypatch.setattr(demo, "run_demo", lambda **kw: pytest.fail("ran the demo"))
    with pytest.raises(SystemExit) as e:
        main(["--tiny", "--out", str(tmp_path / "o")] + args)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
    f = tmp_path / "a_file"
    f.write_text("")
    with pytest.raises(SystemExit):
        main(["--tiny", "--out", str(f)])
    assert f"--out {f} is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="start must be 'random' or 'edge'"):
        moving_object_videos(1, 4, 16, start="bogus")


def test_image_writers_refuse_silent_casts(tmp_path):
    """Float images (0.9 was cast to 0) and integers beyond [0, 255] (wrapped) are a TypeError
    that says how to scale; integer images in range are taken as they are."""
    for img, fn, name in ((np.full((4, 5), 0.9), write_png, "write_png: img"),
                          (np.full((2, 4, 5), 0.9, np.float32), write_gif, "write_gif: frames"),
                          (np.full((4, 5), 300), write_png, "write_png: img"),
                          (np.full((2, 4, 5), -1), write_gif, "write_gif: frames")):
        with pytest.raises(TypeError, match=f"{name} must be uint8 .*got (float|int)"):
            fn(str(tmp_path / "x"), img)
    write_png(str(tmp_path / "ok.png"), np.full((4, 5), 200, np.int64))
    write_gif(str(tmp_path / "ok.gif"), np.full((2, 4, 5), 7, np.int32))


def test_vidgen_demo_runs_on_cpu_unless_asked(tmp_path, monkeypatch):
    """`make demo` is the CPU job (its sizes are a CPU's): with a GPU visible it ran on cuda, since
    the default device was "cuda when available". Now the CPU unless --device cuda; the parser's
    default says so too."""
    import inspect
    from vidgen import demo
    # (not by faking torch.cuda.is_available: a CUDA torch without a GPU then fails in CUDA calls)
    assert inspect.signature(demo.run_demo).parameters["device"].default == "cpu"
    demo.run_demo(out=str(tmp_path), steps=2, tiny=True, quiet=True, vae_steps=2)
    assert "device cpu" in (tmp_path / "report.md").read_text()
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kw: seen.update(kw) or {"accuracy": 1.0})
    try:
        demo.main(["--tiny", "--out", str(tmp_path / "b")])
    except SystemExit:
        pass
    assert seen.get("device") == "cpu", seen
