"""Per-stream control: validated configs in a NATS KV bucket, set with `aic config`, applied live by workers."""

from __future__ import annotations

import json

import pytest

from services.ingest import read_batches
from shared import bus as busmod
from shared.config import PolicyConfig
from shared.control import ConfigError, StreamConfig
from tests.conftest import compressor, metrics_writer, running, unique, wait_rows
from tests.test_services import aic


def test_modes_have_documented_targets_and_level_ranges_and_overrides_win():
    presets = {m: StreamConfig(mode=m).effective for m in ("conservative", "adaptive", "aggressive", "off")}
    assert {m: (e.target, e.level_min, e.level_max) for m, e in presets.items()} == {
        "conservative": (38.0, 4, 7), "adaptive": (34.0, 2, 6), "aggressive": (30.0, 0, 4), "off": (None, 0, 7)}
    assert StreamConfig().effective == presets["adaptive"]
    e = StreamConfig(mode="conservative", target=40, level_max=6).effective
    assert (e.target, e.level_min, e.level_max) == (40, 4, 6)


@pytest.mark.parametrize("override, levels", [
    ({"mode": "conservative", "level_max": 2}, (2, 2)),  # a cap below the preset's range still caps
    ({"mode": "aggressive", "level_min": 6}, (6, 6)),  # a floor above it still floors
    ({"mode": "adaptive", "level_min": 3}, (3, 6)),
    ({"mode": "adaptive", "level_min": 0, "level_max": 7}, (0, 7)),
])
def test_an_operators_level_bound_always_holds(override, levels):
    e = StreamConfig(**override).effective
    assert (e.level_min, e.level_max) == levels


@pytest.mark.parametrize("bad", [
    {"mode": "turbo"}, {"target": 500}, {"level_min": 9}, {"level_min": 5, "level_max": 2},
    {"budget_kbps": 0}, {"colour": "blue"}, {"target": "high"}, {"level_min": 1.5},
])
def test_invalid_configs_are_refused_with_the_reason(bad):
    with pytest.raises(ConfigError):
        StreamConfig.from_json(json.dumps(bad).encode())


def test_assignments_update_and_unset_fields():
    cfg = StreamConfig().updated(["mode=aggressive", "target=31.5", "level_max=3"])
    assert (cfg.mode, cfg.target, cfg.level_max) == ("aggressive", 31.5, 3)
    assert cfg.updated(["target="]).target is None and cfg.updated(["mode="]).mode == "adaptive"
    with pytest.raises(ConfigError):
        cfg.updated(["level_max"])


def test_aic_config_sets_gets_and_refuses_bad_values(nats_server):
    env = nats_server.env("operator")
    import os

    env = {**os.environ, **env}
    r = aic("config", "set", "cam-1", "mode=aggressive", "level_max=3", env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    shown = json.loads(aic("config", "get", "cam-1", env=env, timeout=60).stdout)
    assert shown["effective"] == {"mode": "aggressive", "target_psnr_y": 30.0, "level_min": 0, "level_max": 3,
                                  "budget_kbps": None}  # the API's shape
    r = aic("config", "replace", "cam-1", "level_min=1", env=env, timeout=60)  # the whole config, as PUT
    assert r.returncode == 0 and json.loads(r.stdout)["config"] == {"mode": "adaptive", "level_min": 1}
    bad = aic("config", "set", "cam-1", "mode=turbo", env=env, timeout=60)
    assert bad.returncode == 2 and "mode must be one of" in bad.stderr
    assert json.loads(aic("config", "get", env=env, timeout=60).stdout)["stream_id"] == "cam-1"
    aic("config", "delete", "cam-1", env=env, timeout=60)
    assert json.loads(aic("config", "get", "cam-1", env=env, timeout=60).stdout)["config"] is None


@pytest.mark.slow
async def test_a_mode_change_applies_to_the_next_batches_without_restart(bus, bus_cfg, postgres, tiny_model):
    sid = unique("live")
    batches = list(read_batches("lavfi:testsrc2=size=128x96:rate=30", sid, 4, 4 * 8))
    kv = await bus.config_kv()
    worker = compressor(bus_cfg, codec="hybrid", model="tiny-restore", level=6, quality_frames=0,
                        policy=PolicyConfig(target=0.0, compare_every=0))
    async with running(worker, metrics_writer(bus_cfg, postgres.url)):
        for fb in batches[:3]:
            await bus.publish(busmod.frames_subject(sid), fb.pack(), fb.msg_id, kind="frames")
            await wait_rows(postgres.url, [sid], fb.batch_seq + 1)
        await kv.put(sid, StreamConfig(mode="off").to_json())
        for fb in batches[3:6]:
            await bus.publish(busmod.frames_subject(sid), fb.pack(), fb.msg_id, kind="frames")
            await wait_rows(postgres.url, [sid], fb.batch_seq + 1)
        await kv.put(sid, StreamConfig(mode="aggressive", target=20.0).to_json())
        for fb in batches[6:]:
            await bus.publish(busmod.frames_subject(sid), fb.pack(), fb.msg_id, kind="frames")
        rows = await wait_rows(postgres.url, [sid], len(batches))
    by_seq = {r["batch_seq"]: r for r in rows}
    assert [(by_seq[i]["codec"], by_seq[i]["mode"], by_seq[i]["level"]) for i in range(3)] == [("hybrid", None, 6)] * 3
    # Within two batches of the change (here: the very next one), native only, no inference.
    assert all(by_seq[i]["codec"] == "x264-psnr" and by_seq[i]["mode"] == "off" for i in range(4, 6))
    assert all(by_seq[i]["codec"] == "hybrid" and by_seq[i]["mode"] == "aggressive" for i in range(7, len(batches)))
    assert all(0 <= by_seq[i]["level"] <= 4 for i in range(7, len(batches)))


def test_the_tighter_of_the_configured_budget_and_a_fresh_estimate_applies(monkeypatch):
    from services.compressor import controls as ctl

    c = ctl.StreamControls()
    assert c.decide("cam") is None
    c.estimate("cam", b'{"kbps": 300}')
    assert c.decide("cam").budget_kbps == 300 and c.decide("cam").mode is None
    c.apply("cam", StreamConfig(budget_kbps=200).to_json())
    assert c.decide("cam").budget_kbps == 200
    c.estimate("cam", b'{"kbps": "lots"}')  # ignored, logged
    c.estimate("cam", b'{"kbps": 150}')
    assert c.decide("cam").budget_kbps == 150
    now = ctl.time.monotonic()
    monkeypatch.setattr(ctl.time, "monotonic", lambda: now + ctl.ESTIMATE_FRESH_S + 1)
    assert c.decide("cam").budget_kbps == 200  # the estimate went stale


async def retained(bus, expected: dict[str, bytes | None]) -> None:
    """Wait until AIC_CONTROL holds ``expected`` (subject -> latest data, None: any): a plain publish
    is stored by the stream after the server answers the client's flush, not before."""
    import asyncio

    from shared.bus import CONTROL_STREAM

    while True:
        held = {}
        for subject in expected:
            try:
                held[subject] = (await bus.js.get_last_msg(CONTROL_STREAM, subject, direct=True)).data
            except Exception:  # not stored yet
                break
        if len(held) == len(expected) and all(v is None or held[k] == v for k, v in expected.items()):
            return
        await asyncio.sleep(0.05)


async def test_a_worker_started_after_the_receiver_spoke_knows_the_budget_before_its_first_batch(bus):
    """Estimates are plain NATS publishes; the bus keeps the latest per stream (AIC_CONTROL), so a
    worker that starts or scales out mid-stream does not code its first batches without a budget."""
    import asyncio

    from services.compressor.controls import StreamControls
    from shared.control import estimate_subject

    sid, other = unique("rx"), unique("rx")
    await bus.nc.publish(estimate_subject(sid), b'{"kbps": 250}')
    await bus.nc.publish(estimate_subject(sid), b'{"kbps": 300}')  # only the latest counts
    await bus.nc.publish(estimate_subject(other), b'{"kbps": "lots"}')  # invalid: ignored
    await bus.nc.flush()
    await asyncio.wait_for(retained(bus, {estimate_subject(sid): b'{"kbps": 300}', estimate_subject(other): None}), 10)
    controls, stop = StreamControls(), asyncio.Event()
    task = asyncio.create_task(controls.watch(bus, stop))
    try:
        await asyncio.wait_for(controls.ready.wait(), 10)
        assert controls.decide(sid).budget_kbps == 300
        assert controls.decide(other) is None
    finally:
        stop.set()
        await task


def test_an_estimate_is_as_old_as_its_publication():
    from services.compressor import controls as ctl

    c = ctl.StreamControls()
    c.estimate("cam", b'{"kbps": 300}', age_s=ctl.ESTIMATE_FRESH_S - 5)
    assert c.decide("cam").budget_kbps == 300
    c.estimate("cam", b'{"kbps": 300}', age_s=ctl.ESTIMATE_FRESH_S + 1)
    assert c.decide("cam") is None


async def test_the_config_watch_starts_again_after_a_failure(bus, monkeypatch):
    import asyncio

    from services.compressor.controls import StreamControls

    real, calls = bus.config_kv, []

    async def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise TimeoutError("bucket unreachable")
        return await real()

    sid = unique("w")
    await (await real()).put(sid, StreamConfig(mode="aggressive").to_json())
    monkeypatch.setattr(bus, "config_kv", flaky)
    controls, stop = StreamControls(), asyncio.Event()
    task = asyncio.create_task(controls.watch(bus, stop))
    try:
        for _ in range(100):
            if sid in controls.configs:
                break
            await asyncio.sleep(0.1)
        assert controls.decide(sid).mode == "aggressive" and len(calls) >= 2
    finally:
        stop.set()
        await task
