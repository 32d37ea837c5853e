"""Videos without torch: open a video file with PyAV (ucgrade.live opens a live source), and sample its frames as
small RGB pictures.

PyAV's wheels bring FFmpeg, so a grading-only install (requirements-predict.txt) decodes mp4, mov, avi and
mkv files in H.264, HEVC or MJPEG without a system ffmpeg. Every frame is decoded, as far as the codec needs,
but only the sampled ones (--fps) are converted to RGB, and in the decoder at the size the grader crops from
(the shorter side at the model's resize_size), so a 1080p frame is never resized at full size in Python.
Rotation metadata, non-square pixels and interlacing are applied here; a frame's time is its presentation
time, so a variable frame rate samples evenly in time.
"""

import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import NOT_REGULAR, is_regular_file

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".wmv")
MIN_SIDE = 64  # px: a smaller picture upscaled to the model's 224 px holds nothing to grade; endoscopes record 480+
LARGE_SIDE = 4096  # px: no clinical endoscope records more (4K), and an 8K frame costs 16 times a 1080p one to decode
# the first bytes of the containers, to tell a damaged video (its header unreadable) from a file that is no video
CONTAINER_MAGIC = {b"ftyp": 4, b"RIFF": 0, b"\x1a\x45\xdf\xa3": 0, b"OggS": 0, b"\x00\x00\x01\xba": 0}
STILL_FORMATS = ("image2", "_pipe")  # FFmpeg's demuxers of single pictures: a .jpg renamed .mp4


class VideoError(Exception):
    """A video that cannot be graded at all; the message says why in one sentence."""


def is_video_file(path):
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass
class Frame:
    """One sampled frame: its index among the decoded frames, its time from the start (s), and the picture
    (H x W x 3 uint8, upright, the shorter side at the size asked for)."""

    index: int
    time: float
    picture: np.ndarray


@dataclass
class Video:
    """An open video: the PyAV container and its video stream, and what its header says."""

    name: str
    container: object
    stream: object
    width: int
    height: int
    codec: str
    rate: float  # frames per second, as the header gives it (the average over a variable rate)
    duration: float  # seconds, or None when the header does not say (a live source)
    live: bool = False  # a capture device or a stream URL, not a file
    notes: list = field(default_factory=list)  # one sentence each, for the user
    stopped: str = None  # why decoding ended before the end of the stream, with the time
    damaged: int = 0  # packets that could not be decoded and were skipped
    last_time: float = 0.0  # s: the presentation time of the last decoded frame

    def check_end(self):
        """After the last frame: a stream that ends well before the duration its header gives was cut short."""
        last_time = self.last_time
        if self.stopped is None and self.duration and last_time + max(2 / self.rate, 0.5) < self.duration:
            self.stopped = (
                f"the video ends at {last_time:.1f} s of the {self.duration:.1f} s its header gives: the file is cut "
                "short or damaged from there, and the frames before were graded"
            )

    def close(self):
        self.container.close()


def _av():
    import av

    return av


def open_video(path):
    """Open a video file for decoding; VideoError if it cannot be graded at all (live sources: ucgrade.live)."""
    av = _av()
    check_file(Path(path))
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FileNotFoundError:
        raise VideoError("no such file") from None
    except av.error.PermissionError:
        raise VideoError("permission denied") from None
    except (av.error.FFmpegError, UnicodeDecodeError) as error:
        raise VideoError(unreadable_reason(path, error)) from None
    try:
        return describe(str(path), container)
    except Exception:
        container.close()
        raise


def check_file(path):
    if not path.exists():
        raise VideoError("no such file")
    if path.is_dir():
        raise VideoError("is a folder, not a video")
    if not is_regular_file(path):
        raise VideoError(NOT_REGULAR)
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")


def unreadable_reason(path, error):
    reason = getattr(error, "strerror", None) or str(error)
    with open(path, "rb") as f:
        head = f.read(12)
    if head[4:8] == b"ftyp" and has_mp4_index(path) is False:
        return (
            "the video has no index (its 'moov' box), which an mp4 or mov recording keeps at its end, so it was cut "
            "short before it was finished and no frame can be found in it; copy it again from the recorder"
        )
    if any(head[at : at + len(magic)] == magic for magic, at in CONTAINER_MAGIC.items()):
        return f"the video's header is corrupt ({reason}); the file may be damaged or cut short, so copy it again"
    return f"not a video FFmpeg can read ({reason})"


def has_mp4_index(path):
    """Whether an mp4 or mov file has its moov box, found by walking its top-level boxes (no full read): True,
    False when a box runs past the end of the file (a recording cut short), None when the boxes are garbage."""
    size_of_file = os.path.getsize(path)
    with open(path, "rb") as f:
        at = 0
        while at + 8 <= size_of_file:
            f.seek(at)
            header = f.read(16)
            size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if kind == b"moov":
                return True
            if size == 1 and len(header) == 16:
                size = int.from_bytes(header[8:16], "big")
            if size == 0 and kind.isalnum():  # the last box, which runs to the end of the file
                return False
            if size < 8 or not kind.isalnum():
                return None
            at += size
    return False


def describe(name, container, live=False):
    """The Video of an open container: its first video stream, checked for what can be graded (its frame size from
    the header, before any frame is decoded)."""
    format_name = container.format.name or ""
    if any(part in format_name for part in STILL_FORMATS):
        raise VideoError("is a still picture, not a video; grade it as an image, with its image file extension")
    if not container.streams.video:
        has_audio = bool(container.streams.audio)
        raise VideoError("has sound but no video stream" if has_audio else "has no video stream")
    stream = container.streams.video[0]
    context = stream.codec_context
    if context is None or not getattr(context, "name", None):
        raise VideoError(
            "its video codec is unknown to FFmpeg (a proprietary or damaged format), so its frames cannot be "
            "decoded; export the video from the recorder as H.264 (mp4)"
        )
    width, height = context.width, context.height
    if width and height:
        check_size(width, height, name, live)
    stream.thread_type = "AUTO"  # FFmpeg's frame and slice threads: decoding keeps pace with the model
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    rate = float(rate) if rate else 25.0
    return Video(name, container, stream, width, height, context.name, rate, duration, live)


def check_size(width, height, name, live):
    """VideoError for frames too small to grade, or larger than any endoscope records (refused rather than decoded
    at 16 times the cost of 1080p: the model sees each frame scaled down to its input anyway)."""
    if min(width, height) < MIN_SIDE:
        raise VideoError(
            f"its {width}x{height} px frames are too small to grade (at least {MIN_SIDE} px a side; endoscopes "
            "record 480 px or more)"
        )
    if max(width, height) <= LARGE_SIDE:
        return
    if live:
        remedy = "set the camera or the stream to 1080p"
    else:
        scale = "1920:-2" if width >= height else "-2:1920"  # the longer side at 1920 px
        copy = Path(name).with_name(f"{Path(name).stem}_1080p{Path(name).suffix}")
        # in backticks: the sentence's full stop is not pasted with the command
        remedy = f"a copy scaled down grades the same: `ffmpeg -i {shlex.quote(name)} -vf scale={scale} "
        remedy += f"{shlex.quote(str(copy))}`"
    raise VideoError(
        f"its {width}x{height} px frames are larger than any clinical endoscope records (4K: {LARGE_SIDE} px a side), "
        f"and each would take {width * height / (1920 * 1080):.0f} times as long to decode as 1080p for a model that "
        f"sees it scaled down; {remedy}"
    )


# ----------------------------------------------------------------------------- sampling frames


def display_size(frame, stream):
    """(width, height) of a stored frame as shown: non-square pixels stretched (before any rotation)."""
    aspect = stream.codec_context.sample_aspect_ratio
    width = frame.width
    if aspect and aspect.numerator > 0 and aspect.denominator > 0 and aspect != 1:
        width = max(1, round(frame.width * float(aspect)))
    return width, frame.height


def scaled_size(width, height, shorter):
    """The size images.resize_shorter_side gives: the shorter side at shorter, the longer truncated."""
    short, long = min(width, height), max(width, height)
    new_long = int(shorter * long / short)
    return (shorter, new_long) if width <= height else (new_long, shorter)


def to_picture(frame, stream, shorter):
    """A frame as an upright RGB array whose shorter side is shorter, resized in the decoder's scaler
    (swscale's bilinear filter, which matches Pillow's antialiased bilinear resize within a few grey levels)."""
    width, height = scaled_size(*display_size(frame, stream), shorter)
    picture = frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="BILINEAR")
    turns = round((frame.rotation or 0) / 90) % 4  # counterclockwise quarter turns that make it upright
    return np.ascontiguousarray(np.rot90(picture, turns)) if turns else picture


class Deinterlacer:
    """FFmpeg's yadif filter, one output frame per input frame, for a stream whose frames are interlaced."""

    def __init__(self, stream):
        av = _av()
        self.graph = av.filter.Graph()
        source = self.graph.add_buffer(template=stream)
        yadif = self.graph.add("yadif", "mode=send_frame:parity=auto:deint=interlaced")
        source.link_to(yadif)
        yadif.link_to(self.graph.add("buffersink"))
        self.graph.configure()

    def __call__(self, frame):
        """The deinterlaced frames ready after frame (None: the end of the stream, which flushes the filter)."""
        av = _av()
        self.graph.push(frame)
        out = []
        while True:
            try:
                out.append(self.graph.pull())
            except (BlockingIOError, EOFError, av.error.EOFError):
                return out
            except av.error.FFmpegError as error:
                if getattr(error, "errno", None) in (11, 35):  # EAGAIN: it waits for the next frame
                    return out
                raise


def decoded_frames(video):
    """Every decoded frame of the video's stream, in presentation order. A damaged packet is skipped and counted;
    a container that cannot be read any further ends the frames, and video.stopped says where."""
    av = _av()
    packets = video.container.demux(video.stream)
    last_time = 0.0
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except (av.error.FFmpegError, OSError) as error:
            reason = short_reason(error)
            if isinstance(error, av.error.ExitError):  # a stream that sent nothing for its read timeout
                reason = f"nothing arrived for {video.container.read_timeout:g} s"
            video.stopped = (
                f"the {'source' if video.live else 'file'} cannot be read after {last_time:.1f} s ({reason})"
            )
            return
        try:
            frames = packet.decode()
        except (av.error.FFmpegError, ValueError) as error:
            video.damaged += 1
            if video.damaged == 1:
                video.notes.append(f"damaged data from {last_time:.1f} s was skipped ({short_reason(error)})")
            continue
        for frame in frames:
            if frame.time is not None:
                last_time = frame.time
            yield frame


def short_reason(error):
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0][:120]


class Sampler:
    """Which frames to grade: fps None takes every frame, else the first frame at or after each 1/fps step of
    presentation time, so that a variable frame rate and dropped frames still sample evenly in time."""

    def __init__(self, fps):
        self.fps = fps
        self.next_time = -math.inf

    def take(self, time):
        if self.fps is None:
            return True
        if time + 1e-6 < self.next_time:
            return False
        # the next step on the grid of 1/fps, not time + 1/fps: the sampling does not drift with jitter
        self.next_time = (math.floor(time * self.fps + 1e-6) + 1) / self.fps
        return True


def timed_frames(video):
    """(index, time from the start of the video in s, PyAV frame) of each decoded frame, deinterlaced."""
    origin = None
    for index, frame in enumerate(interlace_aware(video)):
        if origin is None:
            start = video.stream.start_time
            origin = float(start * video.stream.time_base) if start is not None else (frame.time or 0.0)
        video.last_time = (frame.time - origin) if frame.time is not None else index / video.rate
        yield index, video.last_time, frame


def sample_frames(video, fps, shorter):
    """Yield a Frame for each sampled frame of an open Video, its picture's shorter side at shorter.

    When at most every other frame is sampled, the decoder skips the frames that no other frame refers to (the
    non-reference B-frames of H.264 and HEVC): they are decoded for nothing, and a sample then falls on the
    next reference frame, a frame or two (40-80 ms at 25 frames/s) after its step."""
    skipping = fps is not None and 2 * fps <= video.rate
    if skipping:
        video.stream.codec_context.skip_frame = "NONREF"
    sampler = Sampler(fps)
    for index, time, frame in timed_frames(video):
        if sampler.take(time):
            number = round(time * video.rate) if skipping else index  # the skipped frames are not counted
            yield Frame(number, round(time, 6), to_picture(frame, video.stream, shorter))


def pictures_at(reopen, times, shorter):
    """{time: picture} of the frames of a video at these times (as sample_frames gave them), decoded again from a
    seek to the keyframe before the first; reopen() opens the video again (a file, or a recording at a URL)."""
    wanted = sorted(times)
    if not wanted:
        return {}
    av = _av()
    video = reopen()
    found = {}
    try:
        stream, tolerance = video.stream, 0.5 / video.rate
        if stream.start_time is not None and stream.time_base:
            target = wanted[0] + float(stream.start_time * stream.time_base)
            try:
                video.container.seek(int(target / stream.time_base), stream=stream, backward=True)
            except av.error.FFmpegError as error:  # a server that cannot send a part of the file
                raise VideoError(f"it cannot be searched ({short_reason(error)})") from None
        for _, time, frame in timed_frames(video):
            near = [t for t in wanted if abs(t - time) <= tolerance and t not in found]
            for t in near:
                found[t] = to_picture(frame, stream, shorter)
            if time > wanted[-1] + tolerance or len(found) == len(wanted):
                break
    finally:
        video.close()
    return found


def interlace_aware(video):
    """The decoded frames, deinterlaced by yadif from the first frame that says it is interlaced."""
    deinterlace = None
    for frame in decoded_frames(video):
        if deinterlace is None and frame.interlaced_frame:
            deinterlace = Deinterlacer(video.stream)
            video.notes.append("its frames are interlaced, so they were deinterlaced (yadif) before grading")
        if deinterlace is None:
            yield frame
        else:
            yield from deinterlace(frame)
    if deinterlace is not None:
        yield from deinterlace(None)


def frame_batches(frames, size):
    """Lists of up to size frames from an iterator of frames: only one batch of pictures is held at a time."""
    batch = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
