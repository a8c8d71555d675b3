"""Raw frames on the embedded server's disk are unreadable without the key in its folder."""

from __future__ import annotations

import numpy as np

from shared import bus as busmod
from shared.bus import Bus
from shared.embedded import STORE_KEY_FILE, NatsServer
from shared.schemas import FrameBatch

MARK = b"AIC-RAW-FRAME-MARK"


def marked_batch() -> FrameBatch:
    w, h = 64, 48
    frame = np.frombuffer((MARK * 300)[: w * h * 3 // 2], np.uint8)
    return FrameBatch(stream_id="rest", batch_seq=0, width=w, height=h, fps_num=30, fps_den=1, first_pts=0,
                      captured_at=0.0, frames=np.stack([frame] * 2))


async def files_holding_the_frames(root, encrypt: bool) -> int:
    server = NatsServer(root, encrypt=encrypt).start()
    try:
        bus = await Bus.connect(server.client(), "at-rest")
        try:
            await bus.ensure_topology()
            fb = marked_batch()
            await bus.publish(busmod.frames_subject(fb.stream_id), fb.pack(), fb.msg_id, kind="frames")
        finally:
            await bus.close()
    finally:
        server.stop()
    return sum(MARK in p.read_bytes() for p in (root / "jetstream").rglob("*") if p.is_file())


async def test_the_store_holds_no_raw_frame_in_the_clear_and_the_key_is_owner_only(tmp_path):
    assert await files_holding_the_frames(tmp_path / "plain", encrypt=False) > 0  # what the test looks for
    root = tmp_path / "encrypted"
    assert await files_holding_the_frames(root, encrypt=True) == 0
    key = root / STORE_KEY_FILE
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    secret = key.read_text().strip()
    assert len(secret) == 64
    for name in ("nats-server.conf", "nats-server.log"):
        assert secret not in (root / name).read_text()


async def test_a_restarted_server_reads_its_encrypted_store_with_the_key_it_kept(tmp_path):
    root = tmp_path / "nats"
    await files_holding_the_frames(root, encrypt=True)
    key = (root / STORE_KEY_FILE).read_text()
    server = NatsServer(root).start()
    try:
        bus = await Bus.connect(server.client(), "at-rest")
        try:
            msg = await bus.js.get_last_msg(busmod.FRAMES_STREAM, busmod.frames_subject("rest"))
            assert MARK in msg.data
        finally:
            await bus.close()
    finally:
        server.stop()
    assert (root / STORE_KEY_FILE).read_text() == key
