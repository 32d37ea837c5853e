"""Live grading: `python predict.py --live /dev/video0` (a capture device, through PyAV's v4l2) or a stream URL.

A reader thread decodes the source as it plays and keeps only the newest sampled frame; the grader takes
it when it is free, so when grading falls behind, frames are dropped rather than the grade lagging, and the
latency (from a frame's arrival to its grade) is measured. The terminal shows the current smoothed grade
and the worst segment so far. When the source ends or on Ctrl-C, the footage so far gets the outputs of a
video file (ucgrade.videoout), from the same timeline. Anything but a camera (a file, a URL) is read at its own
frame rate, by its timestamps, as a camera would deliver it: that is how the tests run the live mode.
A source that cannot be opened (no such device, not a capture device, a URL refused, missing or silent) is
one sentence that says what to check.
"""

import base64
import errno
import functools
import http
import http.client
import json
import os
import re
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from . import files, timeline, videoout
from .cli import UserError
from .interrupt import GracefulStop
from .video import (
    Frame,
    Sampler,
    VideoError,
    describe,
    is_video_file,
    open_video,
    short_reason,
    timed_frames,
    to_picture,
)
from .videograde import grade_batch, video_settings

STATUS_EVERY = 1.0  # s between two status lines on a terminal (10 s when the output is a file)
OPEN_TIMEOUT = 10.0  # s: a stream URL that has not answered by then is reported, not waited for
FOLDER_NAME = 80  # characters at most of a results folder named after a URL
READ_TIMEOUT = 10.0  # s: a stream that sends nothing for this long has stopped; the footage so far is kept


@dataclass
class Arrival:
    frame: Frame
    arrived: float  # time.perf_counter() when the reader had it


class Newest:
    """The newest sampled frame, handed from the reader thread to the grader; an unread one is dropped."""

    def __init__(self):
        self.condition = threading.Condition()
        self.item, self.done, self.error = None, False, None
        self.received = self.dropped = 0
        self.stop = threading.Event()

    def put(self, item):
        with self.condition:
            self.dropped += self.item is not None
            self.item = item
            self.received += 1
            self.condition.notify()

    def finish(self, error=None):
        with self.condition:
            self.done, self.error = True, error
            self.condition.notify()

    def take(self, timeout):
        """The newest frame, None after timeout seconds without one, or None once the source has ended."""
        with self.condition:
            self.condition.wait_for(lambda: self.item is not None or self.done, timeout)
            item, self.item = self.item, None
            return item


def read_source(video, fps, shorter, newest, paced):
    """The reader thread: decode the source, sample it, and hand on each sampled frame at once (paced: when its
    time comes, counted from the first frame, as a camera would)."""
    sampler, started = Sampler(fps), None
    try:
        for index, at, frame in timed_frames(video):
            if newest.stop.is_set():
                break
            started = time.perf_counter() - at if started is None else started
            if paced and (wait := started + at - time.perf_counter()) > 0:
                time.sleep(wait)
            if sampler.take(at):
                newest.put(
                    Arrival(Frame(index, round(at, 6), to_picture(frame, video.stream, shorter)), time.perf_counter())
                )
        newest.finish()
    except Exception as error:  # a source that fails mid-stream ends the footage; what was graded is kept
        newest.finish(error)


@dataclass
class LiveSource:
    """What --live SOURCE is: a file, a capture device (opened through v4l2) or a stream URL."""

    text: str  # as given: only av.open sees it
    kind: str  # "file", "device" or "url"
    folder: str  # the name of its results folder
    shown: str = None  # as printed and written: a URL without its password and query values (tokens)

    def __post_init__(self):
        if self.shown is None:
            self.shown = display_url(self.text) if self.kind == "url" else self.text

    def av_arguments(self):
        """The keyword arguments of av.open, beside the source's name: FFmpeg finds a device path's format only
        when told it (v4l2), and a URL gets timeouts, so that a silent server is a sentence, not a hang."""
        if self.kind == "device":
            return {"format": "v4l2"}
        if self.kind == "url":
            # PyAV's timeouts cover opening and reading, not a seek (the strip's frames of a recording): FFmpeg's
            # own rw_timeout (in microseconds) ends any wait for the network, a little after PyAV's would
            wait = 2 * max(OPEN_TIMEOUT, READ_TIMEOUT)
            options = {"rw_timeout": str(round(wait * 1e6))}
            # FFmpeg checks no certificate unless told to, and with no CA bundle of its own
            if ca_file := self.verified_with():
                options |= {"tls_verify": "1", "ca_file": ca_file}
            return {"timeout": (OPEN_TIMEOUT, READ_TIMEOUT), "options": options}
        return {}

    def verified_with(self):
        """The CA bundle an https URL's certificate is checked with; None for other sources, or when there is none."""
        return ca_bundle() if self.kind == "url" and self.text.lower().startswith("https://") else None


def ca_bundle():
    """The system's CA certificates, as Python finds them (SSL_CERT_FILE first), or a usual place; None if none."""
    paths = ssl.get_default_verify_paths()
    usual = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
    for path in (paths.cafile, os.environ.get("SSL_CERT_FILE"), paths.openssl_cafile, *usual):
        if path and os.path.isfile(path):
            return path
    return None


def live_source(source):
    """The LiveSource of --live SOURCE: a URL has a scheme (rtsp://, http://); a character device (/dev/video0, or
    a /dev/v4l/by-id/ link to one), or a path under /dev that is not there, is a capture device; else a file."""
    if "://" in source:
        return LiveSource(source, "url", url_folder(source))
    try:
        device = stat.S_ISCHR(os.stat(source).st_mode)
    except OSError:  # not there: /dev/video0 is a camera unplugged, /dev/shm/clip.mp4 a file
        device = Path(source).parts[:2] == ("/", "dev") and not is_video_file(source)
    return LiveSource(source, "device", "live") if device else LiveSource(source, "file", Path(source).stem or "live")


def display_url(url):
    """A URL as it may be printed and written in the results: a user and password become ***, and the values of
    its query (where tokens go) *** too; the fragment is dropped."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc if "@" not in parts.netloc else "***@" + parts.netloc.rpartition("@")[2]
    query = "&".join(f"{name}=***" for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if parts.query and not query:
        query = "***"  # a query that is not name=value pairs is masked whole
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_folder(url):
    """A URL's results folder: the name of the file in its path without the extension (clip for .../clip.mp4), or
    its host, as a plain folder name."""
    parts = urllib.parse.urlsplit(url)
    names = (PurePosixPath(urllib.parse.unquote(parts.path)).stem, parts.hostname or "")
    # at most FOLDER_NAME characters: a file system refuses a name over 255 bytes ("File name too long")
    plain = (re.sub(r"[^\w.-]+", "_", name)[:FOLDER_NAME].strip("._") for name in names)
    return next((name for name in plain if name), "live")


def open_source(live):
    """The open Video of a live source; VideoError, one sentence that says what to check, if it cannot be opened."""
    if live.kind == "file":
        return open_video(live.text)
    import av

    try:
        container = av.open(live.text, metadata_errors="ignore", **live.av_arguments())
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as error:  # ValueError: an FFmpeg without v4l2
        raise VideoError(device_problem(error) if live.kind == "device" else url_problem(error, live)) from None
    try:
        video = describe(live.shown, container, live=True)
    except Exception:
        container.close()
        raise
    if live.text.lower().startswith("https://") and live.verified_with() is None:
        video.notes.append("the server's certificate was not checked: no CA bundle was found (set SSL_CERT_FILE)")
    return video


def device_problem(error):
    """Why a capture device could not be opened, and what to check."""
    number = getattr(error, "errno", None)
    if number == errno.ENOENT:
        return (
            "there is no such capture device; ls /dev/video* lists the cameras connected (in a container, pass the "
            "camera in, as docker run --device does)"
        )
    if number in (errno.EACCES, errno.EPERM):
        return (
            "permission denied; ls -l /dev/video* shows the group that may read it, usually video, so add your user "
            "to it (sudo usermod -aG video $USER, then log in again)"
        )
    if number in (errno.ENOTTY, errno.ENODEV, errno.EINVAL):
        return (
            "it is not a video capture device; ls /dev/video* lists the devices (a camera often adds a second one "
            "that carries only metadata, and v4l2-ctl --list-devices tells them apart)"
        )
    if number == errno.EBUSY:
        return "the device is busy, in use by another program; close that program and try again"
    return (
        f"the capture device cannot be opened ({short_reason(error)}); check it with ls -l /dev/video* and that your "
        "user is in the video group"
    )


def url_problem(error, live):
    """Why a stream URL could not be opened, and what to check."""
    import av

    host = urllib.parse.urlsplit(live.text).hostname
    if isinstance(error, av.error.ExitError):  # PyAV's open timeout
        return f"no answer within {OPEN_TIMEOUT:g} s; check the URL, the network and that the stream is running"
    if isinstance(error, av.error.ConnectionRefusedError):
        return (
            "the connection was refused, so nothing serves at that host and port; check the URL and that the stream "
            "is running"
        )
    if isinstance(error, (av.error.HTTPServerError, av.error.HTTPOtherClientError)):  # FFmpeg says 5XX or 4XX
        code = http_status(live)
        answer = f"{code} {http.HTTPStatus(code).phrase}" if code in set(http.HTTPStatus) else None
        if isinstance(error, av.error.HTTPServerError):
            return f"the server answered {answer or 'with an error of its own (5XX)'}; try again later"
        return f"the server answered {answer or 'with a client error (4XX)'}; check the URL"
    if isinstance(error, (av.error.HTTPClientError, av.error.HTTPError)):
        return f"the server answered {short_reason(error).removeprefix('Server returned ')}; check the URL"
    if isinstance(error, av.error.InvalidDataError):
        return "what the server sent is not a video (empty, or a web page); check the URL"
    if getattr(error, "errno", None) == errno.EIO and host and not resolves(host):
        return f"there is no such host ({host}); check the URL and the network"
    if getattr(error, "errno", None) == errno.EIO and certificate_refused(live):
        return (
            "its certificate could not be verified (self-signed, expired or for another host); check the URL, or add "
            "the server's CA certificate to the system's (or point SSL_CERT_FILE at it)"
        )
    return f"the stream cannot be opened ({short_reason(error)}); check the URL and that the stream is running"


def resolves(host):
    """Whether a host name has an address (FFmpeg reports one that has none only as an input/output error)."""
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return True


def http_status(live):
    """The status code an http(s) URL answers (FFmpeg's error names only 4XX or 5XX), or None."""
    parts = urllib.parse.urlsplit(live.text)
    if parts.scheme not in ("http", "https"):
        return None
    headers = {"Range": "bytes=0-0"}
    if parts.username is not None:
        login = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode()).decode()
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=live.verified_with())
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=OPEN_TIMEOUT, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=OPEN_TIMEOUT)
    try:
        connection.request(
            "GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")), headers=headers
        )
        return connection.getresponse().status
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()


def certificate_refused(live):
    """Whether an https server's certificate fails the check FFmpeg made (which says only "Input/output error"),
    by a TLS handshake of Python's with the same CA bundle."""
    ca_file, parts = live.verified_with(), urllib.parse.urlsplit(live.text)
    if ca_file is None:
        return False
    context = ssl.create_default_context(cafile=ca_file)
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=OPEN_TIMEOUT) as connection:
            context.wrap_socket(connection, server_hostname=parts.hostname).close()
    except ssl.SSLCertVerificationError:
        return True
    except (OSError, ValueError):
        return False
    return False


def status_line(run, latencies, newest):
    """The current smoothed grade (the last --smooth seconds), the worst segment so far, the latency."""
    line = run.timeline
    if not line.times:
        return "waiting for the first frame"
    now, gradable = line.times[-1], line.gradable
    recent = (np.asarray(line.times) >= now - run.settings.smooth) & gradable
    current = line.class_names[int(line.probs[recent].mean(0).argmax())] if recent.any() else "ungradable"
    copy = timeline.Timeline(line.class_names, line.interval, line.indices, line.times, line.parts, line.reasons,
                             line.max_gap)  # fmt: skip
    copy.finish(run.settings.smooth, run.settings.min_segment)
    worst = timeline.video_grade(copy.segments, line.class_names, run.settings.min_segment)
    worst_text = f"{line.class_names[worst.label]} {worst.start:.1f}-{worst.end:.1f} s" if worst else "none yet"
    return (
        f"{now:6.1f} s: {current} | worst so far: {worst_text} | latency {np.median(latencies[-25:]) * 1000:.0f} ms"
        f" | dropped {newest.dropped}"
    )


def grade_live(grader, source, args, weights):
    """Grade a live source until it ends or Ctrl-C, then write the outputs of a video file; the exit code."""
    settings = video_settings(args)
    try:
        live = live_source(source)
    except ValueError as error:  # urllib's: an unclosed [ of an IPv6 address, a port out of range
        raise UserError(f"--live: the URL is not valid ({error}); check how it is written.") from None
    with GracefulStop() as stop:
        stop.finishing = "no longer waiting for the source to open"
        video = open_until_stopped(live, stop)
        stop.finishing = "writing the results of the footage so far"
        # anything but a camera is played by its timestamps: a recording (even one whose header gives no length,
        # as raw H.264) would otherwise be read as fast as the network goes, its frames dropped, and a live stream
        # never runs ahead of them; a recording (a file, or a stream with a length) can be decoded again for the
        # strip, while a camera or a live stream comes once
        paced = live.kind != "device"
        recording = live.kind == "file" or (live.kind == "url" and video.duration is not None)
        run = videoout.VideoRun(files.new_run_dir(settings.video_out, live.folder), grader, settings)
        run.source, run.weights = Path(source) if live.kind == "file" else live.shown, weights
        run.reopen = functools.partial(open_source, live) if recording else None
        run.start(1 / min(settings.fps or video.rate, video.rate), live=True)
        newest = Newest()
        reader = threading.Thread(
            target=read_source, args=(video, settings.fps, grader.resize_size, newest, paced), daemon=True
        )
        print(f"grading {live.shown} live; Ctrl-C stops and writes the results", file=sys.stderr, flush=True)
        started = time.perf_counter()
        reader.start()
        latencies = grade_arrivals(run, newest, stop)
        newest.stop.set()
        reader.join()
    return finish_live(run, video, newest, latencies, time.perf_counter() - started, stop, args)


def open_until_stopped(live, stop):
    """open_source in a thread, so that Ctrl-C ends the wait for a source that does not answer at once: Python runs
    its signal handler only between bytecodes, and av.open waits inside FFmpeg until its timeout. The thread, if
    left waiting, ends with the process."""
    opened = {}

    def open_it():
        try:
            opened["video"] = open_source(live)
        except Exception as error:
            opened["error"] = error

    thread = threading.Thread(target=open_it, daemon=True)
    thread.start()
    while thread.is_alive() and not stop():
        thread.join(0.1)
    if stop():  # even if the open failed meanwhile: the user asked to stop
        raise KeyboardInterrupt(f"stopped by {stop.signal_name} while {live.shown} was opening; nothing was graded.")
    if isinstance(opened.get("error"), VideoError):
        raise UserError(f"--live {live.shown}: {opened['error']}.")
    if "error" in opened:
        raise opened["error"]
    return opened["video"]


def grade_arrivals(run, newest, stop):
    """Grade each frame the reader hands on until the source ends or Ctrl-C; the latencies (s)."""
    grader, settings, latencies = run.grader, run.settings, []
    terminal = sys.stderr.isatty()
    last_status = time.perf_counter()
    while not stop():
        arrival = newest.take(timeout=0.2)
        if arrival is None and newest.done:
            break
        if arrival is None:
            continue
        run.add([arrival.frame], *grade_batch(grader, [arrival.frame], settings.thresholds))
        latencies.append(time.perf_counter() - arrival.arrived)
        if time.perf_counter() - last_status >= (STATUS_EVERY if terminal else 10 * STATUS_EVERY):
            last_status = time.perf_counter()
            print(("\r" if terminal else "") + status_line(run, latencies, newest), end="" if terminal else "\n",
                  file=sys.stderr, flush=True)  # fmt: skip
    if terminal:
        print(file=sys.stderr)
    return latencies


def finish_live(run, video, newest, latencies, seconds, stop, args):
    video.close()
    run.seconds = seconds
    if stop():
        run.complete, run.stopped = False, f"stopped by {stop.signal_name}"
    elif newest.error is not None:
        run.complete, run.stopped = False, f"the source failed: {newest.error}"
    if not run.timeline.times:  # nothing to keep: no results folder
        run.discard()
        if stop():
            raise KeyboardInterrupt(f"stopped by {stop.signal_name} before the first frame; nothing was written.")
        reason = newest.error or video.stopped or "the stream ended before its first frame"
        raise UserError(
            f"--live {run.source}: no frame arrived: {reason}; check that the stream is running and sends video."
        )
    summary = run.finish(video)
    latency = np.asarray(latencies) * 1000
    summary["live"] = {
        "frames_received": newest.received,
        "frames_dropped": newest.dropped,
        "latency_ms": {
            "median": round(float(np.median(latency)), 1),
            "p95": round(float(np.percentile(latency, 95)), 1),
        },
    }
    files.write_json(Path(summary["out"]) / "video.json", summary)
    if args.json:
        print(json.dumps({"weights": summary["weights"], "videos": [summary]}, indent=2))
    else:
        print(videoout.summary_line(summary))
    return 0
