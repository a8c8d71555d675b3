"""`aic train`: trains, checkpoints, resumes and exports a model a receiver can use."""

import json

import av
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shared.neural.coder import ImageCoder, file_sha256  # noqa: E402
from shared.neural.export import export_model  # noqa: E402
from shared.neural.training import TrainConfig, train  # noqa: E402


def write_photos(d, n: int, h: int, w: int, sigma: float, axis: int, seed: int):
    """``n`` PNGs of random-walk texture (h x w) in folder ``d``."""
    d.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.clip(np.cumsum(rng.normal(0, sigma, (h, w, 3)), axis=axis) + 128, 0, 255).astype(np.uint8)
        with av.open(str(d / f"p{i}.png"), "w") as c:
            st = c.add_stream("png")
            st.width, st.height, st.pix_fmt = w, h, "rgb24"
            c.mux(st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            c.mux(st.encode(None))
    return d


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "photos", 2, 128, 160, 8, axis=1, seed=0)


def test_train_checkpoints_resumes_and_exports_a_working_model(photos, tmp_path):
    cfg = TrainConfig(data=str(photos), steps=3, batch_size=2, crop=64, n=16, m=24)
    out = tmp_path / "run"
    ckpt = train(cfg, out, ckpt_every=2)
    assert torch.load(ckpt)["step"] == 3
    assert [line.split("\t")[0] for line in (out / "train_log.tsv").read_text().splitlines()] == ["2", "3"]

    resumed = train(TrainConfig(**{**cfg.__dict__, "steps": 5}), out, resume=ckpt, ckpt_every=2)
    assert torch.load(resumed)["step"] == 5
    times = [float(line.split("\t")[1]) for line in (out / "train_log.tsv").read_text().splitlines()]
    assert times == sorted(times)  # the clock continues across the resume

    model_dir = tmp_path / "models" / "mini"
    weights = export_model(resumed, model_dir, val=str(photos))
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["sha256"] == file_sha256(weights) and meta["steps"] == 5 and len(meta["rd"]) == len(cfg.lambdas)
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert meta["sha256"] in card and "| 7 |" in card
    coder = ImageCoder(weights)
    x = torch.rand(1, 3, 40, 70)
    streams, recon = coder.encode(x, 3)
    assert torch.equal(coder.decode(streams, 3, 40, 70), recon)

    # Fine-tuning from the exported weights: the card says what it started from, and the totals.
    tuned = train(TrainConfig(**{**cfg.__dict__, "steps": 2, "init": str(weights)}), tmp_path / "tune",
                  init=weights, ckpt_every=2)
    export_model(tuned, tmp_path / "models" / "mini-2")
    meta2 = json.loads((tmp_path / "models" / "mini-2" / "model.json").read_text())
    assert meta2["init"]["sha256"] == meta["sha256"] and meta2["init"]["steps"] == 5
    assert meta2["total_steps"] == 7
    card2 = (tmp_path / "models" / "mini-2" / "MODEL_CARD.md").read_text()
    assert f"--init {weights}" in card2 and "7 steps" in card2


def test_bf16_training_keeps_the_rate_in_float32_and_the_card_says_how_it_trained(photos, tmp_path):
    cfg = TrainConfig(data=str(photos), steps=2, batch_size=2, crop=64, n=16, m=24, precision="bf16")
    ckpt = train(cfg, tmp_path / "run", ckpt_every=2)
    state = torch.load(ckpt)
    assert state["config"]["precision"] == "bf16"
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    from shared.neural.models import MeanScaleHyperprior

    net = MeanScaleHyperprior(16, 24, len(cfg.lambdas))
    net.load_state_dict(state["model"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.rand(2, 3, 64, 64), torch.tensor([0, 7]))
    # The transforms ran in bfloat16; what the rate and the loss see is float32.
    assert {out[k].dtype for k in ("x_hat", "y_likelihood", "z_likelihood")} == {torch.float32}
    export_model(ckpt, tmp_path / "models" / "half")
    card = (tmp_path / "models" / "half" / "MODEL_CARD.md").read_text()
    assert "bfloat16" in card and "--precision bf16" in card
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(data=str(photos), precision="fp8")


def test_restore_training_resumes_and_exports_a_model_the_hybrid_codec_loads(tmp_path):
    from shared.codecs.hybrid import HybridCodec
    from shared.neural.restore_training import RestoreConfig, export_restore, train_restore

    # Textured enough that x264 leaves visible error (the sampler skips near-lossless clips).
    d = write_photos(tmp_path / "big", 2, 320, 320, 12, axis=0, seed=1)
    cfg = RestoreConfig(data=str(d), steps=2, clips=1, crop=32, channels=8, depth=3)
    out = tmp_path / "run"
    ckpt = train_restore(cfg, out, ckpt_every=1)
    resumed = train_restore(RestoreConfig(**{**cfg.__dict__, "steps": 3}), out, resume=ckpt, ckpt_every=1)
    assert torch.load(resumed)["step"] == 3
    from shared.neural.training import main as aic_train

    # `aic train --resume` knows a restore checkpoint without being told --arch restore.
    assert aic_train(["--resume", str(resumed), "--steps", "3", "--out", str(out)]) == 0
    weights = export_restore(resumed, tmp_path / "models" / "mini-restore", val=str(d))
    meta = json.loads((weights.parent / "model.json").read_text())
    assert meta["sha256"] == file_sha256(weights) and len(meta["rd"]) == 8
    assert all(r["bpp"] > r["bpp_base"] for r in meta["rd"])  # the blend bytes are counted
    assert "| 7 | 17 |" in (weights.parent / "MODEL_CARD.md").read_text()
    codec = HybridCodec(weights=weights, device="cpu")
    assert codec.base.name == "x264-psnr" and codec.levels == 8
    # Fine-tuned from those weights: the card says so.
    tuned = train_restore(RestoreConfig(**{**cfg.__dict__, "steps": 1, "init": str(weights)}), tmp_path / "tune",
                          init=weights, ckpt_every=1)
    export_restore(tuned, tmp_path / "models" / "mini-restore-2", val=str(d))
    card = (tmp_path / "models" / "mini-restore-2" / "MODEL_CARD.md").read_text()
    assert f"--init {weights}" in card and "4 steps" in card


def test_a_checkerboard_model_fine_tunes_from_hyperprior_weights_and_exports(photos, tmp_path):
    hp = train(TrainConfig(data=str(photos), steps=1, batch_size=2, crop=64, n=16, m=24), tmp_path / "hp")
    export_model(hp, tmp_path / "models" / "hp")
    weights = tmp_path / "models" / "hp" / "weights.pt"
    cfg = TrainConfig(data=str(photos), steps=2, batch_size=2, crop=64, n=16, m=24, arch="checkerboard",
                      init=str(weights))
    ckpt = train(cfg, tmp_path / "cb", init=weights, ckpt_every=2)
    out = tmp_path / "models" / "cb"
    export_model(ckpt, out, val=str(photos))
    coder = ImageCoder(out / "weights.pt")
    assert coder.arch == "checkerboard"
    card = (out / "MODEL_CARD.md").read_text()
    assert "checkerboard spatial context" in card and "--arch checkerboard" in card and " context |" in card
    rd = json.loads((out / "model.json").read_text())["rd"]
    assert all(r["bpp_ideal_no_context"] > 0 for r in rd)
    x = torch.rand(1, 3, 48, 80)
    streams, recon = coder.encode(x, 2)
    assert torch.equal(coder.decode(streams, 2, 48, 80), recon)
    with pytest.raises(ValueError, match="arch"):
        TrainConfig(data=str(photos), arch="transformer")
