"""Which JPEG coder policylink uses: encode and decode time and size, per library, on camera-like frames.

Candidates: simplejpeg (libjpeg-turbo bundled in its wheel), Pillow, OpenCV
(``cv2.imencode`` / ``imdecode``, colour order converted as policylink must),
and PyTurboJPEG when its system library is present. Frames: ``_frames.tabletop_frame``
at 480x640 (the seeds' cameras) and 224x224; qualities 75 and 90; colour
subsampled 4:2:0 in every library. Each timing is the median of ``--reps``
calls, in this process, one thread.

    .venv/bin/python benchmarks/image_codecs.py [--reps 50]
"""

from __future__ import annotations

import argparse
import io
import statistics
from collections.abc import Callable

import numpy as np

from _frames import tabletop_frame
from _report import measure, publish

SIZES = ((480, 640), (224, 224))
QUALITIES = (75, 90)


def coders() -> dict[str, tuple[Callable[[np.ndarray, int], bytes], Callable[[bytes], np.ndarray]] | str]:
    """name -> (encode(frame, quality), decode(data)), or why it is not measured."""
    found: dict[str, tuple[Callable[[np.ndarray, int], bytes], Callable[[bytes], np.ndarray]] | str] = {}
    try:
        import simplejpeg

        found["simplejpeg " + simplejpeg.__version__] = (
            lambda f, q: simplejpeg.encode_jpeg(f, quality=q, colorspace="RGB", colorsubsampling="420"),
            lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"),
        )
    except ImportError as exc:
        found["simplejpeg"] = f"not installed ({exc})"
    try:
        import PIL
        from PIL import Image

        def pil_encode(frame: np.ndarray, quality: int) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
            return buffer.getvalue()

        found["Pillow " + PIL.__version__] = (pil_encode, lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")))
    except ImportError as exc:
        found["Pillow"] = f"not installed ({exc})"
    try:
        import cv2

        found["OpenCV " + cv2.__version__] = (
            lambda f, q: cv2.imencode(".jpg", np.ascontiguousarray(f[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes(),
            lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR)[..., ::-1].copy(),
        )
    except ImportError as exc:
        found["OpenCV"] = f"not installed ({exc})"
    try:
        from turbojpeg import TJSAMP_420, TurboJPEG

        turbo = TurboJPEG()
        found["PyTurboJPEG"] = (lambda f, q: turbo.encode(f, quality=q, pixel_format=0, jpeg_subsample=TJSAMP_420),
                                lambda d: turbo.decode(d, pixel_format=0))
    except ImportError as exc:
        found["PyTurboJPEG"] = f"not installed ({exc}); it also needs the system's libturbojpeg, which pip cannot bring to a robot"
    except Exception as exc:  # installed, but its libturbojpeg is not on this machine
        found["PyTurboJPEG"] = f"not usable: {type(exc).__name__}: {exc}"
    return found


def median_ms(call: Callable[[], object], reps: int) -> float:
    return statistics.median(measure(call, reps, warmup=1)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=50, help="timed calls per cell (default: 50)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, skipped = [], []
    for name, coder in coders().items():
        if isinstance(coder, str):
            skipped.append(f"{name}: {coder}")
            continue
        encode, decode = coder
        for height, width in SIZES:
            frame = tabletop_frame(height, width)
            for quality in QUALITIES:
                data = encode(frame, quality)
                error = float(np.abs(decode(data).astype(np.int16) - frame).mean())
                rows.append((name, f"{height}x{width}", quality, len(data), median_ms(lambda: encode(frame, quality), args.reps),
                             median_ms(lambda: decode(data), args.reps), error))
                print(rows[-1], flush=True)
    lines = [
        f"Camera-like frames (`benchmarks/_frames.py`: a lit table, shaded objects, sensor noise), colour 4:2:0; median of "
        f"{args.reps} calls, one thread. Raw: {480 * 640 * 3:,} bytes at 480x640, {224 * 224 * 3:,} at 224x224. "
        "`mean abs error`: per pixel and channel, 0-255.",
        "",
        "| coder | frame | quality | bytes | encode ms | decode ms | mean abs error |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {n} | {s} | {q} | {b:,} | {e:.2f} | {d:.2f} | {err:.2f} |" for n, s, q, b, e, d, err in rows),
        "",
    ]
    fastest = {}
    for n, s, q, b, e, d, err in rows:
        if s == "480x640" and q == 90:
            fastest[n] = e + d
    if fastest:
        best = min(fastest, key=fastest.get)
        lines.append(f"- Fastest encode + decode at 480x640, quality 90: {best} ({fastest[best]:.2f} ms; "
                     + ", ".join(f"{n} {t:.2f} ms" for n, t in fastest.items() if n != best) + ").")
        verdict = "the fastest here" if best.startswith("simplejpeg") else f"NOT the fastest here ({best} is)"
        lines.append(f"- policylink's coder is simplejpeg when installed ({verdict}; the `[jpeg]` extra, numpy its only "
                     "dependency, so the robot side stays light), else Pillow, else OpenCV.")
    lines += [f"- Not measured: {why}" for why in skipped]
    table = "\n".join(lines)
    publish("Image codecs", table, write=not args.no_write)


if __name__ == "__main__":
    main()
