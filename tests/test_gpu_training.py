"""Every trainer, the pipeline and the server on CUDA (skipped without a GPU): tiny runs that prove the device
paths (generators, new tensors, process-group backend) work end to end. tools/gpu_check.sh runs
these with the op tests and benchmarks on a lent GPU machine."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from letter.cf import CFConfig, train_cf
from letter.cli.main import main
from letter.data import make_synthetic, write_letter
from letter.rec import RecConfig, evaluate, train_rec
from letter.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def synth():
    return make_synthetic(num_users=200, num_items=100, num_categories=5, seed=3)


def test_sasrec_on_cuda(synth, tmp_path):
    result = train_cf(synth, str(tmp_path), CFConfig(dim=16, blocks=1, epochs=2, loss="bce", device="cuda"),
                      log=lambda *_: None)
    assert result["epochs_run"] == 2 and np.isfinite(result["test"]["ndcg@10"])


@pytest.mark.parametrize("method", ["letter", "rqkmeans"])
def test_tokenizer_on_cuda(synth, tmp_path, method):
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(synth.num_items, 32, generator=g, device="cpu").numpy()
    cf = torch.randn(synth.num_items, 8, generator=g, device="cpu").numpy()
    cfg = TokenizerConfig(method=method, layers=[32], e_dim=8, codebook_sizes=[8, 8, 8], clusters=2, epochs=3,
                          batch_size=64, kmeans_iters=5, beta=1e-3, device="cuda")
    report = train_tokenizer(cfg, text, cf, str(tmp_path / "tok"))
    assert report["items"] == synth.num_items
    assert load_tokenizer(str(tmp_path / "tok")).encode(text[:5]).shape == (5, 3)


def test_sinkhorn_on_cuda():
    """The scaling Sinkhorn (two mat-vecs a step, absorption on the device) vs the CPU log domain."""
    from letter.tokenizer.clustering import _sinkhorn, sinkhorn_assign

    g = torch.Generator(device="cpu").manual_seed(0)
    for rows, cols, eps in [(1024, 256, 0.003), (257, 7, 1e-4)]:
        d = torch.cdist(torch.randn(rows, 8, generator=g), torch.randn(cols, 8, generator=g)) ** 2
        spec = _sinkhorn(d.double(), eps, 50, torch.zeros(rows, dtype=torch.long), return_log=True)
        picked = sinkhorn_assign(d.cuda(), eps, 50).cpu()
        chosen = spec.gather(1, picked.unsqueeze(1)).squeeze(1)
        assert (chosen >= spec.amax(1) - 1e-12 * 2 / eps).all()


@pytest.fixture(scope="module")
def cuda_tiger(synth, tmp_path_factory):
    """(run folder, summary) of a tiny TIGER trained on the GPU."""
    root = tmp_path_factory.mktemp("cuda-tiger")
    codes = np.stack([np.arange(synth.num_items) % 10, np.arange(synth.num_items) // 10], 1)
    data = str(root / "data")
    write_letter(synth, data)
    cfg = RecConfig(d_model=32, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16, d_ff=64, epochs=2,
                    batch_size=64, valid_users=50, device="cuda", bucket_by_length=True)
    return str(root / "rec"), train_rec(cfg, data, codes, str(root / "rec"))


def test_tiger_on_cuda(cuda_tiger):
    run, summary = cuda_tiger
    assert summary["finished"]
    result = evaluate(run, "test", device="cuda")
    assert result["device"].startswith("cuda") and 0 <= result["metrics"]["ndcg@10"] <= 1


def test_serve_on_cuda(cuda_tiger, synth):
    """`letter serve --device cuda`: a real server answers concurrent requests with the lists
    letter.rec.recommend gives on the GPU (scores within float noise: cuBLAS may pick other kernels
    for other batch sizes) and never returns a history item."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from test_serve import _post_concurrently

    from letter.rec.recommend import recommend
    from letter.serve.process import get_json, running_server

    run, _ = cuda_tiger
    histories = [[synth.item_ids[i] for i in seq[:-1]] for seq in synth.sequences[:12]]
    expected = [recommend(run, h, k=5, device="cuda", exclude_history=True) for h in histories]
    with running_server(run, "--device", "cuda", "--max-batch", "8", "--max-delay-ms", "5", start_timeout=60) as url:
        assert get_json(url + "/healthz")[0] == 200
        answers = _post_concurrently(url, "/recommend", [{"history": h, "k": 5} for h in histories], concurrency=6)
    for history, want, (status, body) in zip(histories, expected, answers):
        assert status == 200, body
        got = body["items"]
        assert not {i["item_id"] for i in got} & set(history)
        assert [i["score"] for i in got] == pytest.approx([i["score"] for i in want], abs=1e-4)


def test_pipeline_on_cuda(tmp_path, tiny_config):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["pipeline", "--synthetic", "--config", tiny_config, "--out", str(run),
                                       "--device", "cuda"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    assert {row["model"] for row in report["metrics"]} >= {"SASRec", "LETTER-TIGER"}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for nccl")
def test_tiger_torchrun_nccl(synth, tmp_path):
    data = str(tmp_path / "data")
    write_letter(synth, data)
    codes = str(tmp_path / "codes.npy")
    np.save(codes, np.stack([np.arange(synth.num_items) % 10, np.arange(synth.num_items) // 10], 1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "letter.cli.main", "train-rec", "--data", data, "--index", codes, "--out", str(tmp_path / "rec"),
           "--d-model", "32", "--num-layers", "1", "--num-decoder-layers", "1", "--epochs", "1", "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "LETTER_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("bf16", [False, True])
def test_lcrec_on_cuda(synth, tmp_path, tiny_llama, bf16):
    data = str(tmp_path / "data")
    write_letter(synth, data)
    codes = np.stack([np.arange(synth.num_items) % 10, np.arange(synth.num_items) // 10], 1)
    cfg = RecConfig(model="lcrec", base_model=tiny_llama, epochs=1, batch_size=32, valid_users=20, eval_batch_size=8,
                    bf16=bf16, gradient_checkpointing=True, device="cuda")
    assert train_rec(cfg, data, codes, str(tmp_path / "rec"))["finished"]
    result = evaluate(str(tmp_path / "rec"), "test", max_users=30, device="cuda")
    assert 0 <= result["metrics"]["ndcg@10"] <= 1
