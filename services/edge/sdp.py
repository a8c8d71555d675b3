"""What an SDP offer asks for, checked before any WebRTC work is done for it."""

from __future__ import annotations

import re

#: The video codecs aiortc decodes (and encodes for viewers).
DECODABLE = ("VP8", "H264")
MAX_SDP_BYTES = 64 * 1024

_RTPMAP = re.compile(r"^a=rtpmap:(\d+) ([A-Za-z0-9_.-]+)/\d+", re.M)


class OfferError(ValueError):
    """An offer this edge refuses; ``status`` is the HTTP answer (400 malformed, 422 unusable)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_offer(body: bytes, direction: str) -> str:
    """The offer's text, if it is an SDP offer with a video section in a codec aic decodes and that
    can flow ``direction`` ("send": the peer publishes, "recv": the peer watches); else
    :class:`OfferError` saying what is wrong."""
    if len(body) > MAX_SDP_BYTES:
        raise OfferError(413, f"the offer is {len(body)} bytes, over {MAX_SDP_BYTES}")
    try:
        sdp = body.decode("utf-8")
    except UnicodeDecodeError:
        raise OfferError(400, "the offer is not UTF-8 text") from None
    if not sdp.lstrip().startswith("v=0") or "\no=" not in sdp or "\nm=" not in sdp:
        raise OfferError(400, "not an SDP offer (RFC 8866: v=0, o=, and at least one m= section)")
    sections = re.split(r"\r?\n(?=m=)", sdp)
    videos = [s for s in sections if s.startswith("m=video")]
    if not videos:
        kinds = sorted({s.split()[0][2:] for s in sections[1:]})
        raise OfferError(422, f"the offer has no video section (it has: {', '.join(kinds) or 'none'}); aic carries "
                              "video only")
    offered, usable = [], []
    for v in videos:
        fields = v.split(None, 3)
        if len(fields) < 4:
            raise OfferError(400, f"malformed media line {v.splitlines()[0][:80]!r} (RFC 8866: m=<media> <port> "
                                  "<proto> <fmt> ...)")
        if fields[1] == "0":
            continue  # a rejected section
        if direction == "send" and re.search(r"^a=(recvonly|inactive)\s*$", v, re.M):
            continue
        if direction == "recv" and re.search(r"^a=(sendonly|inactive)\s*$", v, re.M):
            continue
        names = [m.group(2) for m in _RTPMAP.finditer(v)]
        offered += names
        usable += [n for n in names if n.upper() in DECODABLE]
    if not usable:
        what = "sends" if direction == "send" else "receives"
        seen = sorted({n for n in offered if n.lower() not in ("rtx", "red", "ulpfec", "flexfec-03")})
        raise OfferError(422, f"the offer {what} video in {', '.join(seen) or 'no codec'} only; aic "
                              f"{'decodes' if direction == 'send' else 'sends'} {' and '.join(DECODABLE)}")
    return sdp
