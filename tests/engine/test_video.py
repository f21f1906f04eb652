"""Video pieces without a video file: flow, warping, reliability, the temporal loss, the journal,
frame selection, and the frame loop (style targets once, resuming to the same frames)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from nst.engine.config import GATYS, Precision
from nst.engine.device import Runtime
from nst.engine.images import load_image, to_tensor
from nst.engine.video import (
    FlowError, FlowMethod, FrameJournal, FrameSelection, RaftFlow, TemporalTerm, VideoConfig, find_raft_weights,
    flow_pair, optical_flow, reliability, stylize_video, temporal_loss, warp, warping_error,
)  # fmt: skip

TINY = dataclasses.replace(GATYS, size=48, iterations=3, style_layers=("relu1_1", "relu2_1", "relu3_1"), content_layers=("relu3_2",))


def texture(w: int = 64, h: int = 48, seed: int = 0) -> torch.Tensor:
    """A smooth random texture, (1, 3, h, w) in [0, 1]: enough structure for optical flow."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def const_flow(dx: float, dy: float, h: int = 16, w: int = 20) -> torch.Tensor:
    f = torch.zeros(1, 2, h, w)
    f[:, 0], f[:, 1] = dx, dy
    return f


def test_warp_by_a_whole_pixel_shift_is_the_shift_and_marks_what_came_from_outside():
    img = torch.rand(1, 3, 16, 20)
    out, inside = warp(img, const_flow(2, 1))  # out(p) = img(p + (2, 1))
    assert torch.allclose(out[:, :, :-1, :-2], img[:, :, 1:, 2:], atol=1e-6)
    assert inside[0, 0, :-1, :-2].all() and not inside[0, 0, :, -2:].any() and not inside[0, 0, -1, :].any()
    same, inside0 = warp(img, torch.zeros(1, 2, 16, 20))
    assert torch.allclose(same, img, atol=1e-6) and inside0.all()
    with pytest.raises(ValueError, match="differ in size"):
        warp(img, torch.zeros(1, 2, 8, 8))


def test_reliability_marks_inconsistent_flow_as_disoccluded_and_steps_as_motion_boundaries():
    # Consistent: frame t-1 moved 2 px right (forward +2, backward -2): all reliable but the
    # left strip, which backward sends outside frame t-1.
    r = reliability(const_flow(2, 0), const_flow(-2, 0))
    assert not r.disoccluded[0, 0, :, 2:].any() and r.disoccluded[0, 0, :, :2].all()
    assert not r.motion_boundary.any() and r.weights[0, 0, :, 2:].eq(1).all() and r.weights[0, 0, :, :2].eq(0).all()
    assert r.fraction == pytest.approx(18 / 20)
    # Forward and backward agree instead of cancelling: |f + b|^2 = 16 > 0.01 * 8 + 0.5 everywhere.
    assert reliability(const_flow(2, 0), const_flow(2, 0)).disoccluded.all()
    # A step in the backward flow (an object edge): marked on the columns beside the step only.
    back = const_flow(-1, 0)
    back[:, 0, :, 10:] = -4
    forward = -back  # consistent away from the step
    mb = reliability(forward, back).motion_boundary[0, 0]
    assert mb[:, 9:11].all() and not mb[:, :8].any() and not mb[:, 12:].any()


@pytest.mark.parametrize("method", [FlowMethod.DIS, FlowMethod.FARNEBACK])
def test_opencv_flow_finds_a_known_shift(method):
    big = texture(96, 72, seed=3)
    first = big[:, :, 8:56, 8:72]  # 64x48
    second = big[:, :, 7:55, 5:69]  # the view moved: content shifted 3 px right and 1 px down
    flow = optical_flow(first, second, method=method)
    assert flow.shape == (1, 2, 48, 64)
    inner = flow[0, :, 8:-8, 8:-8].reshape(2, -1).median(dim=1).values
    assert inner[0].item() == pytest.approx(3, abs=0.3) and inner[1].item() == pytest.approx(1, abs=0.3)
    # The flow from `first` to `second` brings `second` back onto `first`.
    warped, _ = warp(second, flow)
    assert (warped - first)[..., 8:-8, 8:-8].abs().mean() < 0.02


@pytest.mark.parametrize("method", [FlowMethod.DIS, FlowMethod.FARNEBACK])
def test_flow_pair_is_both_directions_of_optical_flow(method):
    big = texture(96, 72, seed=4)
    first, second = big[:, :, 8:56, 8:72], big[:, :, 6:54, 4:68]
    forward, backward = flow_pair(first, second, method=method)
    assert torch.equal(forward, optical_flow(first, second, method=method))
    assert torch.equal(backward, optical_flow(second, first, method=method))
    with pytest.raises(ValueError, match="one size"):
        flow_pair(first, second[..., :-1], method=method)


def test_raft_needs_weights_and_runs_with_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(FlowError, match="RAFT weights .* cannot be downloaded here; use `flow` dis"):
        find_raft_weights()
    with pytest.raises(FlowError, match="not found"):
        find_raft_weights(path=tmp_path / "missing.pth")
    with pytest.raises(FlowError, match="is a folder, not a RAFT weights file"):
        find_raft_weights(path=tmp_path)
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path / "raft_small_random.pth"
    torch.save(raft_small(weights=None).state_dict(), path)  # untrained: only the plumbing is tested
    assert find_raft_weights(path=path) == path
    raft = RaftFlow(path, device=torch.device("cpu"), iterations=2)
    assert raft.kind == "raft_small"
    a = texture(36, 28)
    flow = optical_flow(a, a, method=FlowMethod.RAFT, raft=raft)  # 36x28 is padded to 40x32 and cropped back
    assert flow.shape == (1, 2, 28, 36) and torch.isfinite(flow).all()
    # Both directions as one batch of two: each is the single direction's flow, up to the rounding
    # of a batch of two (a real flow, between two different frames, both ways).
    b = texture(36, 28, seed=5)
    forward, backward = flow_pair(a, b, method=FlowMethod.RAFT, raft=raft)
    for got, want in ((forward, optical_flow(a, b, method=FlowMethod.RAFT, raft=raft)), (backward, optical_flow(b, a, method=FlowMethod.RAFT, raft=raft))):
        assert got.shape == (1, 2, 28, 36)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert not torch.equal(forward, backward)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(FlowError, match="not torchvision's raft"):
        RaftFlow(bad, device=torch.device("cpu"))


def test_temporal_loss_and_term_against_the_formula():
    g = torch.Generator().manual_seed(1)
    x, w = torch.rand(1, 3, 8, 10, generator=g), torch.rand(1, 3, 8, 10, generator=g)
    c = (torch.rand(1, 1, 8, 10, generator=g) > 0.3).float()
    by_hand = sum(c[0, 0, i, j] * (x[0, k, i, j] - w[0, k, i, j]) ** 2 for k in range(3) for i in range(8) for j in range(10)) / (3 * 8 * 10)
    assert temporal_loss(x, w, c).item() == pytest.approx(float(by_hand), rel=1e-5)
    term = TemporalTerm(w, c, 7.0)
    assert term(x).item() == pytest.approx(7 * float(by_hand), rel=1e-5)
    # A coarser stage: the target and weights are area-averaged down to the image's size.
    small = term(x[:, :, ::2, ::2])
    tw = torch.nn.functional.interpolate(w, size=(4, 5), mode="area")
    tc = torch.nn.functional.interpolate(c, size=(4, 5), mode="area")
    assert small.item() == pytest.approx(7 * temporal_loss(x[:, :, ::2, ::2], tw, tc).item(), rel=1e-6)


def test_warping_error_is_in_8_bit_levels_over_reliable_pixels():
    prev = torch.full((1, 3, 4, 4), 100 / 255)
    cur = prev.clone()
    cur[..., :, :2] += 6 / 255  # left half differs by 6 levels
    ones = torch.ones(1, 1, 4, 4)
    assert warping_error(cur, prev, ones) == pytest.approx(3.0, abs=1e-3)
    right = torch.zeros(1, 1, 4, 4)
    right[..., 2:] = 1
    assert warping_error(cur, prev, right) == pytest.approx(0.0, abs=1e-3)
    assert warping_error(cur, prev, torch.zeros(1, 1, 4, 4)) is None


def test_frame_selection():
    assert FrameSelection.parse(None) == FrameSelection() and FrameSelection.parse(":") == FrameSelection()
    s = FrameSelection.parse("2:9", every=3)
    assert [i for i in range(12) if s.picks(i)] == [2, 5, 8] and s.count(12) == 3 and s.count(6) == 2
    assert FrameSelection.parse("4:").count(10) == 6 and FrameSelection.parse(":4").count(10) == 4
    from fractions import Fraction

    assert s.fps(Fraction(30)) == 10
    for bad in ("5:2", "a:b", "3", "-1:4"):
        with pytest.raises(ValueError):
            FrameSelection.parse(bad)
    with pytest.raises(ValueError, match="every"):
        FrameSelection.parse("1:3", every=0)


def test_journal_resumes_the_finished_prefix_and_starts_over_for_another_run(tmp_path):
    folder = tmp_path / "out.mp4.nst-work"
    j = FrameJournal(folder, {"run": 1})
    assert j.open() == 0
    for i in range(3):
        j.record(i, torch.full((1, 3, 4, 4), i / 10), {"seconds": 1.0, "warping_error": None if i == 0 else 0.5})
    with pytest.raises(ValueError, match="in order"):
        j.record(5, torch.zeros(1, 3, 4, 4), {})
    again = FrameJournal(folder, {"run": 1})
    assert again.open() == 3 and [e["index"] for e in again.entries] == [0, 1, 2]
    assert again.frame_paths()[2].name == "000003.png"
    # kill -9 while appending: a torn last line is ignored, and the next append follows a whole line.
    with open(folder / "journal.jsonl", "a") as f:
        f.write('{"index": 3, "seco')
    torn = FrameJournal(folder, {"run": 1})
    assert torn.open() == 3
    torn.record(3, torch.zeros(1, 3, 4, 4), {"seconds": 2.0})
    assert [json.loads(line).get("index") for line in (folder / "journal.jsonl").read_text().splitlines()] == [None, 0, 1, 2, 3]
    # A journalled frame whose file is gone ends the prefix there.
    torn.frame_path(1).unlink()
    assert FrameJournal(folder, {"run": 1}).open() == 1
    # Other settings: the old frames are not this run's.
    other = FrameJournal(folder, {"run": 2})
    assert other.open() == 0 and "other inputs or settings" in other.restarted
    assert not any((folder / "frames").iterdir())
    other.remove()
    assert not folder.exists()


def _pan(examples, n: int, step: int = 3, w: int = 72, h: int = 54) -> list[Image.Image]:
    photo = Image.open(examples / "chelsea.png").convert("RGB")
    photo = photo.resize((w + step * n, round(photo.height * (w + step * n) / photo.width)), Image.Resampling.LANCZOS)
    return [photo.crop((step * i, 4, step * i + w, 4 + h)) for i in range(n)]


class StopAfter:
    """A frame callback that interrupts the run as frame `n` starts, like Ctrl-C would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, ev) -> None:
        if ev.kind == "start" and ev.index == self.n:
            raise KeyboardInterrupt


def test_frame_loop_targets_once_resumes_to_the_same_frames(examples, weights, tmp_path):
    frames = _pan(examples, 5)
    style = load_image(examples / "starry_night.jpeg")
    vcfg = VideoConfig(temporal_weight=100.0, iterations_first=4)
    rt = Runtime(precision=Precision.FP32)
    whole = FrameJournal(tmp_path / "a", {"k": 1})
    events = []
    r = stylize_video(frames, [style], TINY, vcfg, weights=weights, journal=whole, runtime=rt, total=5, frame_callback=events.append)
    assert r.status == "done" and r.resumed == 0 and len(r.frames) == 5
    assert [f["iterations"] for f in r.frames] == [4, 3, 3, 3, 3]
    assert [e.kind for e in events] == ["start", "done"] * 5 and events[0].total == 5
    # One network, the style targets once for the clip, content targets once per frame.
    assert r.targets["style_computed"] == 1 and r.targets["content_computed"] == 5
    assert r.warping_errors[0] is None and all(e is not None and e >= 0 for e in r.warping_errors[1:])
    assert "temporal" in r.frames[1]["terms"] and "temporal" not in r.frames[0]["terms"]
    assert r.warping_error_mean == pytest.approx(np.mean(r.warping_errors[1:]))

    # Interrupted as frame 3 starts, then resumed: the same frames, byte for byte.
    part = FrameJournal(tmp_path / "b", {"k": 1})
    r1 = stylize_video(frames, [style], TINY, vcfg, weights=weights, journal=part, runtime=rt, frame_callback=StopAfter(3))
    assert r1.status == "interrupted" and len(part.entries) == 3
    r2 = stylize_video(frames, [style], TINY, vcfg, weights=weights, journal=FrameJournal(tmp_path / "b", {"k": 1}), runtime=rt)
    assert r2.status == "done" and r2.resumed == 3 and [f["resumed"] for f in r2.frames] == [True] * 3 + [False] * 2
    for i in range(5):
        a = np.asarray(Image.open(whole.frame_path(i)))
        b = np.asarray(Image.open(tmp_path / "b" / "frames" / f"{i + 1:06d}.png"))
        assert np.array_equal(a, b), f"frame {i + 1} differs after resuming"
    assert r2.warping_errors == pytest.approx(r.warping_errors)


def test_temporal_weight_zero_is_independent_frames(examples, weights, tmp_path):
    frames = _pan(examples, 3)
    style = load_image(examples / "starry_night.jpeg")
    rt = Runtime(precision=Precision.FP32)
    cfg = dataclasses.replace(TINY, iterations=2)
    r = stylize_video(frames, [style], cfg, VideoConfig(temporal_weight=0, iterations_first=2), weights=weights, journal=FrameJournal(tmp_path / "v", {}), runtime=rt)
    # Frame 3 alone, stylised as a still image, is the same picture.
    from nst.engine.transfer import stylize

    alone = stylize(frames[2], [style], cfg, weights=weights, runtime=rt)
    saved = to_tensor(Image.open(tmp_path / "v" / "frames" / "000003.png"))
    assert torch.equal(saved, (alone.image * 255 + 0.5).floor() / 255)
    assert "temporal" not in r.frames[2]["terms"] and r.warping_errors[2] is not None


def test_a_clips_plan_counts_what_its_loop_keeps_beside_each_frame():
    """The part `video` of a clip's plan (`frame_bytes`): on the CPU the frame loop's host tensors
    (content frame, warped previous output, reliability, two 8-bit images) and the temporal term's
    buffers; off it only the term's (its target and weights copied to the device, and its autograd
    buffers); nothing on a GPU without the term. A still image's plan has no such part."""
    from nst.engine.images import output_shape
    from nst.engine.plan import OVERHEAD
    from nst.engine.transfer import MemoryRequest, plan_for
    from nst.engine.video.pipeline import frame_bytes, plan_clip

    cfg = dataclasses.replace(GATYS, size=512, scales=())
    wh = (640, 480)
    h, w = output_shape(*wh, 512, cfg.size_edge)
    image = 3 * h * w * 4
    cpu, gpu = frame_bytes(wh, cfg, VideoConfig(), "cpu"), frame_bytes(wh, cfg, VideoConfig(), "cuda:0")
    assert cpu > gpu > 0 and frame_bytes(wh, cfg, VideoConfig(temporal_weight=0), "cuda:0") == 0
    assert frame_bytes(wh, cfg, VideoConfig(temporal_weight=0), "cpu") == cpu - 3 * image  # the term's autograd buffers
    assert gpu == 3 * image + image + image // 3  # and its target and weights, copied to the device
    grey = dataclasses.replace(cfg, preserve_colors="luminance")
    assert frame_bytes(wh, grey, VideoConfig(), "cuda:0") == gpu - image + image // 3  # a one-plane target
    request = MemoryRequest(budget=10**11)
    clip = plan_clip(wh, [(256, 256)], cfg, VideoConfig(), Runtime(device=torch.device("cpu")), request)
    still = plan_for(wh, [(256, 256)], cfg, Runtime(device=torch.device("cpu")), request)
    assert clip.stages[-1].parts["video"] == cpu and "video" not in still.stages[-1].parts
    assert clip.estimated_peak_bytes - still.estimated_peak_bytes == pytest.approx(cpu * (1 + OVERHEAD), rel=1e-3)


def test_a_clips_plan_counts_its_encoder_and_refuses_a_budget_it_does_not_fit():
    """Writing a video file comes after the last frame, with the network still loaded: the plan's
    `write_bytes` (240 B a pixel for H.264, measured 204-224), and a budget the loop fits but the
    encoder does not is one PlanError naming a budget that does. A folder of frames has no encoder."""
    from nst.engine.plan import PlanError, parse_size, weight_bytes
    from nst.engine.transfer import MemoryRequest
    from nst.engine.video.pipeline import encoder_bytes, plan_clip

    cfg = dataclasses.replace(GATYS, size=2048, scales=())
    cpu = Runtime(device=torch.device("cpu"), precision=Precision.FP32)
    wh = (2560, 1440)  # out: 2048x1152
    loop = plan_clip(wh, [(256, 256)], cfg, VideoConfig(), cpu, MemoryRequest(budget=10**11))
    assert loop.write_bytes == 0  # frames to a folder: nothing to encode
    need = encoder_bytes((2048, 1152), "libx264")
    assert need == 2048 * 1152 * 240 and encoder_bytes((2048, 1152), "mpeg4") < need / 3
    planned = plan_clip(wh, [(256, 256)], cfg, VideoConfig(), cpu, MemoryRequest(budget=10**11), encoder="libx264")
    assert planned.write_bytes == need and planned.to_dict()["write_bytes"] == need
    assert planned.estimated_peak_bytes == loop.estimated_peak_bytes  # the loop's peak is its own
    # A budget the loop fits in tiles (from 581 MB), but the encoder (566 MB) and the weights do not.
    layers = cfg.content_layers + cfg.style_layers
    small = need + weight_bytes(layers, Precision.FP32) - 10**6
    tiled = plan_clip(wh, [(256, 256)], cfg, VideoConfig(), cpu, MemoryRequest(budget=small))
    assert tiled.estimated_peak_bytes <= small
    with pytest.raises(PlanError, match=r"writing the 2048x1152 video needs about .*libx264.*give --max-memory (\S+ [MG]B) or more, or write the frames to a folder") as e:
        plan_clip(wh, [(256, 256)], cfg, VideoConfig(), cpu, MemoryRequest(budget=small), encoder="libx264")
    named = parse_size(re.search(r"--max-memory (\S+ [MG]B)", str(e.value)).group(1).replace(" ", ""))
    assert plan_clip(wh, [(256, 256)], cfg, VideoConfig(), cpu, MemoryRequest(budget=named), encoder="libx264").write_bytes == need


def test_a_clip_resumes_only_frames_made_the_same_way(examples, weights, tmp_path):
    """The journal's identity held the settings but not the precision, where the targets came
    from, or the masks' contents: a rerun at fp32 resumed bf16 frames, one after a mask was edited
    in place resumed frames made with the old mask."""
    from nst.engine.targets import TorchTargets
    from nst.engine.transfer import build_model
    from nst.engine.video.pipeline import ClipJob, run_clip

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, im in enumerate(_pan(examples, 4)):
        im.save(frames / f"{i:03d}.png")
    mask = tmp_path / "mask.png"
    Image.new("L", (72, 54), 255).save(mask)
    cfg = dataclasses.replace(TINY, masks=(str(mask),))
    style = load_image(examples / "starry_night.jpeg")
    vcfg = VideoConfig(temporal_weight=100.0, iterations_first=3)
    job = ClipJob(str(frames), tmp_path / "out")

    def run(precision: Precision, **extra):
        return run_clip(job, [style], cfg, vcfg, weights=weights, identity={}, runtime=Runtime(precision=precision), **extra)

    assert run(Precision.FP32, frame_callback=StopAfter(2)).status == "interrupted"
    assert run(Precision.BF16, frame_callback=StopAfter(2)).result.resumed == 0  # another precision: started again
    assert run(Precision.BF16, frame_callback=StopAfter(3)).result.resumed == 2  # the same: resumed
    Image.new("L", (72, 54), 128).save(mask)  # edited in place
    assert run(Precision.BF16, frame_callback=StopAfter(3)).result.resumed == 0
    torch_source = TorchTargets(build_model(cfg, weights, Runtime(precision=Precision.BF16)))
    assert run(Precision.BF16, targets=torch_source, frame_callback=StopAfter(3)).result.resumed == 3  # torch either way: "torch" both times


def test_style_targets_that_follow_each_frame_are_not_kept(examples, weights, tmp_path):
    """With --preserve-colors the style is recoloured to each frame: its targets were cached and
    kept in memory once per frame (2.4 MB each, a 10,000-frame clip 24 GB)."""
    from nst.engine.config import PreserveColors

    class Cache:
        def __init__(self):
            self.stored = []

        def lookup(self, key):
            return None

        def store(self, key, targets):
            self.stored.append(key)

    frames = _pan(examples, 3)
    style = load_image(examples / "starry_night.jpeg")
    vcfg = VideoConfig(temporal_weight=100.0, iterations_first=2)
    for colors, kept in ((PreserveColors.HISTOGRAM, 0), (PreserveColors.NONE, 1)):
        cache = Cache()
        cfg = dataclasses.replace(TINY, iterations=1, scales=(), preserve_colors=colors)
        r = stylize_video(frames, [style], cfg, vcfg, weights=weights, journal=FrameJournal(tmp_path / colors.value, {"k": 1}), runtime=Runtime(precision=Precision.FP32), cache=cache)
        assert r.status == "done" and len(cache.stored) == kept, (colors, cache.stored)


def test_a_stop_while_writing_keeps_the_frames_and_says_so(examples, weights, tmp_path, monkeypatch):
    """Ctrl-C during the final encode exited 130 with no word; the frames, all done, stay for a
    rerun, which writes the video without stylising anything again."""
    from nst.engine.video import pipeline
    from nst.engine.video.pipeline import ClipJob, run_clip

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, im in enumerate(_pan(examples, 2)):
        im.save(frames / f"{i:03d}.png")
    job = ClipJob(str(frames), tmp_path / "out.mp4")
    style = load_image(examples / "starry_night.jpeg")
    cfg, vcfg = dataclasses.replace(TINY, iterations=1, scales=()), VideoConfig(iterations_first=1)
    real = pipeline.write_video

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_video", interrupted)
    out = run_clip(job, [style], cfg, vcfg, weights=weights, identity={}, runtime=Runtime(precision=Precision.FP32))
    assert out.status == "interrupted" and out.message == f"stopped while writing {job.output}" and len(out.journal.entries) == 2
    assert not job.output.exists()
    monkeypatch.setattr(pipeline, "write_video", real)
    again = run_clip(job, [style], cfg, vcfg, weights=weights, identity={}, runtime=Runtime(precision=Precision.FP32))
    assert again.status == "done" and again.result.resumed == 2 and job.output.is_file()


def test_an_unfinished_frame_is_not_said_to_be_kept(examples, weights, tmp_path):
    """stylize's "kept the latest image" was passed on for a frame that is dropped."""
    r = stylize_video(_pan(examples, 3), [load_image(examples / "starry_night.jpeg")], TINY, VideoConfig(iterations_first=2),
                      weights=weights, journal=FrameJournal(tmp_path / "w", {"k": 1}), runtime=Runtime(precision=Precision.FP32),
                      callback=_stop_at_step(2))  # fmt: skip
    assert r.status == "interrupted" and "kept the latest image" not in r.message and r.message.endswith("(the frame is not kept)"), r.message


def _stop_at_step(n: int):
    from nst.engine.transfer import StopRun

    def callback(it) -> None:
        if it.step == n:
            raise StopRun
    return callback
