"""Whole videos (issue 20): generated videos with a known grade sequence, graded by a small model trained on the
demo data, through the .pt and through an int8 .onnx with torch blocked; frames that cannot be graded, bad
videos, Ctrl-C, rotation, interlacing and a variable frame rate.

The videos are written with PyAV from the training images (4 s mild, 3 s severe, 2 s black at 25 frames/s),
so that what is tested is the video pipeline, not how a 24-image model generalises."""

import contextlib
import http.server
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import FAST, cli, make_folder, run_script, train, user_lines
from PIL import Image
from test_export import NOT_INSTALLED

from ucgrade import files, live, videograde
from ucgrade.demo import make_image, write_video
from ucgrade.video import Sampler, open_video, sample_frames

SIDE = 144  # px of the generated videos: the decoder scales them down to the model's 73 px
CLIP = [("mild", 4), ("severe", 3), ("black", 2)]
SEVERE = (4.0, 7.0)  # s
TOLERANCE = 0.5  # s, on the severe segment's start and end
SHORT = ["--min-gradable", "5"]  # the clip has 7 s of gradable footage, under the default 10 s


@pytest.fixture(scope="module")
def data(module_tmp):
    return make_folder(module_tmp / "data", {"mild": 12, "severe": 12})


@pytest.fixture(scope="module")
def run(data, module_tmp):
    """Two grades, ten epochs of 24 images from random weights: enough to tell the demo's mild from severe."""
    torch.manual_seed(0)
    assert train(["--data", data, "--out", module_tmp / "out", *FAST, "--epochs", "10", "--lr", "0.01"]) == 0
    return module_tmp / "out" / "train"


def pictures(data, grade):
    if grade == "black":
        return [np.zeros((8, 8, 3), np.uint8)]
    return [Image.open(path) for path in sorted((data / grade).glob("*.jpg"))]


def make_video(path, data, plan, **kwargs):
    return write_video(path, [(pictures(data, grade), seconds) for grade, seconds in plan], SIDE, **kwargs)


@pytest.fixture(scope="module")
def clip(data, module_tmp):
    (module_tmp / "videos").mkdir()
    return make_video(module_tmp / "videos" / "clip.mp4", data, CLIP)


def frames_of(out_dir):
    return files.read_csv(Path(out_dir) / "frames.csv")


def check_clip(summary):
    """What the clip must give: severe, from its severe segment, with the black stretch ungradable."""
    worst = summary["worst_segment"]
    assert summary["grade"] == "severe" and summary["gradable"] and worst["grade"] == "severe", summary
    assert abs(worst["start"] - SEVERE[0]) <= TOLERANCE and abs(worst["end"] - SEVERE[1]) <= TOLERANCE, worst
    assert summary["seconds"] == pytest.approx(9.0) and summary["gradable_share"] == pytest.approx(7 / 9, abs=0.03)
    rows = frames_of(summary["out"])
    assert len(rows) == 45 and summary["frames_graded"] == 45  # 9 s at the default 5 frames/s
    black = [r for r in rows if float(r["time"]) >= SEVERE[1]]
    assert black and all(r["gradable"] == "0" and r["reason"] == "too dark" for r in black)
    assert all(r["gradable"] == "1" for r in rows if float(r["time"]) < SEVERE[1])
    segments = files.read_csv(Path(summary["out"]) / "segments.csv")
    assert segments[-1]["grade"] == "ungradable" and float(segments[-1]["start"]) == pytest.approx(7.0, abs=0.25)
    assert [s["worst"] for s in segments].count("1") == 1


def test_a_video_is_graded_by_its_worst_segment(run, clip, tmp_path):
    code, out, err = cli("predict.py", clip, "--weights", run / "best.pt", "--device", "cpu", *SHORT,
                         "--video-out", tmp_path / "v", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["predictions"] == [] and result["errors"] == []
    (summary,) = result["videos"]
    check_clip(summary)
    folder = Path(summary["out"])
    assert folder == tmp_path / "v" / "clip"
    assert {p.name for p in folder.iterdir()} >= {
        "frames.csv",
        "segments.csv",
        "video.json",
        "timeline.png",
        "strip.png",
    }
    assert json.loads((folder / "video.json").read_text())["grade"] == "severe"
    assert summary["complete"] and summary["mean_probability_grade"] in ("mild", "severe")
    assert summary["frames_per_second"] > 0 and summary["runtime"] == "torch on cpu"
    assert Image.open(folder / "strip.png").size[1] > 200  # the worst segment's frames, with Grad-CAM (a .pt)

    # the plain output is one line per video, and a second run never overwrites the first
    code, out, err = cli("predict.py", clip, "--weights", run / "best.pt", "--device", "cpu", *SHORT,
                         "--video-out", tmp_path / "v")  # fmt: skip
    assert code == 0, err
    (line,) = user_lines(out)
    assert line.startswith(f"{clip}: severe (worst segment ") and line.endswith(f"-> {tmp_path / 'v' / 'clip2'}/")
    assert "mean-probability grade" in line and "78% of 9.0 s gradable" in line


def test_the_same_through_an_int8_onnx_with_torch_blocked(run, clip, tmp_path):
    exported = run_script("export.py", run, "--int8")
    assert exported.returncode == 0, exported.stderr[-2000:]
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(f"import sys\nfor name in {NOT_INSTALLED!r}:\n    sys.modules[name] = None\n")
    result = run_script("predict.py", clip, "--weights", run / "model.int8.onnx", *SHORT,
                        "--video-out", tmp_path / "v", "--json", env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = json.loads(result.stdout)["videos"]
    check_clip(summary)
    assert summary["precision"] == "int8" and summary["runtime"] == "ONNX Runtime on the CPU"
    assert "timeline.png was not drawn, because matplotlib is not installed" in result.stderr
    assert (Path(summary["out"]) / "strip.png").is_file() and not (Path(summary["out"]) / "timeline.png").exists()


def test_a_black_video_is_not_gradable(run, data, tmp_path):
    black = make_video(tmp_path / "black.mkv", data, [("black", 12)])
    code, out, err = cli("predict.py", black, "--weights", run / "best.pt", "--device", "cpu",
                         "--video-out", tmp_path / "v")  # fmt: skip
    assert code == 0, err
    (line,) = user_lines(out)
    assert line.startswith(
        f"{black}: not gradable (only 0.0 s of 12.0 s (0%) could be graded (excluded: too dark 100%)"
    )
    summary = json.loads((tmp_path / "v" / "black" / "video.json").read_text())
    assert summary["grade"] is None and not summary["gradable"] and "too dark" in summary["reason"]
    assert summary["worst_segment"] is None and summary["excluded_seconds"] == {"too dark": 12.0}


def damaged_copies(folder, good):
    """Bad videos beside good ones, each with the start of the sentence it must get."""
    (folder / "text.mp4").write_text("not a video\n")
    data = good.read_bytes()
    (folder / "header.mp4").write_bytes(data[:8] + bytes(200) + data[208:])
    (folder / "cut.mp4").write_bytes(data[: len(data) // 2])
    container = av.open(str(folder / "zero.avi"), "w")
    stream = container.add_stream("mjpeg", rate=25)
    stream.width, stream.height, stream.pix_fmt = SIDE, SIDE, "yuvj420p"
    container.start_encoding()
    container.close()
    container = av.open(str(folder / "audio.mp4"), "w")
    stream = container.add_stream("aac", rate=44100)
    for k in range(10):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 44100, k * 1024
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    mjpeg = (folder / "codec.avi").read_bytes()  # its codec's FourCC renamed to one that no decoder knows
    (folder / "unknown.avi").write_bytes(mjpeg.replace(b"MJPG", b"ZZZZ").replace(b"mjpg", b"zzzz"))
    return {
        "text.mp4": "not a video FFmpeg can read",
        "header.mp4": "the video's header is corrupt",
        "cut.mp4": "the video has no index (its 'moov' box), which an mp4 or mov recording keeps at its end",
        "zero.avi": "has no frames that can be decoded",
        "audio.mp4": "has sound but no video stream",
        "unknown.avi": "its video codec is unknown to FFmpeg",
        "tiny.mp4": "its 16x16 px frames are too small to grade",
        "large.mkv": "its 7680x4320 px frames are larger than any clinical endoscope records (4K: 4096 px a side), and "
        "each would take 16 times as long to decode as 1080p for a model that sees it scaled down",
    }


def test_bad_videos_get_one_sentence_each_and_the_others_are_graded(run, data, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    good = make_video(folder / "good.mp4", data, [("severe", 3)])
    make_video(folder / "codec.avi", data, [("mild", 1)], codec="mjpeg")
    make_video(folder / "hevc.mov", data, [("severe", 2.5)], codec="libx265", options={"x265-params": "log-level=none"})
    whole = make_video(tmp_path / "whole.mkv", data, [("mild", 3), ("severe", 3)]).read_bytes()
    (folder / "cut.mkv").write_bytes(whole[: len(whole) * 6 // 10])
    write_video(folder / "tiny.mp4", [(pictures(data, "mild"), 1)], 16)
    write_video(folder / "large.mkv", [(pictures(data, "black"), 0.04)], (7680, 4320), codec="mjpeg")
    (folder / "image.jpg").write_bytes((data / "mild" / "mild_000.jpg").read_bytes())  # images and videos mixed
    expected = damaged_copies(folder, good)

    code, out, err = cli("predict.py", folder, "--weights", run / "best.pt", "--device", "cpu", "--min-gradable", "1",
                         "--video-out", tmp_path / "v")  # fmt: skip
    assert code == 1
    errors = [line for line in user_lines(err) if line.startswith("error: ")]
    for name, sentence in expected.items():
        assert [line for line in errors if line.startswith(f"error: {folder / name}: {sentence}")], (name, errors)
    assert len(errors) == len(expected)
    assert "Traceback" not in err
    graded = {Path(line.split(": ")[0]).name: line for line in user_lines(out)}
    assert set(graded) == {"image.jpg", "good.mp4", "codec.avi", "hevc.mov", "cut.mkv"}
    assert graded["image.jpg"].startswith(f"{folder / 'image.jpg'}: mild (p=")  # an image's line, as ever
    assert graded["good.mp4"].startswith(f"{good}: severe") and graded["hevc.mov"].split(": ")[1].startswith("severe")
    assert (
        "[incomplete: the video ends at " in graded["cut.mkv"] and "of the 6.0 s its header gives" in graded["cut.mkv"]
    )
    cut = json.loads((tmp_path / "v" / "cut" / "video.json").read_text())
    assert not cut["complete"] and 2.5 <= cut["seconds"] <= 4.5 and len(frames_of(cut["out"])) >= 12
    # refused from its header, before a frame is decoded: a downscaled copy is what to grade
    (large,) = [line for line in errors if "large.mkv" in line]
    assert large.endswith(f"; a copy scaled down grades the same: `ffmpeg -i {folder / 'large.mkv'} -vf "
                          f"scale=1920:-2 {folder / 'large_1080p.mkv'}`")  # fmt: skip
    assert not (tmp_path / "v" / "large").exists()
    assert (
        user_lines(err)[-1]
        == f"{len(expected)} input(s) failed and 1 image(s) and 4 video(s) were graded; see the errors above."
    )


def test_ctrl_c_mid_video_keeps_the_frames_so_far(run, clip, tmp_path, monkeypatch):
    grade_batch = videograde.grade_batch

    def interrupted_once_graded(*args):
        graded = grade_batch(*args)
        os.kill(os.getpid(), signal.SIGINT)  # handled by predict.py's GracefulStop: the video stops after this batch
        return graded

    monkeypatch.setattr(videograde, "grade_batch", interrupted_once_graded)
    code, out, err = cli("predict.py", clip, "--weights", run / "best.pt", "--device", "cpu", "--fps", "all",
                         "--batch-size", "8", "--video-out", tmp_path / "v")  # fmt: skip
    assert code == 130
    assert "SIGINT received: writing the results of the video so far" in err
    assert user_lines(err)[-1].startswith(f"interrupted: {clip} was graded up to 0.3 s; its results are in ")
    summary = json.loads((tmp_path / "v" / "clip" / "video.json").read_text())
    assert not summary["complete"] and summary["stopped"] == "stopped by SIGINT at 0.3 s"
    assert len(frames_of(tmp_path / "v" / "clip")) == 8 and "[incomplete: stopped by SIGINT at 0.3 s]" in out


def rotate_mp4(path, out):
    """A copy of an mp4 whose track header says: show it turned 90 degrees clockwise (a phone held upright)."""
    data = bytearray(Path(path).read_bytes())
    matrix = data.find(b"tkhd") + 4 + 40  # version 0: the matrix follows 40 bytes of times, ids and volume
    data[matrix : matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    Path(out).write_bytes(bytes(data))
    return Path(out)


def test_rotation_interlacing_and_a_variable_frame_rate(tmp_path):
    band = np.zeros((96, 160, 3), np.uint8)
    band[:, :40] = 255  # white on the left as stored: on top once turned clockwise
    turned = rotate_mp4(write_video(tmp_path / "wide.mp4", [([band], 1)], (160, 96)), tmp_path / "turned.mp4")
    video = open_video(turned)
    first = next(sample_frames(video, 5, 64))
    video.close()
    assert first.picture.shape == (106, 64, 3)  # upright: portrait, the shorter side at 64
    assert first.picture[0].mean() > 200 and first.picture[-1].mean() < 50

    interlaced = write_video(tmp_path / "interlaced.mkv", [([band], 1)], (160, 96),
                             options={"x264-params": "interlaced=1:tff=1"})  # fmt: skip
    video = open_video(interlaced)
    times = [frame.time for frame in sample_frames(video, 5, 64)]
    video.close()
    # each sample on its 1/5 s step, or up to two frames after it (non-reference frames are not decoded)
    assert times == pytest.approx([0, 0.2, 0.4, 0.6, 0.8], abs=0.085) and "deinterlaced (yadif)" in video.notes[0]

    # a variable frame rate: frames 10 to 100 ms apart; a sample is the first decoded frame of each 1/5 s
    container = av.open(str(tmp_path / "vfr.mkv"), "w")
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
    stream.codec_context.time_base = Fraction(1, 1000)
    pts, rng = 0, np.random.default_rng(0)
    for _ in range(60):
        frame = av.VideoFrame.from_ndarray(band, format="rgb24")
        frame.pts, frame.time_base = pts, Fraction(1, 1000)
        container.mux(stream.encode(frame))
        pts += int(rng.integers(10, 100))
    container.mux(stream.encode())
    container.close()
    video = open_video(tmp_path / "vfr.mkv")
    times = [frame.time for frame in sample_frames(video, 5, 64)]
    video.close()
    steps = [int(t * 5 + 1e-6) for t in times]
    assert steps == list(range(len(times))) and len(times) == pytest.approx(pts / 200, abs=1), times
    assert all(t - step / 5 < 0.2 for t, step in zip(times, steps)), times  # up to two 100 ms frames late
    sampler = Sampler(5)
    assert [sampler.take(t) for t in (0.0, 0.19, 0.21, 0.39, 0.41, 1.0, 1.05)] == [1, 0, 1, 0, 1, 1, 0]


OUTPUTS = {"frames.csv", "segments.csv", "video.json", "timeline.png", "strip.png", "report.html"}


def live_cli(*argv):
    """predict.py --live, at two frames a second (give --fps 2) and with one torch thread, so that a machine busy
    with other tests still grades most of them in time (a live grader drops the frames it cannot keep up with)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli("predict.py", "--live", *argv)
    finally:
        torch.set_num_threads(threads)


def test_live_mode_reads_a_file_at_its_rate_and_writes_the_outputs_of_offline_mode(run, clip, tmp_path):
    code, out, err = live_cli(clip, "--weights", run / "best.pt", "--device", "cpu", *SHORT, "--fps", "2",
                              "--video-out", tmp_path / "v")  # fmt: skip
    assert code == 0, err
    folder = tmp_path / "v" / "clip"
    assert {p.name for p in folder.iterdir()} == OUTPUTS
    summary = json.loads((folder / "video.json").read_text())
    assert summary["grade"] == "severe" and summary["complete"] and summary["seconds"] == pytest.approx(9.0, abs=0.6)
    worst = summary["worst_segment"]  # frames dropped on a busy machine move its ends by a frame or two
    assert min(worst["end"], SEVERE[1]) - max(worst["start"], SEVERE[0]) >= 2.0, worst
    live = summary["live"]
    assert live["frames_received"] == 18 and live["frames_dropped"] == 18 - summary["frames_graded"]
    assert live["latency_ms"]["median"] > 0 and summary["wall_seconds"] >= 8.5  # read at its own rate: 9 s
    rows = frames_of(folder)
    assert all(r["reason"] == "too dark" for r in rows if float(r["time"]) >= SEVERE[1] + 0.1)
    (line,) = user_lines(out)
    assert line.startswith(f"{clip}: severe (worst segment ") and line.endswith(f"-> {folder}/")
    assert user_lines(err)[0] == f"grading {clip} live; Ctrl-C stops and writes the results"


class WebServer(http.server.BaseHTTPRequestHandler):
    """The files of server.folder over HTTP, with the byte ranges asked for, as a web server sends them (FFmpeg
    reads an mp4's index, which PyAV writes at its end, before its frames), or the error server.status gives for
    a file's name. With server.stall_at set, a response
    stops at that byte and the server goes silent, as a stream that stopped sending. With server.silent_from set,
    that request (counted from 1) and every later one get no answer at all, until the test ends."""

    def do_GET(self):
        self.server.requests += 1
        if self.server.silent_from is not None and self.server.requests >= self.server.silent_from:
            self.server.released.wait(60)
            return
        path = self.server.folder / urllib.parse.urlsplit(self.path).path.lstrip("/")  # a query is not the file's
        if path.name in self.server.status:  # an error answered for that name
            self.send_error(self.server.status[path.name])
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, end = 0, len(data) - 1
        if asked := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start, end = int(asked[1]), int(asked[2] or end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        stall = self.server.stall_at
        with contextlib.suppress(ConnectionError):  # FFmpeg hangs up once it has what it needs
            self.wfile.write(data[start : end + 1 if stall is None else max(start, min(end + 1, stall))])
            if stall is not None and end + 1 > stall:
                self.wfile.flush()
                time.sleep(3)  # silent, far longer than the read timeout the test gives

    def log_message(self, *args):
        pass


@pytest.fixture
def web(tmp_path):
    """A web server on 127.0.0.1, in a thread, serving tmp_path / "web"; its url(name) is a file's address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WebServer)
    server.daemon_threads = True  # a stalled response is not waited for at the end
    server.folder, server.stall_at = tmp_path / "web", None
    server.requests, server.silent_from, server.released = 0, None, threading.Event()
    server.status = {}  # file name: the HTTP error answered for it
    server.folder.mkdir()
    server.url = lambda name: f"http://127.0.0.1:{server.server_port}/{name}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.released.set()
    server.shutdown()
    server.server_close()
    thread.join()


def test_live_mode_reads_a_stream_url_as_it_reads_a_file(run, data, web, tmp_path):
    make_video(web.folder / "clip.mp4", data, [("mild", 1), ("severe", 3)])
    # a password and a token in the URL are never printed nor written: *** stands for them
    secret = web.url("clip.mp4?token=abcTOKEN9&camera=2").replace("http://", "http://alice:s3cret@")
    url = web.url("clip.mp4?token=***&camera=***").replace("http://", "http://***@")
    code, out, err = live_cli(secret, "--weights", run / "best.pt", "--device", "cpu", "--min-gradable", "1",
                              "--fps", "2", "--video-out", tmp_path / "v")  # fmt: skip
    assert code == 0, err
    folder = tmp_path / "v" / "clip"  # named after the URL's file
    assert {p.name for p in folder.iterdir()} == OUTPUTS  # the strip too: a recording at a URL is fetched again
    summary = json.loads((folder / "video.json").read_text())
    assert summary["video"] == url and summary["grade"] == "severe" and summary["complete"]
    # a recording with a length is played at its own rate, as a file is (not fetched as fast as the network goes)
    assert summary["seconds"] == pytest.approx(4.0, abs=0.6) and summary["wall_seconds"] >= 3.5
    assert summary["live"]["frames_received"] == 8 and summary["worst_segment"]["grade"] == "severe"
    assert len(frames_of(folder)) == summary["frames_graded"] == 8 - summary["live"]["frames_dropped"]
    (line,) = user_lines(out)
    assert line.startswith(f"{url}: severe (worst segment ") and line.endswith(f"-> {folder}/")
    assert user_lines(err)[0] == f"grading {url} live; Ctrl-C stops and writes the results"
    code, _, gone_err = live_cli(secret.replace("clip.mp4", "gone.mp4"), "--weights", run / "best.pt", "--json")
    assert code == 2 and gone_err.startswith(f"error: --live {url.replace('clip.mp4', 'gone.mp4')}: the server answ")
    written = b"".join(path.read_bytes() for path in (tmp_path / "v").rglob("*") if path.is_file())
    for text in (out, err, gone_err, written.decode("latin-1")):
        assert "s3cret" not in text and "abcTOKEN9" not in text


def test_a_recording_at_a_url_without_a_length_is_paced_by_its_timestamps(run, data, web, tmp_path):
    make_video(web.folder / "raw.h264", data, [("severe", 2)])  # raw H.264: no header, so no duration
    code, out, err = live_cli(web.url("raw.h264"), "--weights", run / "best.pt", "--device", "cpu", "--fps", "2",
                              "--min-gradable", "0", "--video-out", tmp_path / "v", "--json")  # fmt: skip
    assert code == 0, err
    (summary,) = json.loads(out)["videos"]
    assert summary["input"]["duration"] is None and summary["complete"]
    # played at 25 frames/s as its timestamps say, not read as fast as the server sends it
    assert summary["live"]["frames_received"] == 4 and summary["wall_seconds"] >= 1.5


def test_a_stream_that_stops_sending_keeps_the_footage_so_far(run, data, web, tmp_path, monkeypatch):
    stream = make_video(web.folder / "stream.mkv", data, [("severe", 4)])
    web.stall_at = stream.stat().st_size // 2
    monkeypatch.setattr(live, "READ_TIMEOUT", 0.5)
    code, out, err = live_cli(web.url("stream.mkv"), "--weights", run / "best.pt", "--device", "cpu", "--fps", "2",
                              "--min-gradable", "0", "--video-out", tmp_path / "v")  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "v" / "stream" / "video.json").read_text())
    assert not summary["complete"] and 0 < summary["seconds"] < 4 and summary["frames_graded"] > 0
    assert re.fullmatch(r"the source cannot be read after \d+\.\d s \(nothing arrived for 0\.5 s\)", summary["stopped"])
    assert f"[incomplete: {summary['stopped']}]" in out


def test_a_server_silent_when_the_strip_is_fetched_again_only_costs_the_strip(run, data, web, tmp_path, monkeypatch):
    """The strip's frames of a recording at a URL are fetched again, from a seek; a server that never answers the
    seek's request (the third: the first plays the video, the second opens it again) ends in FFmpeg's rw_timeout,
    since PyAV's timeouts do not cover a seek, and the outputs are written without the strip."""
    make_video(web.folder / "clip.mkv", data, [("mild", 1), ("severe", 3)])
    web.silent_from = 3
    monkeypatch.setattr(live, "OPEN_TIMEOUT", 0.5)
    monkeypatch.setattr(live, "READ_TIMEOUT", 0.5)
    secret = web.url("clip.mkv?token=abcTOKEN9").replace("http://", "http://alice:s3cret@")
    code, out, err = live_cli(secret, "--weights", run / "best.pt", "--device", "cpu", "--fps", "2",
                              "--min-gradable", "1", "--video-out", tmp_path / "v", "--json")  # fmt: skip
    assert code == 0, err
    assert "s3cret" not in out + err and "abcTOKEN9" not in out + err  # nor in --json's summary
    folder = tmp_path / "v" / "clip"
    (summary,) = json.loads(out)["videos"]
    assert summary == json.loads((folder / "video.json").read_text())
    assert summary["grade"] == "severe" and summary["complete"] and web.requests >= 3
    assert not (folder / "strip.png").exists() and any(n.startswith("strip.png was not made") for n in summary["notes"])


@pytest.fixture
def https_web(web, tmp_path):
    """The web server behind TLS, with a self-signed certificate for 127.0.0.1 (made by the openssl command)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                               "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                              capture_output=True)  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no openssl command to make a certificate with")
    if made.returncode != 0:
        pytest.skip(f"openssl could not make a certificate: {made.stderr[-300:]}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    web.socket = context.wrap_socket(web.socket, server_side=True)
    web.cert = cert
    web.url = lambda name: f"https://127.0.0.1:{web.server_port}/{name}"
    return web


def test_an_https_certificate_is_checked_against_the_systems(run, data, https_web, tmp_path, monkeypatch):
    make_video(https_web.folder / "clip.mp4", data, [("severe", 1)])
    url = https_web.url("clip.mp4")
    code, out, err = cli("predict.py", "--live", url, "--weights", run / "best.pt", "--device", "cpu",
                         "--video-out", tmp_path / "v").lines()  # fmt: skip
    assert (code, out) == (2, []) and err == [
        f"error: --live {url}: its certificate could not be verified (self-signed, expired or for another host); "
        "check the URL, or add the server's CA certificate to the system's (or point SSL_CERT_FILE at it)."
    ]
    monkeypatch.setenv("SSL_CERT_FILE", str(https_web.cert))  # the certificate trusted: the stream is graded
    options = live.live_source(url).av_arguments()["options"]
    assert (options["tls_verify"], options["ca_file"]) == ("1", str(https_web.cert))
    code, out, err = live_cli(url, "--weights", run / "best.pt", "--device", "cpu", "--fps", "2",
                              "--min-gradable", "0", "--video-out", tmp_path / "v", "--json")  # fmt: skip
    assert code == 0, err
    (summary,) = json.loads(out)["videos"]
    assert summary["complete"] and summary["frames_graded"] == 2 - summary["live"]["frames_dropped"] > 0
    assert not any("certificate" in note for note in summary["notes"])


def test_a_stream_that_opens_but_sends_no_frame_says_why_and_leaves_no_folder(run, data, web, tmp_path, monkeypatch):
    stream = make_video(web.folder / "stream.mkv", data, [("severe", 4)])
    web.stall_at = stream.read_bytes().find(b"\x1f\x43\xb6\x75") + 100  # the header, then silence in the first frame
    monkeypatch.setattr(live, "OPEN_TIMEOUT", 0.5)
    monkeypatch.setattr(live, "READ_TIMEOUT", 0.5)
    code, out, err = cli("predict.py", "--live", web.url("stream.mkv"), "--weights", run / "best.pt", "--device",
                         "cpu", "--video-out", tmp_path / "v").lines()  # fmt: skip
    assert (code, out) == (2, []) and err[-1] == (
        f"error: --live {web.url('stream.mkv')}: no frame arrived: the source cannot be read after 0.0 s (nothing "
        "arrived for 0.5 s); check that the stream is running and sends video."
    ), err
    assert list((tmp_path / "v").iterdir()) == []  # no results folder with only a header row


def test_ctrl_c_while_a_url_is_opening_stops_at_once(run, tmp_path):
    """FFmpeg waits for a server that never answers until its open timeout (10 s); Ctrl-C ends the wait at once."""
    silent = socket.socket()  # takes the connection, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/clip.mp4"

    def ctrl_c_once_connected():
        connections.append(silent.accept()[0])  # FFmpeg is waiting for the answer
        os.kill(os.getpid(), signal.SIGINT)

    connections = []

    interrupter = threading.Thread(target=ctrl_c_once_connected, daemon=True)
    interrupter.start()
    try:
        code, out, err = cli("predict.py", "--live", url, "--weights", run / "best.pt", "--device", "cpu",
                             "--video-out", tmp_path / "v").lines()  # fmt: skip
    finally:
        interrupter.join(1)
        for connection in [*connections, silent]:
            connection.close()
    assert (code, out) == (130, []) and err == [
        "SIGINT received: no longer waiting for the source to open (Ctrl-C again stops at once).",
        f"interrupted: stopped by SIGINT while {url} was opening; nothing was graded.",
    ]
    assert not (tmp_path / "v").exists()


def unused_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_live_source_that_cannot_be_opened_is_one_sentence(run, data, web, tmp_path, monkeypatch):
    """A URL refused, missing or silent, a capture device that is not there or not a camera, and frames larger than
    4K: each one sentence that says what to check, exit code 2, quickly (the open timeout is cut to 0.5 s)."""
    monkeypatch.setattr(live, "OPEN_TIMEOUT", 0.5)
    silent = socket.socket()  # takes the connection, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    large = write_video(web.folder / "large.mkv", [(pictures(data, "black"), 0.04)], (7680, 4320), codec="mjpeg")
    no_camera = next(f"/dev/video{n}" for n in range(64, 256) if not os.path.exists(f"/dev/video{n}"))
    web.status = {"busy.mp4": 503, "gone.mp4": 410}
    (web.folder / "empty.mp4").write_bytes(b"")
    (web.folder / "page.mp4").write_text("<!DOCTYPE html><html><body>Sign in</body></html>\n" * 20)
    expected = {
        web.url("missing.mp4"): "the server answered 404 Not Found; check the URL.",
        web.url("busy.mp4"): "the server answered 503 Service Unavailable; try again later.",
        web.url("gone.mp4"): "the server answered 410 Gone; check the URL.",
        "http://no-such-host.invalid/clip.mp4": "there is no such host (no-such-host.invalid); check the URL and the "
        "network.",
        web.url("empty.mp4"): "what the server sent is not a video (empty, or a web page); check the URL.",
        web.url("page.mp4"): "what the server sent is not a video (empty, or a web page); check the URL.",
        f"http://127.0.0.1:{unused_port()}/clip.mp4": "the connection was refused, so nothing serves at that host "
        "and port; check the URL and that the stream is running.",
        f"http://127.0.0.1:{silent.getsockname()[1]}/clip.mp4": "no answer within 0.5 s; check the URL, the network "
        "and that the stream is running.",
        no_camera: "there is no such capture device; ls /dev/video* lists the cameras connected (in a container, "
        "pass the camera in, as docker run --device does).",
        "/dev/null": "it is not a video capture device; ls /dev/video* lists the devices (a camera often adds a "
        "second one that carries only metadata, and v4l2-ctl --list-devices tells them apart).",
        web.url("large.mkv"): "its 7680x4320 px frames are larger than any clinical endoscope records (4K: 4096 px a "
        "side), and each would take 16 times as long to decode as 1080p for a model that sees it scaled down; set the "
        "camera or the stream to 1080p.",
        large: "its 7680x4320 px frames are larger than any clinical endoscope records",  # a file: ffmpeg's command
    }
    try:
        for source, sentence in expected.items():
            code, out, err = cli("predict.py", "--live", source, "--weights", run / "best.pt", "--device", "cpu",
                                 "--video-out", tmp_path / "v").lines()  # fmt: skip
            assert code == 2 and out == [] and len(err) == 1, (source, err)
            assert err[0].startswith(f"error: --live {source}: {sentence}"), (source, err)
    finally:
        silent.close()
    assert err[0].endswith(f"`ffmpeg -i {large} -vf scale=1920:-2 {large.with_name('large_1080p.mkv')}`.")
    assert len(err[0].split(f"{large}: ")[1].split("`")[0]) < 230, err[0]  # the words a reader takes in before it
    assert not (tmp_path / "v").exists()  # no results folder for a source that never gave a frame
    code, out, err = cli("predict.py", "--live", "http://[::1/x.mp4", "--weights", run / "best.pt").lines()
    assert (code, out, err) == (
        2,
        [],
        ["error: --live: the URL is not valid (Invalid IPv6 URL); check how it is written."],
    )


def test_how_a_live_source_is_opened():
    """What av.open is given for each kind of source: a capture device needs format v4l2, since FFmpeg cannot
    guess it from a path (its open is tested above, on a device that is not there and on one that is no camera)."""
    for device in ("/dev/video0", "/dev/null", "/dev/v4l/by-id/usb-Olympus_Corp._CV-190-video-index0"):
        source = live.live_source(device)  # a character device, or a path under /dev that is not there
        assert (source.kind, source.folder, source.av_arguments()) == ("device", "live", {"format": "v4l2"}), device
    rtsp = live.live_source("rtsp://endoscope.local:554/stream1")
    assert (rtsp.kind, rtsp.folder) == ("url", "stream1")
    assert rtsp.av_arguments() == {"timeout": (10.0, 10.0), "options": {"rw_timeout": "20000000"}}
    https = live.live_source("https://endoscope.local/clip.mp4").av_arguments()["options"]
    assert https["tls_verify"] == "1" and os.path.isfile(https["ca_file"])  # the system's CA bundle
    assert [live.live_source(url).folder for url in ("http://10.0.0.5/", "https://h/a%20b.m3u8", "http://h/..")] == [
        "10.0.0.5", "a_b", "h",
    ]  # fmt: skip
    assert live.live_source(f"http://h/{'é' * 300}.mp4").folder == "é" * 80  # a name a file system takes
    for path in ("clip.mp4", "/dev/shm/clip.mp4"):
        source = live.live_source(path)
        assert (source.kind, source.folder, source.av_arguments()) == ("file", "clip", {}), path


def test_video_level_evaluation_scores_the_videos_grades_with_intervals(run, data, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    make_video(folder / "a.mp4", data, [("severe", 3)])
    make_video(folder / "b.mkv", data, [("mild", 3)])
    make_video(folder / "c.mp4", data, [("mild", 2), ("severe", 2.5)])
    labels = tmp_path / "videos.csv"
    labels.write_text("path,grade,patient\na.mp4,severe,p1\nb.mkv,mild,p2\nc.mp4,severe,p2\n")
    code, out, err = cli("predict.py", folder, "--evaluate", "--labels", labels, "--weights", run / "best.pt",
                         "--device", "cpu", "--min-gradable", "1", "--remission-upto", "mild",
                         "--eval-out", tmp_path / "eval")  # fmt: skip
    assert code == 0, err
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["num_images"] == 3 and result["evaluated"] == "videos"
    assert result["accuracy"] == 1.0 and result["qwk"] == 1.0 and result["confusion_matrix"] == [[1, 0], [0, 2]]
    assert result["bootstrap"]["unit"] == "patient" and set(result["intervals"]) >= {"accuracy", "qwk"}
    assert result["remission"]["sensitivity"] == result["remission"]["specificity"] == 1.0 and "patient_level" in result
    assert result["mean_probability_rule"]["accuracy"] in (2 / 3, 1.0)
    predictions = files.read_csv(tmp_path / "eval" / "predictions.csv")
    assert [(r["path"], r["true"], r["predicted"]) for r in predictions] == [
        ("a.mp4", "severe", "severe"), ("b.mkv", "mild", "mild"), ("c.mp4", "severe", "severe"),
    ]  # fmt: skip
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Each video" in page and 'href="videos/c/report.html"' in page and "Most confidently wrong" not in page
    assert (tmp_path / "eval" / "videos" / "c" / "report.html").is_file()
    assert "test results in" not in out and f"video results in {tmp_path / 'eval'}" in out

    bad = tmp_path / "bad.csv"
    bad.write_text("path,grade\na.mp4,grade9\n")
    code, _, lines = cli("predict.py", folder, "--evaluate", "--labels", bad, "--weights", run / "best.pt").lines()
    assert code == 2 and lines == [
        f"error: --labels file '{bad}', row 2: 'grade9' is not a grade of the model (mild, severe)."
    ]


def test_a_frame_scaled_in_the_decoder_gives_the_crop_of_a_full_size_picture(tmp_path):
    """The decoder's scaling stands in for images.resize_shorter_side: the same crop within a few grey levels."""
    from ucgrade.images import center_crop, preprocess

    picture = make_image("severe", np.random.default_rng(0), 1080)
    video = open_video(write_video(tmp_path / "hd.mp4", [([picture], 0.08)], (1920, 1080)))
    frame = next(iter(video.container.decode(video.stream)))
    full = Image.fromarray(frame.to_ndarray(format="rgb24"))  # the same decoded pixels, at full size
    video.close()
    video = open_video(tmp_path / "hd.mp4")
    scaled = next(sample_frames(video, 5, 256)).picture
    video.close()
    assert scaled.shape == (256, 455, 3)  # as resize_shorter_side: 256 x int(256 * 1920 / 1080)
    ours = center_crop(scaled, 224).transpose(2, 0, 1).astype(int)
    difference = np.abs(ours - preprocess(full, 224, 256).astype(int))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 4, (difference.mean(), difference.max())


def test_each_reason_a_frame_cannot_be_graded():
    """quality.reasons on crops as the grader makes them: dark, white-out, blurred, flagged, and a good frame."""
    from PIL import ImageFilter

    from ucgrade.images import preprocess
    from ucgrade.quality import Thresholds, measure, reasons

    picture = make_image("severe", np.random.default_rng(1), 256)
    pictures = [
        Image.new("RGB", (256, 256)),  # the light off
        Image.new("RGB", (256, 256), (255, 255, 252)),  # against the wall
        picture.filter(ImageFilter.GaussianBlur(8)),  # 4 px at the model's scale: out of focus
        picture,  # sharp, but flagged by the model's check below
        picture,
    ]
    crops = np.stack([preprocess(p, 224, 256) for p in pictures])
    brightness, clipped, sharpness = measure(crops)
    assert brightness[0] == 0 and clipped[1] == 1 and sharpness[2] < 8 <= sharpness[4]
    flagged = [False, False, False, True, False]
    assert reasons(brightness, clipped, sharpness, flagged, Thresholds()) == [
        "too dark", "overexposed", "blurred", "not like the training images", "",
    ]  # fmt: skip
    assert reasons(brightness, clipped, sharpness, None, Thresholds(dark=0, overexposed=1, blur=0)) == [""] * 5


def test_segments_bridge_a_blurred_moment_but_never_spread_over_a_dark_stretch():
    from ucgrade.timeline import UNGRADABLE, segments

    def cut(*runs):  # (label, frames) at 5 frames/s
        labels = np.concatenate([[label] * n for label, n in runs])
        times = np.arange(len(labels)) / 5
        found = segments(times, np.full(len(labels), 0.2), labels, labels != UNGRADABLE, 2.0)
        return [(s.label, round(s.start, 1), round(s.end, 1), round(s.gradable_seconds, 1)) for s in found]

    # a dark stretch just under --min-segment at the end stays ungradable instead of joining the severe one
    assert cut((0, 20), (2, 17), (UNGRADABLE, 8)) == [(0, 0, 4, 4), (2, 4, 7.4, 3.4), (UNGRADABLE, 7.4, 9, 0)]
    # one blurred frame inside a severe stretch does not cut it in two halves too short to count
    assert cut((0, 20), (2, 7), (UNGRADABLE, 1), (2, 7)) == [(0, 0, 4, 4), (2, 4, 7, 2.8)]
    # a severe second amid mild is not a segment
    assert cut((0, 20), (2, 5), (0, 20)) == [(0, 0, 9, 9)]
