"""The shared training core (letter.training) and what every trainer must get from it: devices,
generators on the run's device, resume checks, checkpoint loading, batch order, torchrun."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from letter.devices import resolve_device
from letter.errors import LetterError
from letter.training import (DistContext, EarlyStopping, FitPlan, RandomStreams, Trainable, Validation, batch_order,
                             check_resume, epoch_generator, fit, load_checkpoint, save_checkpoint, seed_everything,
                             warmup_cosine)
from letter.tokenizer import TokenizerConfig, train_tokenizer

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / "python" / "letter"
DRAWS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "normal"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            yield node, name, {k.arg for k in node.keywords}


def test_every_generator_and_seeded_draw_names_its_device():
    """The bug class that stopped GPU training: a CPU generator feeding draws on CUDA tensors. Every
    torch.Generator the library makes, and every seeded draw that makes a new tensor, must say on
    which device, so a trainer's generators follow the device it was asked to use."""
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        for node, name, keywords in _calls(ast.parse(path.read_text())):
            if name == "Generator" and "device" not in keywords:
                offenders.append(f"{path.name}:{node.lineno} torch.Generator() without device=")
            if name in DRAWS and "generator" in keywords and "device" not in keywords and not name.endswith("_like"):
                offenders.append(f"{path.name}:{node.lineno} {name}(generator=...) without device=")
    assert not offenders, offenders


def test_random_streams_live_on_the_run_device_and_restore_exactly():
    rng = RandomStreams(torch.device("cpu"))
    gen = rng.generator("codes", 3)
    order = rng.generator("order", 4, device="cpu")
    assert gen.device == torch.device("cpu") and order.device == torch.device("cpu")
    state = rng.state()
    first = (torch.rand(5, generator=gen), torch.randperm(9, generator=order), torch.rand(2), np.random.rand())
    rng.restore(state)
    again = (torch.rand(5, generator=gen), torch.randperm(9, generator=order), torch.rand(2), np.random.rand())
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(first, again))


def test_random_streams_of_a_run_resumed_on_another_kind_of_device():
    """device may change on resume: a CUDA run's run-device stream (a 16-byte Philox state, as
    torch.cuda.get_rng_state gives) cannot be set on a CPU generator, so it stays as seeded and is
    named; streams on a given device (CPU) and the global states are restored."""
    rng = RandomStreams(torch.device("cpu"))
    gen, order = rng.generator("codes", 3), rng.generator("order", 4, device="cpu")
    seeded = gen.get_state()
    order_state = torch.Generator(device="cpu").manual_seed(99).get_state()
    philox = torch.zeros(16, dtype=torch.uint8)
    saved_on_cuda = {**rng.state(), "cuda": philox, "generators": {"codes": philox, "order": order_state}}
    assert rng.restore(saved_on_cuda) == ["codes"]
    assert torch.equal(gen.get_state(), seeded) and torch.equal(order.get_state(), order_state)
    assert rng.restore(rng.state()) == []  # the same kind of device: everything restored


@pytest.mark.parametrize("bad", ["cuda:7", "tpu", "not a device"])
def test_devices_this_torch_lacks_are_clear_errors(bad):
    if bad.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(LetterError, match=r"^device "):  # the setting; the CLI names its option
        resolve_device(bad)
    assert resolve_device("cpu") == torch.device("cpu")


def test_batch_order_is_seeded_covers_every_row_and_buckets_by_length():
    lengths = torch.randint(1, 50, (1003,), generator=torch.Generator(device="cpu").manual_seed(0), device="cpu")
    plain = batch_order(1003, 64, epoch_generator(5, 2))
    assert torch.equal(torch.cat(plain).sort().values, torch.arange(1003))
    assert all(torch.equal(a, b) for a, b in zip(plain, batch_order(1003, 64, epoch_generator(5, 2))))
    assert not torch.equal(plain[0], batch_order(1003, 64, epoch_generator(5, 3))[0])
    bucketed = batch_order(1003, 64, epoch_generator(5, 2), lengths, pool_batches=8)
    assert torch.equal(torch.cat(bucketed).sort().values, torch.arange(1003))
    spread = lambda batches: np.mean([float(lengths[b].max() - lengths[b].min()) for b in batches])  # noqa: E731
    assert spread(bucketed) < 0.5 * spread(plain)


def test_schedule_and_early_stopping():
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.0)
    stop = EarlyStopping(patience=2)
    assert stop.update(0.1, 1) and not stop.update(0.1, 2) and not stop.should_stop
    assert not stop.update(0.05, 3) and stop.should_stop and stop.best_epoch == 1


def _replay(values, losses, threshold, patience=3, stop_from_epoch=0):
    """Feed scripted validations; returns (epoch it stopped at or None, the rule's state)."""
    stop = EarlyStopping(patience=patience, stop_from_epoch=stop_from_epoch)
    for epoch, (value, loss) in enumerate(zip(values, losses), 1):
        stop.update(value, epoch, threshold, loss)
        if stop.should_stop:
            return epoch, stop
    return None, stop


def test_noise_within_the_threshold_never_stops_a_run_whose_loss_improves():
    # Issue 26's run: validation NDCG@10 on 1,000 sampled users (standard error about 0.005) moved
    # 0.0270 -> 0.0225 -> 0.0222 -> 0.0241 while the loss fell; the plain rule stopped it at epoch 6
    # and kept epoch 3. Within one standard error the falling loss keeps it going and selected.
    # (The report gives NDCG@10 from epoch 3 and the loss from epoch 2; the earlier values here are
    # placeholders below epoch 3's, as the report implies: epoch 3 was the best.)
    values = [0.0150, 0.0230, 0.0270, 0.0225, 0.0222, 0.0241]
    losses = [5.10, 4.32, 3.51, 3.33, 3.21, 3.10]
    assert _replay(values, losses, threshold=0.0)[0] == 6
    stopped, state = _replay(values, losses, threshold=0.005)
    assert stopped is None and state.best_epoch == 6 and state.best == 0.0270
    # any noise within the threshold, in any order, while the loss falls: never a stop
    rng = np.random.default_rng(0)
    noisy = 0.03 + rng.uniform(-0.0024, 0.0024, size=40)  # any two differ by less than 0.005
    stopped, state = _replay(noisy, np.linspace(4.0, 3.0, 40), threshold=0.005, patience=2)
    assert stopped is None and state.best_epoch == 40


def test_a_real_plateau_or_decline_stops_the_run():
    # metric flat within the noise and the loss no longer falling: a plateau
    values = [0.02, 0.03, 0.04, 0.041, 0.039, 0.0405, 0.040]
    losses = [4.0, 3.5, 3.2, 3.21, 3.22, 3.20, 3.25]
    stopped, state = _replay(values, losses, threshold=0.002)
    assert stopped == 6 and state.best_epoch == 3
    # a decline beyond the threshold counts as bad even when the loss still falls
    stopped, state = _replay([0.05, 0.06, 0.05, 0.049, 0.048], [4.0, 3.9, 3.8, 3.7, 3.6], threshold=0.002)
    assert stopped == 5 and state.best_epoch == 2
    # a chain of ties cannot walk the reference down: each is within 0.002 of the last but not of the best
    stopped, state = _replay([0.05, 0.0485, 0.047, 0.0455, 0.044], [4.0, 3.9, 3.8, 3.7, 3.6], threshold=0.002)
    assert state.best == 0.05 and stopped == 5 and state.best_epoch == 2


def test_no_stop_before_the_schedule_has_decayed():
    values, losses = [0.05, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04], [3.0] * 8
    assert _replay(values, losses, threshold=0.0, patience=2)[0] == 3
    stopped, state = _replay(values, losses, threshold=0.0, patience=2, stop_from_epoch=6)
    assert stopped == 6 and state.bad == 5 and state.best_epoch == 1


def test_stopping_state_round_trips_and_reads_old_checkpoints():
    stop = EarlyStopping(patience=3, stop_from_epoch=4)
    stop.update(0.05, 1, 0.01, 3.0)
    stop.update(0.055, 2, 0.01, 2.9)
    again = EarlyStopping(patience=3, stop_from_epoch=4)
    again.load_state_dict(stop.state_dict())
    assert again == stop and again.best_epoch == 2 and again.best_loss == 2.9
    old = EarlyStopping(patience=3)
    old.load_state_dict({"best": 0.05, "best_epoch": 1, "bad": 1})  # written before the tie-break existed
    assert old.best_loss == float("inf")
    assert old.update(0.05, 3, 0.01, 9.0) and old.best_loss == 9.0  # its loss unknown: a tie goes to a measured one


def test_check_resume_names_the_field_that_differs():
    saved = {"lr": 1e-3, "epochs": 10, "inputs.text_emb": "abc"}
    check_resume("ckpt.pt", saved, {**saved, "epochs": 20}, fixed=["lr", "inputs.text_emb"])
    with pytest.raises(LetterError, match=r"ckpt.pt: lr was 0.001, now 0.002"):
        check_resume("ckpt.pt", saved, {**saved, "lr": 2e-3}, fixed=["lr", "inputs.text_emb"])
    with pytest.raises(LetterError, match="inputs.text_emb was 'abc', now 'xyz'"):
        check_resume("ckpt.pt", saved, {**saved, "inputs.text_emb": "xyz"}, fixed=["lr", "inputs.text_emb"])


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, "truncated"])
def test_corrupt_checkpoints_are_one_line_errors(tmp_path, content):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, {"w": torch.randn(100, 100)})
    assert torch.equal(load_checkpoint(path)["w"], torch.load(path)["w"])
    if content == "truncated":
        data = open(path, "rb").read()
        content = data[: len(data) // 2]
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(LetterError, match="checkpoint.pt: corrupt or truncated"):
        load_checkpoint(path)


# -- the tokenizer through the core: generators, resume refusal, torchrun --------------------------

TOK = dict(layers=[32], e_dim=8, codebook_sizes=[8, 8], clusters=2, batch_size=64, epochs=4, kmeans_iters=5,
           checkpoint_every=2, alpha=0.02, beta=1e-3)


@pytest.fixture(scope="module")
def tok_inputs():
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(150, 24, generator=g, device="cpu").numpy()
    cf = torch.randn(150, 8, generator=g, device="cpu").numpy()
    return text, cf


def test_tokenizer_generators_are_on_the_requested_device(tok_inputs, tmp_path, monkeypatch):
    """Every generator the tokenizer trainer holds lives on the device it was asked to use."""
    seen = []
    real = RandomStreams.generator

    def spy(self, name, seed, device=None):
        gen = real(self, name, seed, device)
        seen.append((name, gen.device, self.device))
        return gen

    monkeypatch.setattr(RandomStreams, "generator", spy)
    train_tokenizer(TokenizerConfig(**{**TOK, "epochs": 1, "device": "cpu"}), *tok_inputs, str(tmp_path / "run"))
    assert {name for name, _, _ in seen} == {"codes", "order"}
    assert all(dev == torch.device("cpu") for name, dev, run in seen if name == "codes")


def test_tokenizer_resume_refuses_changed_inputs_and_settings(tok_inputs, tmp_path):
    text, cf = tok_inputs
    run = str(tmp_path / "run")
    train_tokenizer(TokenizerConfig(**{**TOK, "epochs": 2}), text, cf, run)
    with pytest.raises(LetterError, match="lr was 0.001, now 0.002"):
        train_tokenizer(TokenizerConfig(**{**TOK, "lr": 2e-3}), text, cf, run, resume=True)
    with pytest.raises(LetterError, match="inputs.text_emb was"):
        train_tokenizer(TokenizerConfig(**TOK), text + 1, cf, run, resume=True)
    train_tokenizer(TokenizerConfig(**TOK), text, cf, run, resume=True)  # epochs may grow


@pytest.mark.slow
def test_tokenizer_torchrun_two_processes_match_one(tok_inputs, tmp_path):
    text, cf = tok_inputs
    np.save(tmp_path / "T.emb-x.npy", text)
    np.save(tmp_path / "T.cf-x.npy", cf)
    data = tmp_path / "data"
    from letter.data import make_synthetic, write_letter

    write_letter(make_synthetic(num_users=60, num_items=150, num_categories=3, seed=1, name="T"), str(data))
    common = ["--text-emb", str(tmp_path / "T.emb-x.npy"), "--cf-emb", str(tmp_path / "T.cf-x.npy"),
              "--layers", "32", "--e-dim", "8", "--codebook-sizes", "8,8", "--clusters", "2", "--batch-size", "64",
              "--epochs", "3", "--kmeans-iters", "5", "--beta", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LETTER_PROGRESS": "0"}
    runs = {}
    for procs in (1, 2):
        out = str(tmp_path / f"p{procs}")
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
             "-m", "letter.cli.main", "train-tokenizer", "--data", str(data), *common, "--out", out],
            env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[procs] = np.load(os.path.join(out, "codes.npy"))
    assert np.array_equal(runs[1], runs[2])


# every rank checks its own rows; rank 1's alone hold a NaN. Each rank writes what each check said,
# then meets the others at a barrier (a rank that raised alone would leave the others waiting there).
_DIVERGED_ON_ONE_RANK = """
import json, sys, torch
from letter.cf.model import SASRec
from letter.cf.sasrec import step_loss
from letter.errors import LetterError
from letter.tokenizer import TokenizerConfig
from letter.tokenizer.model import RQVAE
from letter.training import BatchShare, check_not_diverged, distributed

def said(check):
    try:
        check()
        return "ok"
    except LetterError as e:
        return str(e)

with distributed("cpu") as ctx:
    torch.manual_seed(0)
    poisoned = float("nan") if ctx.rank == 1 else 0.0
    rqvae = RQVAE(6, TokenizerConfig(layers=[8], e_dim=4, codebook_sizes=[4, 4]))
    sasrec = SASRec(10, 8, 1, 1, 0.0, 5)
    if ctx.rank == 1:
        with torch.no_grad():
            sasrec.item_emb.weight[3] = poisoned
    inputs = torch.tensor([[1, 2, 3, 4, 5]])
    seen = {}
    seen["direct"] = said(lambda: check_not_diverged("the rows", torch.full((3,), poisoned), ctx=ctx))
    ctx.barrier()
    z = torch.zeros(4, 4) + poisoned
    seen["tokenizer"] = said(lambda: rqvae.quantize(z, share=BatchShare(8, ctx)))
    ctx.barrier()
    seen["sasrec"] = said(lambda: step_loss(sasrec, inputs, inputs, 10, "ce", 5, ctx.world, ctx=ctx))
    ctx.barrier()
    with open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w") as f:
        json.dump(seen, f)
"""


@pytest.mark.slow
def test_divergence_on_one_rank_stops_every_rank_alike(tmp_path):
    """Under torchrun a NaN in one rank's rows made that rank alone raise; the others went on into
    the next collective and waited there for it. Every rank must raise the same one-line error."""
    script = tmp_path / "diverge.py"
    script.write_text(_DIVERGED_ON_ONE_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LETTER_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {
        "direct": "training diverged: the rows hold NaN/inf; lower lr",
        "tokenizer": "training diverged: the latents or codebooks hold NaN/inf; lower lr",
        "sasrec": "training diverged: the hidden states or item embeddings hold NaN/inf; lower lr",
    }


def test_interrupted_fresh_tokenizer_run_leaves_no_earlier_outputs(tok_inputs, tmp_path, monkeypatch):
    """A new run (no --resume) into a finished run's folder that dies midway must not leave the old
    model and codes for `letter tokenize` to pick up."""
    from letter.tokenizer import load_tokenizer
    from letter.tokenizer import train as tokenizer_train

    text, cf = tok_inputs
    run = tmp_path / "run"
    train_tokenizer(TokenizerConfig(**{**TOK, "epochs": 1}), text, cf, str(run))
    assert load_tokenizer(str(run)).encode(text[:3]).shape == (3, 2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_train, "_batch_losses", killed)
    with pytest.raises(LetterError, match="holds a finished tokenizer run"):  # never replaced unasked
        train_tokenizer(TokenizerConfig(**{**TOK, "epochs": 1, "seed": 5}), text, cf, str(run))
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(TokenizerConfig(**{**TOK, "epochs": 1, "seed": 5}), text, cf, str(run), overwrite=True)
    assert not any((run / f).exists() for f in ("model.pt", "codes.npy", "manifest.json", "report.json"))
    with pytest.raises(LetterError, match="not a tokenizer run folder|unfinished"):
        load_tokenizer(str(run))


# -- fit: the one training loop -------------------------------------------------------------------

class _Line(Trainable):
    """y = 2x by SGD, with dropout-like noise from the global stream and a registered generator, and
    a scripted validation score per epoch (to drive selection and early stopping)."""

    def __init__(self, rng, scores=None, kill_at=None):
        self.model = self.step_module = torch.nn.Linear(1, 1)
        self.steps, self.kill_at = 0, kill_at  # kill_at: the step call that dies (a killed process)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.noise = rng.generator("noise", 5, device="cpu")
        self.x = torch.linspace(-1, 1, 32).unsqueeze(1)
        self.scores = scores or {}
        self.kept = []

    def parameters(self):
        return list(self.model.parameters())

    def start_epoch(self, epoch):
        self.shift = 0.01 * torch.rand(1)  # an epoch-start draw: resuming inside the epoch must replay it

    def batches(self, epoch):
        return batch_order(32, 8, epoch_generator(1, epoch))

    def step(self, batch):
        self.steps += 1
        if self.steps == self.kill_at:
            raise _Killed
        noise = torch.randn(len(batch), 1, generator=self.noise, device="cpu") + torch.randn(len(batch), 1)
        x = self.x[batch] + 0.01 * noise + self.shift
        loss = ((self.model(x) - 2 * self.x[batch]) ** 2).mean()
        return loss, {"loss": loss}

    def epoch_record(self, epoch, sums, steps):
        return {"loss": sums["loss"] / steps}

    def validate(self, epoch, record, select):
        return Validation({"score": self.scores.get(epoch, 0.0)}, self.scores.get(epoch, 0.0)) if select else None

    def keep_best(self, epoch, validation):
        self.kept.append(epoch)

    def model_state(self):
        return self.model.state_dict()

    def load_model_state(self, state):
        self.model.load_state_dict(state)


class _Killed(Exception):
    pass


def _fit(tmp_path, epochs, resume=False, stop_after=None, identity=None, scores=None, patience=None,
         checkpoint_minutes=None, kill_at=None):
    seed_everything(0)
    rng = RandomStreams(torch.device("cpu"))
    line = _Line(rng, scores, kill_at)
    plan = FitPlan(epochs=epochs, checkpoint=str(tmp_path / "ckpt.pt"), identity=identity or {"lr": 0.1, "epochs": epochs},
                   may_change={"epochs"}, resume=resume, stop_after=stop_after, patience=patience,
                   checkpoint_minutes=checkpoint_minutes, log=lambda _: None)
    return fit(line, plan, DistContext(), rng), line


def test_fit_resume_equals_the_uninterrupted_run(tmp_path):
    straight, line = _fit(tmp_path / "a", 4)
    (tmp_path / "b").mkdir()
    first, _ = _fit(tmp_path / "b", 4, stop_after=2)
    assert first.epoch == 2 and not first.finished
    resumed, again = _fit(tmp_path / "b", 4, resume=True)
    assert resumed.finished and resumed.resumed_from == 2
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert torch.equal(again.model.weight, line.model.weight)


def test_fit_resumes_inside_an_epoch_as_the_uninterrupted_run(tmp_path):
    """checkpoint_minutes 0: a checkpoint after every step; the process dies in the 2nd step of epoch 2
    (4 steps an epoch), so the last checkpoint holds epoch 1 and one step of epoch 2, whose batches
    and random draws the resumed run must replay and continue exactly."""
    straight, line = _fit(tmp_path / "a", 3)
    (tmp_path / "b").mkdir()
    with pytest.raises(_Killed):
        _fit(tmp_path / "b", 3, checkpoint_minutes=0, kill_at=6)
    ckpt = load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert ckpt["epoch"] == 1 and ckpt["within_epoch"]["steps"] == 1 and len(ckpt["history"]) == 1
    resumed, again = _fit(tmp_path / "b", 3, resume=True)
    assert resumed.finished and resumed.resumed_from == 1
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    assert torch.equal(again.model.weight, line.model.weight) and torch.equal(again.model.bias, line.model.bias)
    assert "within_epoch" not in load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))  # the epoch-end one replaced it
    # a checkpoint written inside an epoch by 2 processes cannot continue with 1 (its batches are sharded)
    with pytest.raises(_Killed):
        _fit(tmp_path / "c", 3, checkpoint_minutes=0, kill_at=3)
    ckpt = load_checkpoint(str(tmp_path / "c" / "ckpt.pt"))
    ckpt["within_epoch"]["per_rank"] *= 2
    save_checkpoint(str(tmp_path / "c" / "ckpt.pt"), ckpt)
    with pytest.raises(LetterError, match="written inside epoch 1 by 2 process.es.; resume with as many .now 1."):
        _fit(tmp_path / "c", 3, resume=True)


def test_fit_resume_rule(tmp_path):
    with pytest.raises(LetterError, match="cannot resume: no checkpoint at .*ckpt.pt"):
        _fit(tmp_path, 2, resume=True)
    _fit(tmp_path, 2)
    with pytest.raises(LetterError, match=r"ckpt.pt: lr was 0.1, now 0.2"):
        _fit(tmp_path, 2, resume=True, identity={"lr": 0.2, "epochs": 2})
    with pytest.raises(LetterError, match=r"ckpt.pt: inputs.data was '<absent>', now 'x'"):
        _fit(tmp_path, 2, resume=True, identity={"lr": 0.1, "epochs": 2, "inputs.data": "x"})
    with pytest.raises(LetterError, match="it is at epoch 2, past epochs 1"):
        _fit(tmp_path, 1, resume=True, identity={"lr": 0.1, "epochs": 1})
    grown, _ = _fit(tmp_path, 3, resume=True, identity={"lr": 0.1, "epochs": 3})  # epochs may change
    assert grown.epoch == 3 and [r["epoch"] for r in grown.history] == [1, 2, 3]
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(LetterError, match="not a checkpoint of this LETTER version"):
        _fit(tmp_path, 3, resume=True)


def test_fit_resume_with_a_patience_already_spent_finishes_the_run(tmp_path):
    """patience may change on resume: a checkpoint holding 3 bad validations resumed with patience 2
    ends as the uninterrupted run with patience 2 did (finished, stopped early; the checkpoint says
    so), instead of returning unfinished without a checkpoint every time it is resumed."""
    scores = {1: 0.3, 2: 0.1, 3: 0.1, 4: 0.1}
    straight, _ = _fit(tmp_path / "a", 8, scores=scores, patience=2)
    assert straight.finished and straight.stopped_early and straight.epoch == 3
    (tmp_path / "b").mkdir()
    first, _ = _fit(tmp_path / "b", 8, scores=scores, patience=5, stop_after=4)
    assert first.epoch == 4 and not first.finished and first.stopping.bad == 3
    resumed, _ = _fit(tmp_path / "b", 8, scores=scores, patience=2, resume=True)
    assert resumed.finished and resumed.stopped_early and resumed.epoch == 4
    assert load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))["finished"]


def test_fit_selects_and_stops_early(tmp_path):
    run, line = _fit(tmp_path, 10, scores={1: 0.1, 2: 0.3, 3: 0.2, 4: 0.25}, patience=2)
    assert run.stopped_early and run.epoch == 4 and run.stopping.best_epoch == 2 and line.kept == [1, 2]
    assert [r["selected"] for r in run.history] == [True, True, False, False]
