"""Where each compressed frame of encapsulated Pixel Data really ends, from the codec's own syntax.

A frame is a JPEG, JPEG-LS, JPEG 2000 or HTJ2K code stream, an RLE frame or a deflated frame.  Bytes a
writer leaves after a frame's end (after its EOI / EOC marker, after an RLE frame's last segment, after
a deflate stream, in fragments no frame accounts for) are no part of the image and can carry anything (a
name, an ID): :func:`frame_ends` finds where every frame ends by walking the stream's own structure
(marker segments and their lengths, tile-part lengths, RLE segment offsets and PackBits runs, the deflate
stream's end), never by looking for a marker anywhere (an embedded thumbnail has its own EOI).  Pure
functions over bytes; :mod:`medsendx_edge.anonymize.dicomio` rebuilds the element from the result.
"""

from __future__ import annotations

import struct
import zlib

RLE = "1.2.840.10008.1.2.5"
DEFLATED_FRAMES = "1.2.840.10008.1.2.8.1"
_JPEG_FAMILY = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62,
                                                       63, 64, 65, 66, 70, 80, 81)}
_J2K_FAMILY = {f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203)}


Buf = bytes | bytearray


class FrameError(ValueError):
    """The frames do not parse as the transfer syntax says: the bytes cannot be vetted."""


def supported(ts: str) -> bool:
    return ts in _JPEG_FAMILY or ts in _J2K_FAMILY or ts in (RLE, DEFLATED_FRAMES)


def _u16(b: Buf, i: int) -> int:
    if i + 2 > len(b):
        raise FrameError("a marker segment is cut off")
    return int.from_bytes(b[i:i + 2], "big")


def jpeg_end(b: Buf, i: int) -> int:
    """End (after EOI) of the ITU T.81 / T.87 (JPEG, JPEG lossless, JPEG-LS) stream starting at ``i``."""
    if b[i:i + 2] != b"\xff\xd8":
        raise FrameError("a JPEG frame does not start with SOI")
    i += 2
    n = len(b)
    while i < n:
        if b[i] != 0xFF:
            raise FrameError("a JPEG marker was expected")
        m = b[i + 1] if i + 1 < n else -1
        if m == 0xFF:          # fill byte
            i += 1
            continue
        if m == 0xD9:          # EOI
            return i + 2
        if m == 0x01 or 0xD0 <= m <= 0xD7:
            i += 2
            continue
        if m < 0:
            break
        i += 2 + _u16(b, i + 2)
        if m != 0xDA:          # SOS: entropy-coded data follows its header
            continue
        while True:            # to the next marker: FF followed by a byte that is not stuffing or RSTn
            j = b.find(b"\xff", i)
            if j < 0 or j + 1 >= n:
                raise FrameError("a JPEG frame has no EOI")
            nxt = b[j + 1]
            # T.81 stuffs FF 00 and has RSTn inside a scan; T.87 (JPEG-LS) stuffs a 0 bit (FF < 0x80)
            if nxt < 0x80 or 0xD0 <= nxt <= 0xD7:
                i = j + 2
                continue
            if nxt == 0xFF:
                i = j + 1
                continue
            i = j
            break
    raise FrameError("a JPEG frame has no EOI")


def j2k_end(b: Buf, i: int) -> int:
    """End (after EOC) of the JPEG 2000 / HTJ2K code stream starting at ``i`` (tile-parts skipped by
    their Psot length; a last tile-part of length 0 runs to EOC, which packet data cannot imitate)."""
    if b[i + 4:i + 8] == b"jP  ":   # a JP2 file (some writers wrap the code stream): to its jp2c box
        i = _jp2c(b, i)
    if b[i:i + 2] != b"\xff\x4f":
        raise FrameError("a JPEG 2000 frame does not start with SOC")
    i += 2
    n = len(b)
    while i + 2 <= n:
        if b[i] != 0xFF:
            raise FrameError("a JPEG 2000 marker was expected")
        m = b[i + 1]
        if m == 0xD9:          # EOC
            return i + 2
        if m == 0x90:          # SOT: Lsot, Isot, Psot
            if i + 10 > n:
                raise FrameError("a tile-part header is cut off")
            psot = struct.unpack(">L", b[i + 6:i + 10])[0]
            if psot == 0:
                j = b.find(b"\xff\xd9", i + 12)
                if j < 0:
                    raise FrameError("a JPEG 2000 frame has no EOC")
                return j + 2
            i += psot
            continue
        i += 2 + _u16(b, i + 2)
    raise FrameError("a JPEG 2000 frame has no EOC")


def _jp2c(b: Buf, i: int) -> int:
    """Start of the code stream in the contiguous code stream box of the JP2 file at ``i`` (ISO 15444-1
    I.4): boxes skipped by their lengths."""
    while i + 8 <= len(b):
        size, kind = struct.unpack(">L4s", b[i:i + 8])
        head = 8
        if size == 1:
            size, head = struct.unpack(">Q", b[i + 8:i + 16])[0], 16
        if kind == b"jp2c":
            return i + head
        if size < head:
            break
        i += size
    raise FrameError("a JP2 frame has no code stream box")


def _packbits_end(b: Buf, i: int, stop: int, need: int) -> int:
    """End of the PackBits run stream at ``i`` that decodes to ``need`` bytes (PS3.5 G.3.1)."""
    out = 0
    while out < need:
        if i >= stop:
            raise FrameError("an RLE segment is cut off")
        h = b[i]
        if h < 128:
            out += h + 1
            i += h + 2
        elif h > 128:
            out += 257 - h
            i += 2
        else:
            i += 1
    if i > stop:
        raise FrameError("an RLE segment is cut off")
    return i


def rle_end(b: Buf, i: int, stop: int, pixels: int) -> int:
    """End of the RLE frame at ``i`` (PS3.5 G.5): its 64-byte header, segments at the offsets it gives,
    the last one as long as its runs decode to one byte a pixel."""
    if stop - i < 64:
        raise FrameError("an RLE header is cut off")
    header = struct.unpack("<16L", b[i:i + 64])
    count, offsets = header[0], header[1:]
    if not 1 <= count <= 15 or list(offsets[:count]) != sorted(offsets[:count]) or offsets[0] != 64 \
            or offsets[count - 1] >= stop - i:
        raise FrameError("an RLE header gives impossible segment offsets")
    return _packbits_end(b, i + offsets[count - 1], stop, pixels)


def deflated_end(b: Buf, i: int, stop: int) -> int:
    """End of the deflate stream of a Deflated Image Frame at ``i``."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        for k in range(i, stop, 1 << 20):   # in slices: the inflated frame is not kept
            d.decompress(b[k:min(stop, k + (1 << 20))], 1 << 16)
            while d.unconsumed_tail:
                d.decompress(d.unconsumed_tail, 1 << 16)
            if d.eof:
                break
    except zlib.error as exc:
        raise FrameError("a deflated frame does not inflate") from exc
    if not d.eof:
        raise FrameError("a deflated frame never ends")
    return stop - len(d.unused_data)


def frame_ends(ts: str, fragments: list[bytes], frames: int, pixels: int) -> list[tuple[int, int, int]]:
    """:func:`frame_ends_in` over a list of fragment values."""
    return frame_ends_in(ts, b"".join(fragments), [len(f) for f in fragments], frames, pixels)


def frame_ends_in(ts: str, data: Buf, lengths: list[int], frames: int,
                  pixels: int) -> list[tuple[int, int, int]]:
    """For each frame, (first fragment, last fragment, bytes of the last fragment that belong to it).

    ``data`` is the fragments' values end to end (one buffer: the caller never holds them twice), of
    ``lengths``; a frame starts at a fragment's start (PS3.5 A.4) and may span several.  Raises
    :class:`FrameError` when the fragments do not hold ``frames`` frames of the syntax ``ts``
    (``pixels``: rows x columns, for RLE)."""
    starts, pos = [], 0
    for n in lengths:
        starts.append(pos)
        pos += n
    out: list[tuple[int, int, int]] = []
    k = 0
    for _ in range(frames):
        if k >= len(lengths):
            raise FrameError(f"the fragments hold fewer frames than Number of Frames ({frames})")
        begin = starts[k]
        if ts in _JPEG_FAMILY:
            end = jpeg_end(data, begin)
        elif ts in _J2K_FAMILY:
            end = j2k_end(data, begin)
        elif ts == RLE:         # one fragment a frame
            end = rle_end(data, begin, begin + lengths[k], pixels)
        elif ts == DEFLATED_FRAMES:
            end = deflated_end(data, begin, begin + lengths[k])
        else:
            raise FrameError("no frame parser for this transfer syntax")
        last = k
        while last + 1 < len(lengths) and starts[last + 1] < end:
            last += 1
        if end > starts[last] + lengths[last]:
            raise FrameError("a frame runs past the last fragment")
        out.append((k, last, end - starts[last]))
        k = last + 1
    return out
